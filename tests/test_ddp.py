"""Several processes through Lightning's strategies (issue 17): trajectory matching shards its expert
draws over DDP ranks and all-reduces the synthetic-set gradient; expert training and evaluation run
as DDP fits on sharded batches. The multi-process runs are subprocesses (``tests/ddp_worker.py``,
``train.py``): Lightning's ``ddp`` relaunches the running script once per extra rank."""
import functools
import json
import os
import subprocess
import sys

import lightning as L
import pytest
import torch

from configs import method, run_context
from conftest import ROOT
from ddp_worker import SaveFirstGradient, tm_problem
from lightning_dd.core.config import ConfigError
from lightning_dd.data.batches import StepLoader, TensorBatches, shard_batch
from lightning_dd.methods.images.meta_grad import matching_loss_and_grads
from lightning_dd.core.trainer import TrainerFactory
from lightning_dd.runner import check_config

WORKER = ROOT / "tests" / "ddp_worker.py"


def _fit(module, tmp_path, tag="fit", steps=1):
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[SaveFirstGradient(tmp_path, tag)])
    trainer.fit(module, StepLoader(steps, functools.partial(getattr, module, "global_step")))
    return torch.load(tmp_path / f"{tag}_rank0.pt", weights_only=False)


def _draw_grad(expert_draws, draw):
    """Loss and gradients of one draw of iteration 0, computed by hand (the single-draw algorithm)."""
    m = tm_problem(expert_draws)
    m.on_fit_start()
    expert, start, _, steps = m.sample_iteration(0, draw)
    t = m.trajectories[expert]
    loss = matching_loss_and_grads(m.fns, m.images, m.labels, m.syn_lr, t[start], t[start + m.hp.expert_epochs],
                                   steps, m.dsa, mode="unroll")
    return float(loss), {"images": m.images.grad, "labels": m.labels.grad, "lr": m.syn_lr.grad}, m


def test_one_process_one_draw_is_the_single_draw_algorithm(tmp_path):
    """expert_draws=1 on one process: the gradient and the step of the single-draw algorithm,
    number for number (draw 0 keeps the single-draw generator key)."""
    _, want, ref = _draw_grad(1, 0)
    got = _fit(tm_problem(1), tmp_path)
    for k in want:
        assert torch.equal(got["grads"][k], want[k]), k
    ref.configure_optimizers().step()
    for a, b in zip(got["set"][:2], ref.current_set()[:2]):
        assert torch.equal(a, b)
    assert got["set"][2] == ref.current_set()[2] and got["last_draws_kept"] == 1.0


def test_draws_are_averaged_and_one_over_the_threshold_is_dropped(tmp_path):
    (l0, g0, _), (l1, g1, _) = _draw_grad(2, 0), _draw_grad(2, 1)
    assert l0 != l1 and not torch.allclose(g0["images"], g1["images"])  # two different draws
    got = _fit(tm_problem(2), tmp_path, "mean")
    for k in g0:
        torch.testing.assert_close(got["grads"][k], (g0[k] + g1[k]) / 2, rtol=1e-6, atol=0)
    # a threshold between the two losses drops the worse draw: the gradient is the other one's
    kept, dropped = (g0, l1) if l0 < l1 else (g1, l0)
    got = _fit(tm_problem(2, threshold=(l0 + l1) / 2), tmp_path, "drop")
    for k in kept:
        assert torch.equal(got["grads"][k], kept[k]), k
    assert got["last_draws_kept"] == 0.5
    # both over the threshold: no step at all (DATM's skip)
    m = tm_problem(2, threshold=min(l0, l1) / 2)
    before = m.current_set()
    got = _fit(m, tmp_path, "skip")
    assert all(v is None for v in got["grads"].values()) and got["last_draws_kept"] == 0.0
    assert torch.equal(got["set"][0], before[0]) and got["set"][2] == before[2]


