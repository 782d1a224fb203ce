"""Fault tolerance: every long stage killed with SIGKILL mid-way (a real kill of a `python train.py`
process, once a checkpoint exists), then started again the documented way (`resume=true` in the
same run directory; expert and teacher training continue from their cache by themselves), loses at
most one checkpoint interval and ends bitwise equal to an uninterrupted run with the same seed.

Covered here: expert training, DM distillation (and the CSV log kept across the kill), teacher
training + recovery (SRe2L), GCond and SGDD condensation. Trajectory-matching distillation:
tests/test_runs.py::test_killed_distillation_resumes_where_it_stopped."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from conftest import ROOT, SHARED_DATA

QUIET = ["logger.wandb.enabled=false", "trainer.enable_progress_bar=false", "trainer.compile=false",
         "trainer.accelerator=cpu"]


def _popen(args, cache: Path) -> subprocess.Popen:
    env = {**os.environ, "LDD_CACHE_DIR": str(cache), "LDD_DATA_DIR": str(SHARED_DATA), "WANDB_MODE": "offline",
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _finish(args, cache: Path) -> str:
    """Run ``train.py args`` to the end; its output."""
    p = _popen(args, cache)
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-3000:]
    return out


def _kill_when(args, cache: Path, ready, timeout: float = 300) -> None:
    """Start ``train.py args`` and SIGKILL its process group as soon as ``ready()`` is true."""
    p = _popen(args, cache)
    deadline = time.time() + timeout
    while time.time() < deadline and p.poll() is None:
        if ready():
            os.killpg(p.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL, f"the run ended before it could be killed:\n{out[-3000:]}"


def _epoch(ckpt: Path) -> int:
    return int(torch.load(ckpt, map_location="cpu", weights_only=True)["epoch"])


def _stage_metrics(run: Path) -> dict:
    """metrics.json without the timings and the resume bookkeeping (what must equal)."""
    m = json.loads((run / "metrics.json").read_text())
    return {k: v for k, v in m.items() if not k.startswith("timings/") and "resumed_from" not in k}


def _rows(run: Path, key: str) -> list[dict]:
    with open(run / "csv" / "metrics.csv", newline="") as fh:
        return [r for r in csv.DictReader(fh) if r.get(key)]


def _distilled(run: Path) -> dict:
    return torch.load(run / "distilled.pt", map_location="cpu", weights_only=True)


def test_csv_log_keeps_the_rows_before_the_resume_step_and_writes_every_row(tmp_path):
    """Every logged row is on disk at once (a SIGKILL loses none); a resumed logger neither warns
    nor deletes: it keeps the earlier rows before its first step and replaces the rest."""
    from lightning_dd.loggers import ResumableCSVLogger

    path = tmp_path / "csv" / "metrics.csv"
    a = ResumableCSVLogger(save_dir=str(tmp_path), name="csv", version="")
    for s in range(6):
        a.log_metrics({"loss": float(s)}, s)
        assert len(_rows(tmp_path, "loss")) == s + 1  # written through, no finalize needed
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        b = ResumableCSVLogger(save_dir=str(tmp_path), name="csv", version="", keep_previous=True)
        b.log_metrics({"loss": 40.0, "lr": 0.1}, 4)  # resumed at step 4: rows 4, 5 are logged again
        b.log_metrics({"loss": 50.0, "lr": 0.1}, 5)
        b.log_metrics({"final": 1.0})  # no step: after every step so far
    assert not [w for w in caught if "deleted" in str(w.message)], [str(w.message) for w in caught]
    rows = list(csv.DictReader(open(path, newline="")))
    assert [(r["step"], r["loss"]) for r in rows if r["loss"]] == [
        ("0", "0.0"), ("1", "1.0"), ("2", "2.0"), ("3", "3.0"), ("4", "40.0"), ("5", "50.0")]
    assert rows[-1]["final"] == "1.0" and rows[-1]["step"] == "6"
    c = ResumableCSVLogger(save_dir=str(tmp_path), name="csv", version="", keep_previous=True)
    c.log_metrics({"final": 2.0})  # a resumed run that had nothing left to do keeps every row
    assert len(list(csv.DictReader(open(path, newline="")))) == len(rows) + 1
    with pytest.warns(UserWarning, match="will be deleted"):  # a fresh run in the directory: a fresh log
        ResumableCSVLogger(save_dir=str(tmp_path), name="csv", version="").log_metrics({"loss": 9.0}, 0)
    assert len(list(csv.DictReader(open(path, newline="")))) == 1


@pytest.mark.parametrize("safe", [False, True])
def test_a_step_checkpoint_is_written_after_the_row_of_its_step(tmp_path, safe):
    """Lightning writes a step's row after ModelCheckpoint saved that step (a kill between the two
    loses the row: the plain Trainer shows it); the framework's Trainers write the row first, and
    still write every row once."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_dd.core.trainer import TrainerFactory
    from lightning_dd.loggers import ResumableCSVLogger

    class Fit(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(2))

        def training_step(self, batch, i):
            loss = (self.w * batch).sum() ** 2
            self.log("loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    seen = []

    class Spy(ModelCheckpoint):  # rows on disk when each step checkpoint is saved
        def _save_checkpoint(self, trainer, filepath):
            on_disk = _rows(tmp_path, "loss") if (tmp_path / "csv" / "metrics.csv").is_file() else []
            seen.append((trainer.global_step, [int(r["step"]) for r in on_disk]))
            super()._save_checkpoint(trainer, filepath)

    kw = {"max_steps": 20, "log_every_n_steps": 5, "enable_progress_bar": False, "enable_checkpointing": True,
          "logger": ResumableCSVLogger(save_dir=str(tmp_path), name="csv", version=""),
          "callbacks": [Spy(dirpath=tmp_path / "ck", every_n_train_steps=5, save_top_k=-1)]}
    trainer = TrainerFactory(accelerator="cpu")("t", **kw) if safe else L.Trainer(accelerator="cpu", **kw)
    trainer.fit(Fit(), torch.utils.data.DataLoader(torch.randn(40, 2), batch_size=None))
    steps = [4, 9, 14, 19]
    assert [s for s, _ in seen] == [5, 10, 15, 20]
    assert [rows for _, rows in seen] == ([steps[: k + 1] for k in range(4)] if safe else [steps[:k] for k in range(4)])
    assert [int(r["step"]) for r in _rows(tmp_path, "loss")] == steps


@pytest.mark.slow
def test_killed_expert_training_resumes_bitwise(tmp_path):
    """stage=experts, 2 experts x 10 epochs, checkpointed every epoch: killed while expert 1 trains
    (expert 0 finished), started again, expert 1 continues after its last finished epoch; both
    trajectories equal the uninterrupted run's bitwise."""
    args = ["stage=experts", "method.num_experts=2", "method.expert_train_epochs=10", "method.expert_batch=16",
            "net.width=8", *QUIET]
    _finish([*args, f"hydra.run.dir={tmp_path / 'ref'}"], tmp_path / "ref_cache")
    cache = tmp_path / "cache"

    def expert1_checkpointed():
        return list(cache.glob("experts/*/partial/expert_001/last.ckpt"))

    _kill_when([*args, f"hydra.run.dir={tmp_path / 'run'}"], cache, expert1_checkpointed)
    (ckpt,) = expert1_checkpointed()
    done = _epoch(ckpt) + 1
    bank = ckpt.parent.parent.parent
    assert (bank / "expert_000.pt").is_file() and not (bank / "expert_001.pt").exists() and done < 10
    out = _finish([*args, f"hydra.run.dir={tmp_path / 'run'}", "resume=true"], cache)
    assert f"expert 1: resuming from {ckpt} ({done} epochs done)" in out, out[-3000:]
    assert not (bank / "partial" / "expert_001").exists()
    (ref_bank,) = (tmp_path / "ref_cache" / "experts").iterdir()
    assert ref_bank.name == bank.name
    for i in range(2):
        a = torch.load(ref_bank / f"expert_{i:03d}.pt", weights_only=True)["trajectory"]
        b = torch.load(bank / f"expert_{i:03d}.pt", weights_only=True)["trajectory"]
        assert a.shape == b.shape == (11, a.shape[1]) and torch.equal(a, b), i
    assert _stage_metrics(tmp_path / "run") == _stage_metrics(tmp_path / "ref")


@pytest.mark.slow
def test_killed_dm_distillation_resumes_bitwise_and_keeps_its_csv_rows(tmp_path):
    """DM on digits, 200 iterations, checkpoints every 10, rows every 10: killed once step 60 is
    checkpointed, resumed with resume=true: the distilled set equals the uninterrupted run's
    bitwise, and the CSV log holds every row once -- the rows logged before the kill kept, with the
    uninterrupted run's values."""
    args = ["experiment=dm_cifar10", "data=digits", "stage=distill", "method.ipc=1", "method.iterations=200",
            "method.ckpt_every=10", "method.batch_real=16", "net.width=8", "net.depth=2", "logger.eval_every=0",
            "logger.image_every=0", *QUIET]
    ref, run = tmp_path / "ref", tmp_path / "run"
    _finish([*args, f"hydra.run.dir={ref}"], tmp_path / "cache")
    ckpts = run / "checkpoints"

    def step_60():
        return any(int(f.stem.split("=")[1]) >= 60 for f in ckpts.glob("distill-step=*.ckpt"))

    _kill_when([*args, f"hydra.run.dir={run}"], tmp_path / "cache", step_60)
    assert not (run / "distilled.pt").exists()
    stopped = int(torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"])
    before = _rows(run, "distill/loss")
    assert stopped >= 50 and [int(r["step"]) for r in before][:5] == [9, 19, 29, 39, 49]
    out = _finish([*args, f"hydra.run.dir={run}", "resume=true"], tmp_path / "cache")
    assert "resuming distillation from" in out and "will be deleted" not in out, out[-3000:]
    a, b = _distilled(ref), _distilled(run)
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["labels"], b["labels"])
    assert _stage_metrics(run) == _stage_metrics(ref)
    after, want = _rows(run, "distill/loss"), _rows(ref, "distill/loss")
    assert [int(r["step"]) for r in after] == list(range(9, 200, 10))
    assert [r["distill/loss"] for r in after] == [r["distill/loss"] for r in want]
    kept = [r for r in before if int(r["step"]) < stopped]
    assert [r["distill/loss"] for r in after[: len(kept)]] == [r["distill/loss"] for r in kept]


@pytest.mark.slow
def test_killed_teacher_training_and_recovery_resume_bitwise(tmp_path):
    """SRe2L on digits, stage=recover: killed while the teacher trains (epoch checkpoints in the
    teacher cache), started again with resume=true, killed again while the second recovery batch
    runs (the first one finished), resumed again: the teacher and the distilled set equal the
    uninterrupted run's bitwise, and the CSV holds the first batch's rows once."""
    args = ["experiment=sre2l_cifar10", "data=digits", "data.zca=false", "stage=recover", "method.ipc=10",
            "method.teacher.nets=[{name:ConvNet,width:8,depth:2,norm:batchnorm}]", "method.teacher.epochs=8",
            "method.teacher.batch_size=32", "method.recover.iterations=80", "method.recover.batch=50",
            "method.recover.jitter=1", "method.recover.ckpt_every=5", *QUIET]
    ref, run, cache = tmp_path / "ref", tmp_path / "run", tmp_path / "cache"
    _finish([*args, f"hydra.run.dir={ref}"], tmp_path / "ref_cache")

    def teacher_checkpointed():
        return list(cache.glob("teachers/*/partial/last.ckpt"))

    _kill_when([*args, f"hydra.run.dir={run}"], cache, teacher_checkpointed)
    (ckpt,) = teacher_checkpointed()
    done = _epoch(ckpt) + 1
    assert done < 8 and not (ckpt.parent.parent / "teacher.pt").exists()

    def batch_1_checkpointed():
        return (run / "recover" / "batch_000.pt").is_file() and (run / "checkpoints" / "recover_001" / "last.ckpt").is_file()

    _kill_when([*args, f"hydra.run.dir={run}", "resume=true"], cache, batch_1_checkpointed)
    out = _finish([*args, f"hydra.run.dir={run}", "resume=true"], cache)
    assert "recover batch 1: resuming from" in out and "will be deleted" not in out, out[-3000:]
    teacher = ckpt.parent.parent / "teacher.pt"
    (ref_teacher,) = (tmp_path / "ref_cache" / "teachers").glob("*/teacher.pt")
    a, b = (torch.load(p, weights_only=True)["state_dict"] for p in (ref_teacher, teacher))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, b = _distilled(ref), _distilled(run)
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["labels"], b["labels"])
    assert _stage_metrics(run) == _stage_metrics(ref)
    got, want = _rows(run, "recover/loss"), _rows(ref, "recover/loss")
    assert [int(r["step"]) for r in got] == [int(r["step"]) for r in want] == \
        [b * 80 + s for b in range(2) for s in range(9, 80, 10)]
    assert [r["recover/loss"] for r in got] == [r["recover/loss"] for r in want]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gcond", "sgdd"])
