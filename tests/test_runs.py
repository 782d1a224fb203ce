"""Whole runs through train.py: the embedded default, and a killed distillation that resumes."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT


def _train(args, tmp_path, **popen):
    env = {**os.environ, "LDD_CACHE_DIR": str(tmp_path / "cache"), "WANDB_MODE": "offline"}
    return subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **popen)


@pytest.mark.slow
def test_embedded_default_distilled_digits_beat_random_subset(tmp_path):
    """`python train.py` (DATM on scikit-learn digits): writes its artifacts; distilled > random."""
    run = tmp_path / "run"
    p = _train([f"hydra.run.dir={run}"], tmp_path)
    out, _ = p.communicate(timeout=900)
    assert p.returncode == 0, out[-3000:]
    m = json.loads((run / "metrics.json").read_text())
    assert m["eval/ConvNet/n_runs"] == 3
    assert m["eval/ConvNet/acc_mean"] > m["baseline/random/ConvNet/acc_mean"] + 0.10, m
    assert m["eval/ConvNet/acc_mean"] > m["baseline/init/ConvNet/acc_mean"] + 0.05, m
    assert "baseline/random" in out and "eval" in out  # the printed table
    d = torch.load(run / "distilled.pt", weights_only=False)
    assert d["images"].shape == (10, 1, 8, 8) and d["labels"].shape == (10, 10) and d["lr"] > 0
    assert (run / ".hydra" / "config.yaml").is_file() and (run / "csv" / "metrics.csv").is_file()
    assert (run / "distilled.png").is_file() and list((run / "wandb").glob("offline-run-*"))


@pytest.mark.slow
def test_killed_distillation_resumes_where_it_stopped(tmp_path):
    common = ["stage=distill", "method.iterations=40", "method.ckpt_every=2", "logger.wandb.enabled=false",
              "trainer.enable_progress_bar=false"]
    # reference: one uninterrupted run
    ref = tmp_path / "ref"
    p = _train([*common, f"hydra.run.dir={ref}"], tmp_path)
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-3000:]

    # the same run, killed once a mid-way checkpoint exists. Lightning writes distill-step=N.ckpt
    # before last.ckpt, so a kill between the two leaves last.ckpt one interval (2 steps) behind:
    # kill at step 12 so that last.ckpt holds at least step 10.
    run = tmp_path / "run"
    p = _train([*common, f"hydra.run.dir={run}"], tmp_path, start_new_session=True)
    ckpts = run / "checkpoints"
    deadline = time.time() + 600
    while time.time() < deadline and p.poll() is None:
        done = [int(f.stem.split("=")[1]) for f in ckpts.glob("distill-step=*.ckpt")] if ckpts.is_dir() else []
        if done and max(done) >= 12:
            os.killpg(p.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    p.wait()
    assert p.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (run / "distilled.pt").exists()
    last = torch.load(ckpts / "last.ckpt", weights_only=False)
    stopped_at = last["global_step"]
    assert 10 <= stopped_at < 40

    p = _train([*common, f"hydra.run.dir={run}", "resume=true"], tmp_path)
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-3000:]
    assert "resuming distillation from" in out
    m = json.loads((run / "metrics.json").read_text())
    assert m["distill/iterations"] == 40
    # it continued at the iteration it stopped at: the logged iterations after the restart start there
    import csv

    steps = [int(r["step"]) for r in csv.DictReader(open(run / "csv" / "metrics.csv")) if r.get("distill/loss")]
    assert steps[-1] == 39 and min(s for s in steps if s >= stopped_at) == stopped_at
    # and ends exactly where the uninterrupted run ends
    a = torch.load(ref / "distilled.pt", weights_only=False)
    b = torch.load(run / "distilled.pt", weights_only=False)
    assert torch.allclose(a["images"], b["images"], atol=1e-5) and torch.allclose(a["labels"], b["labels"], atol=1e-5)
    assert abs(a["lr"] - b["lr"]) < 1e-7


@pytest.mark.slow
def test_ctrl_c_says_how_to_resume_and_the_resumed_run_keeps_its_logs(tmp_path):
    """Ctrl-C (SIGINT) prints the last checkpoint and the resume command; that command continues the
    run without Lightning's "not resumable" warning, keeps the CSV rows logged before the stop and
    continues the same W&B run."""
    run = tmp_path / "run"
    common = ["stage=distill", "method.iterations=40", "method.ckpt_every=5", "trainer.enable_progress_bar=false"]
    p = _train([*common, f"hydra.run.dir={run}"], tmp_path, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and p.poll() is None:
        if list((run / "checkpoints").glob("distill-step=*.ckpt")) if (run / "checkpoints").is_dir() else False:
            time.sleep(1.0)
            os.killpg(p.pid, signal.SIGINT)
            break
        time.sleep(0.05)
    out, _ = p.communicate(timeout=300)
    assert p.returncode != 0, "the run finished before it could be interrupted"
    assert "Last checkpoint:" in out and "resume=true" in out, out[-2000:]
    cmd = out.split("Resume with:")[1].strip().splitlines()[0].split()
    assert cmd[:2] == ["python", "train.py"] and f"hydra.run.dir={run}" in cmd
    import csv

    before = [r for r in csv.DictReader(open(run / "csv" / "metrics.csv")) if r.get("distill/loss")]
    run_id = (run / "wandb" / "run_id").read_text()

    p = _train(cmd[2:], tmp_path)
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-3000:]
    assert "not resumable" not in out and "resuming distillation from" in out
    after = [r for r in csv.DictReader(open(run / "csv" / "metrics.csv")) if r.get("distill/loss")]
    steps = [int(r["step"]) for r in after]
    assert steps == list(range(40)), steps  # every iteration once: the rows before the stop were kept
    assert [r["distill/loss"] for r in after[: len(before)]] == [r["distill/loss"] for r in before][: len(after)]
    assert (run / "wandb" / "run_id").read_text() == run_id
    assert all(d.name.endswith(run_id) for d in (run / "wandb").glob("offline-run-*"))