def _compose(*overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def _cfg(devices, strategy="ddp", nodes=1):
    """A run context with these Trainer settings and an instance-norm ConvNet."""
    make = TrainerFactory(devices=devices, strategy=strategy, num_nodes=nodes)
    return run_context(net={"name": "ConvNet", "norm": "instancenorm"}, make_trainer=make)


def test_more_processes_than_draws_or_an_unsupported_strategy_is_a_config_error():
    hp = method("datm", expert_draws=2)
    hp.check(_cfg(2))
    hp.check(_cfg("auto"))
    with pytest.raises(ConfigError, match=r"method.expert_draws: 2 expert draw\(s\) .* over 4 processes"):
        hp.check(_cfg(2, nodes=2))
    with pytest.raises(ConfigError, match="method.expert_draws=3"):
        hp.check(_cfg([0, 1, 2]))
    with pytest.raises(ConfigError, match="trainer.strategy: .* not 'fsdp'"):
        hp.check(_cfg(1, "fsdp"))
    with pytest.raises(ConfigError,
                       match="trainer.strategy=ddp_spawn: trajectory matching keeps state between its fits"):
        hp.check(_cfg(2, "ddp_spawn"))  # the module runs under ddp_spawn (tested below), a whole run does not
    # graph condensation and statistics matching run under ddp (their work split over the ranks), not
    # under the spawn strategies or FSDP, refused before any work
    for exp, what in (("gcond_cora", r"graph condensation \(gcond\)"), ("sgdd_cora", r"graph condensation \(sgdd\)"),
                      ("sre2l_cifar10", r"statistics matching \(sre2l\)")):
        check_config(_compose(f"experiment={exp}", "trainer.devices=2", "trainer.strategy=ddp"))
        check_config(_compose(f"experiment={exp}", "trainer.accelerator=cpu", "trainer.devices=auto"))
        with pytest.raises(ConfigError, match=rf"trainer.strategy=ddp_spawn: {what} keeps state between its fits"):
            check_config(_compose(f"experiment={exp}", "trainer.devices=2", "trainer.strategy=ddp_spawn"))
        with pytest.raises(ConfigError, match=rf"trainer.strategy: {what} runs on one device or under DDP"):
            check_config(_compose(f"experiment={exp}", "trainer.devices=2", "trainer.strategy=fsdp"))
    # the same checks at fit time, from the Trainer's own strategy (devices=auto is known only there)
    m = tm_problem(1)
    m._trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)
    with pytest.raises(ConfigError, match="cannot be split over 2 processes"):
        m.check_strategy()


def test_shard_batch_splits_every_batch_into_equal_parts(monkeypatch):
    idx = torch.arange(10, 17)
    assert torch.equal(shard_batch(idx), idx)  # no process group
    dist = torch.distributed
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 3)
    parts = []
    for r in range(3):
        monkeypatch.setattr(dist, "get_rank", lambda *a, r=r: r)
        parts.append(shard_batch(idx))
    assert [len(p) for p in parts] == [3, 3, 3]
    assert sorted(torch.cat(parts).tolist()) == sorted([*range(10, 17), 10, 11])  # padded by repetition
    assert torch.equal(shard_batch(torch.tensor([4])), torch.tensor([4]))  # never empty
    batches = TensorBatches((torch.arange(20),), batch_size=8, seed=0)
    assert [len(b[0]) for b in batches] == [3, 3, 2] and len(batches) == 3  # batches of 8, 8, 4 on rank 2 of 3
    assert all(len(b[0]) == 8 for b in list(TensorBatches((torch.arange(20),), 8, seed=0, shard=False))[:2])