def test_killed_graph_condensation_resumes_bitwise(method, tmp_path):
    """GCond / SGDD on Cora (tiny loops), 40 epochs, checkpoints every 2: killed once epoch 10 is
    checkpointed, resumed with resume=true at its last checkpoint: the condensed graph equals the
    uninterrupted run's bitwise."""
    args = [f"experiment={method}_cora", "stage=condense", "method.epochs=40", "method.ckpt_every=2",
            "method.outer_loop=2", "method.inner_loop=1", *QUIET]
    args += ["method.pge_hidden=16"] if method == "gcond" else [
        "method.ignr_hidden=16", "method.mx_size=300", "method.ot_rank=16", "method.warmup_epochs=3"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    _finish([*args, f"hydra.run.dir={ref}"], tmp_path / "cache")
    ckpts = run / "checkpoints"

    def epoch_10():
        return any(int(f.name.split("-")[0].split("=")[1]) >= 9 for f in ckpts.glob("epoch=*.ckpt"))

    _kill_when([*args, f"hydra.run.dir={run}"], tmp_path / "cache", epoch_10)
    assert not (run / "condensed.pt").exists()
    done = int(torch.load(ckpts / "last.ckpt", weights_only=True)["condensation"]["epochs_done"])
    assert 8 <= done < 40
    out = _finish([*args, f"hydra.run.dir={run}", "resume=true"], tmp_path / "cache")
    assert "resuming condensation from" in out, out[-3000:]
    a, b = (torch.load(d / "condensed.pt", map_location="cpu", weights_only=True) for d in (ref, run))
    assert torch.equal(a["x"], b["x"]) and torch.equal(a["adj"], b["adj"])
    m = json.loads((run / "metrics.json").read_text())
    assert m["condense/resumed_from_epoch"] == done
    assert _stage_metrics(run) == _stage_metrics(ref)