def _worker(tmp_path, name, devices, strategy, *extra, timeout=600):
    out = tmp_path / name
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(WORKER), "tm", str(out), str(devices), strategy, "2", *extra],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return {f.stem: torch.load(f, weights_only=False) for f in out.glob("*.pt")}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: one process, expert_draws=2 (both draws on it)."""
    return _worker(tmp_path_factory.mktemp("ddp"), "one", 1, "auto")


def _assert_same(ref, run, fit):
    for k in ("images", "labels", "lr"):
        torch.testing.assert_close(run["grads"][k], ref["grads"][k], rtol=1e-5, atol=1e-9)
    for a, b in zip(run["set"][:2], ref["set"][:2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert run["set"][2] == pytest.approx(ref["set"][2], rel=1e-6)
    assert run["last_draws_kept"] == ref["last_draws_kept"], fit


@pytest.mark.slow
def test_two_ddp_processes_give_the_one_process_gradient(tmp_path, one_process):
    """The issue's check: 2 CPU processes (gloo), one expert draw each, step with the synthetic-set
    gradient (images, soft labels, lr) of one process making both draws, and stay equal; a draw over
    the threshold is dropped on every rank alike."""
    two = _worker(tmp_path, "two", 2, "ddp")
    ref = one_process
    assert ref["keep_all_rank0"]["draws"] == [0, 1] and ref["keep_all_rank0"]["world"] == 1
    assert two["keep_all_rank0"]["draws"] == [0] and two["keep_all_rank1"]["draws"] == [1]
    assert two["keep_all_rank0"]["world"] == 2
    for fit in ("keep_all", "drop_one"):
        for r in (0, 1):
            _assert_same(ref[f"{fit}_rank0"], two[f"{fit}_rank{r}"], fit)
    assert ref["drop_one_rank0"]["last_draws_kept"] == 0.5


@pytest.mark.slow
def test_ddp_spawn_gives_the_one_process_gradient(tmp_path, one_process):
    spawn = _worker(tmp_path, "spawn", 2, "ddp_spawn", "keep_all")
    assert spawn["keep_all_rank1"]["draws"] == [1]
    for r in (0, 1):
        _assert_same(one_process["keep_all_rank0"], spawn[f"keep_all_rank{r}"], "keep_all")


def _train(tmp_path, run, *args, timeout=900):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LDD_CACHE_DIR": str(tmp_path / "cache"), "WANDB_MODE": "offline"}
    tiny = ["method.num_experts=2", "method.expert_train_epochs=3", "method.current_max_start_epoch=1",
            "method.max_start_epoch=2", "method.iterations=3", "method.syn_steps=5", "method.expert_draws=2",
            "net.width=8", "eval.epochs=20", "eval.num_eval=2", "eval.baselines=[]", "logger.wandb.enabled=false",
            "logger.image_every=0", "trainer.enable_progress_bar=false", "trainer.accelerator=cpu"]
    p = subprocess.run([sys.executable, "train.py", f"hydra.run.dir={run}", *tiny, *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


@pytest.mark.slow
def test_train_py_under_two_process_ddp(tmp_path):
    """``python train.py trainer.devices=2 trainer.strategy=ddp``: experts trained as DDP fits (written
    once, by rank 0), distillation with one expert draw per rank, evaluation as DDP fits; then a
    one-process distillation from the same cached experts ends with the same synthetic set."""
    ddp = tmp_path / "ddp"
    _train(tmp_path, ddp, "trainer.devices=2", "trainer.strategy=ddp")
    m = json.loads((ddp / "metrics.json").read_text())
    assert m["experts/n"] == 2 and 0.15 < m["experts/test_acc_mean"] <= 1.0, m  # 3 epochs of width 8: ~0.25
    assert m["eval/ConvNet/n_runs"] == 2 and 0.0 < m["eval/ConvNet/acc_mean"] <= 1.0, m
    assert m["distill/iterations"] == 3
    experts = list((tmp_path / "cache" / "experts").glob("*/expert_*.pt"))
    assert len(experts) == 2
    rank0, rank1 = (ddp / "train.log").read_text(), (ddp / "train_ddp_process_1.log").read_text()
    assert rank0.count("written to") == 2 and "written to" not in rank1 and "expert 1: 3 epochs" in rank1
    one = tmp_path / "one"
    _train(tmp_path, one, "stage=distill")
    a = torch.load(ddp / "distilled.pt", weights_only=False)
    b = torch.load(one / "distilled.pt", weights_only=False)
    torch.testing.assert_close(a["images"], b["images"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a["labels"], b["labels"], rtol=1e-5, atol=1e-6)
    assert a["lr"] == pytest.approx(b["lr"], rel=1e-6)


# --- statistics-matching recovery: batches split over the ranks --------------------------------------
def _run_worker(out, *args, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(WORKER), args[0], str(out), *map(str, args[1:])], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p


@pytest.mark.slow
def test_two_ddp_processes_recover_the_one_process_batches_bitwise(tmp_path):
    """Recovery of 3 batches (SRe2L) under 2 processes: rank r recovers batches r, r + 2 (rounds
    (0, 1) and (2,), one fit each), every rank ends with every batch, and the images, per-step
    histories and BN-loss measurements equal the one-process run's bitwise (CPU, gloo; W = 2 makes
    DDP's gradient average exact). Also when resuming from a finished batch, from the rounds'
    checkpoints, and from a one-process run's checkpoints (one batch per round: the first round
    starts afresh, the last resumes)."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    _run_worker(one, "recover", 1, "auto")
    p = _run_worker(two, "recover", 2, "ddp", one / "fresh")
    ref = torch.load(one / "fresh_rank0.pt", weights_only=False)
    assert len(ref["images"]) == 3 and [len(x) for x in ref["images"]] == [4, 4, 2]
    assert all(e < s for s, e in zip(ref["bn_start"], ref["bn_end"]))  # recovery did something
    assert [(h["batch"], h["step"]) for h in ref["history"]] == [(b, i) for b in range(3) for i in range(4)]
    for scenario, fits in (("fresh", 2), ("partial", 1), ("ckpt", 2), ("other_world", 2)):
        for r in (0, 1):
            got = torch.load(two / f"{scenario}_rank{r}.pt", weights_only=False)
            for a, b in zip(got["images"], ref["images"], strict=True):
                assert torch.equal(a, b), (scenario, r)
            for k in ("history", "bn_start", "bn_end", "bn_full", "per_start", "per_end"):
                assert got[k] == ref[k], (scenario, r, k)
        fits_before = {"fresh": 0, "partial": 2, "ckpt": 3, "other_world": 5}[scenario]
        assert got["fits"] - fits_before == fits, scenario  # rounds of two batches (one when one is left)
    assert sorted(d.name for d in (two / "fresh" / "checkpoints").iterdir()) == ["recover_000", "recover_002"]
    assert sorted(f.name for f in (two / "partial" / "recover").iterdir()) == [f"batch_00{b}.pt" for b in range(3)]
    assert "holds batches [0] (recovered under another number of processes)" in p.stderr + p.stdout


# --- GCond / SGDD: the classes of the matching loss split over the ranks ----------------------------
@pytest.mark.slow
def test_two_ddp_processes_condense_the_one_process_graph(tmp_path, shared_data):
    """GCond and SGDD on Cora, 4 epochs alternating structure and feature updates (structure terms on),
    under 2 processes (classes 0, 2, 4, 6 on rank 0, 1, 3, 5 on rank 1, the summed gradients of X' and
    of the generator / transport plan all-reduced) end with the one-process condensed graph. In float64
    (``precision=64-true``) to 1e-12: only the summation order differs (float32 agrees to ~1e-5 in X',
    Adam magnifying the rounding of near-zero gradients in the generator)."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    _run_worker(one, "graph", 1, "auto", "64-true", "gcond", "sgdd")
    _run_worker(two, "graph", 2, "ddp", "64-true", "gcond", "sgdd")
    for name in ("gcond", "sgdd"):
        ref = torch.load(one / f"{name}_rank0.pt", weights_only=False)
        assert ref["x"].dtype == torch.float64 and ref["classes"] is None and ref["skipped"] == 0
        ranks = [torch.load(two / f"{name}_rank{r}.pt", weights_only=False) for r in (0, 1)]
        assert [r["classes"] for r in ranks] == [[0, 2, 4, 6], [1, 3, 5]]
        assert torch.equal(ranks[0]["x"], ranks[1]["x"]) and torch.equal(ranks[0]["adj"], ranks[1]["adj"])
        got = ranks[0]
        torch.testing.assert_close(got["x"], ref["x"], rtol=0, atol=1e-12)
        torch.testing.assert_close(got["adj"], ref["adj"], rtol=0, atol=1e-6)  # A' is returned in float32
        assert got["losses"] == pytest.approx(ref["losses"], rel=1e-12) and got["skipped"] == 0, name
        assert got["warmup"] == ref["warmup"]  # SGDD's structure warm-up: the same on every rank


def test_a_run_destroys_the_process_group_it_leaves(tmp_path):
    """A gloo group still alive at interpreter exit can abort the process after its work is done
    (SIGABRT, ``terminate called without an active exception``; pytorch/pytorch#190489): the runner
    destroys it however the run ends, here with a config error raised inside the run; so does
    ``evaluate.py``'s evaluation, here of a missing result."""
    from hydra import compose, initialize_config_dir

    from lightning_dd.evaluate_run import evaluate_saved
    from lightning_dd.runner import run

    dist = torch.distributed
    try:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
        with pytest.raises(ConfigError, match="method.expert_draws: 1 expert draw"):
            run(_compose("experiment=datm_digits", f"paths.output_dir={tmp_path / 'out'}", "trainer.devices=2"))
        assert not dist.is_initialized()
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store2'}", rank=0, world_size=1)
        with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("evaluate", overrides=[f"result={tmp_path / 'missing.pt'}",
                                                 f"paths.output_dir={tmp_path / 'eval'}"])
        with pytest.raises(FileNotFoundError, match="missing.pt"):
            evaluate_saved(cfg)
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
