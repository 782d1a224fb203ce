"""A script the DDP tests run as a subprocess (``python tests/ddp_worker.py <what> <out> <devices> <strategy> ...``):
Lightning's ``ddp`` strategy relaunches this same script once per extra rank, so it must run as a
file, not inside pytest (``ddp_spawn`` works from it too).

``tm <out> <devices> <strategy> <expert_draws> [keep_all]``: trajectory matching on a tiny problem
(ConvNet width 8 on 8x8 images, 3 synthetic expert trajectories); every rank of every fit writes
``<out>/<fit>_rank<r>.pt``: the synthetic-set gradient of the first iteration (after the
all-reduce, as the optimizer steps with it), its draws and the set at the end (:func:`run_tm`).

``recover <out> <devices> <strategy> [<one-process fresh dir>]``: statistics-matching recovery of 3
batches (4, 4, 2 digits images, a tiny BN ConvNet teacher), fresh, resumed from a finished batch, from
round checkpoints, and (with the last argument) from a one-process run's checkpoints; every rank
writes ``<out>/<scenario>_rank<r>.pt`` (:func:`run_recover`).

``graph <out> <devices> <strategy> <precision> <method>...``: GCond / SGDD condensation of Cora for a few
epochs; every rank writes ``<out>/<method>_rank<r>.pt`` (:func:`run_graph`).
"""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, as for train.py
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/configs.py
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


class SaveFirstGradient(L.Callback):
    """Records the gradients the optimizer steps with at the first iteration and, at the end of the
    fit, writes what this rank saw to ``<out>/<tag>_rank<r>.pt`` (inside the worker process, so it
    works under ``ddp_spawn`` as under ``ddp``)."""

    def __init__(self, out: Path, tag: str):
        self.out, self.tag, self.grads = out, tag, None

    def on_before_optimizer_step(self, trainer, module, optimizer):
        if self.grads is None:
            self.grads = {n: (None if p.grad is None else p.grad.detach().clone())
                          for n, p in (("images", module.images), ("labels", module.labels), ("lr", module.syn_lr))}

    def on_train_end(self, trainer, module):
        kept = trainer.callback_metrics.get("distill/draws_kept")
        torch.save({"grads": self.grads, "world": trainer.world_size, "draws": list(module.local_draws()),
                    "set": module.current_set(), "last_draws_kept": None if kept is None else float(kept)},
                   self.out / f"{self.tag}_rank{trainer.global_rank}.pt")


def tm_problem(expert_draws: int, soft: bool = True, threshold: float = 10.0, meta_grad: str = "unroll"):
    """A tiny trajectory-matching module: 12 synthetic 3x8x8 images of 3 classes, 3 expert
    trajectories of 4 epochs (random walks from one init: the gradient only needs fixed targets)."""
    from lightning_dd.augment.dsa import DSA
    from lightning_dd.methods.images.trajectory_matching import TrajectoryMatching
    from lightning_dd.nets import FlatParams, build_net

    g = torch.Generator().manual_seed(0)
    net = build_net("ConvNet", 3, 3, (8, 8), width=8, depth=2)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    theta0 = FlatParams(net).flatten()
    trajs = [theta0 + torch.cumsum(0.05 * torch.randn(5, theta0.numel(), generator=g), 0) for _ in range(3)]
    images = torch.randn(12, 3, 8, 8, generator=g)
    labels = torch.randn(12, 3, generator=g) if soft else torch.arange(12) % 3
    from configs import method

    hp = method("datm", ipc=4, syn_steps=4, batch_syn=6, expert_epochs=2, min_start_epoch=0, current_max_start_epoch=2,
                max_start_epoch=3, expert_train_epochs=4, soft_labels=soft, lr_teacher=0.05, lr_img=10.0,
                threshold=threshold, meta_grad=meta_grad, expert_draws=expert_draws)
    return TrajectoryMatching(images, labels, trajs, net, hp, DSA(), seed=3)


def first_iteration_losses(expert_draws: int) -> list[float]:
    """The matching loss of each draw of iteration 0 (one process, no Trainer)."""
    from lightning_dd.methods.images.meta_grad import matching_loss_and_grads

    m = tm_problem(expert_draws)
    m.on_fit_start()
    out = []
    for d in range(expert_draws):
        expert, start, _, steps = m.sample_iteration(0, d)
        t = m.trajectories[expert]
        out.append(float(matching_loss_and_grads(m.fns, m.images, m.labels, m.syn_lr, t[start],
                                                 t[start + m.hp.expert_epochs], steps, m.dsa, mode="unroll")))
    return out


def fit_tm(out: Path, tag: str, devices: int, strategy: str, expert_draws: int, threshold: float, steps: int,
           meta_grad: str = "unroll"):
    """One fit of :func:`tm_problem`; every rank writes ``<out>/<tag>_rank<r>.pt``."""
    from lightning_dd.data.batches import StepLoader

    module = tm_problem(expert_draws, threshold=threshold, meta_grad=meta_grad)
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=steps, max_epochs=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[SaveFirstGradient(out, tag)])
    trainer.fit(module, StepLoader(steps, functools.partial(getattr, module, "global_step")))


def run_tm(out: Path, devices: int, strategy: str, expert_draws: int, both: bool = True) -> None:
    """``keep_all``: 2 iterations, all draws kept (threshold 10); ``drop_one`` (when ``both``): 1
    iteration with a threshold between the two lowest draw losses of iteration 0, so that a draw is
    dropped on whichever rank computed it, with the ``recompute`` meta-gradient (many partial
    backwards per draw: DDP's reducer would fail on them, were it active)."""
    fit_tm(out, "keep_all", devices, strategy, expert_draws, 10.0, 2)
    if both:
        losses = first_iteration_losses(expert_draws)
        fit_tm(out, "drop_one", devices, strategy, expert_draws, sum(sorted(losses)[:2]) / 2, 1, "recompute")
        torch.save(losses, out / "losses.pt")


def _rank() -> int:
    """This process's rank: Lightning's ``LOCAL_RANK`` in a relaunched process (one node), else 0."""
    return int(os.environ.get("LOCAL_RANK", 0))


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def recover_problem():
    """``(hp, dm, backbones, labels, lo, hi)``: 10 digits images of 10 classes in batches of 4, 4
    and 2, 4 steps each (checkpoints every 2), a ConvNet-8 teacher (random weights, BatchNorm
    statistics of the real training images), the same in every process."""
    from lightning_dd.data import DigitsDataModule
    from lightning_dd.methods.images.statistics_matching import Backbone, RecoverConfig, pixel_bounds
    from lightning_dd.nets import build_net

    dm = DigitsDataModule(cache_dir=None)
    dm.setup()
    torch.manual_seed(0)
    net = build_net("ConvNet", 1, 10, (8, 8), width=8, depth=2, norm="batchnorm").train()
    with torch.no_grad():
        for x in dm.train_images[:512].split(128):
            net(x)
    from configs import node

    hp = RecoverConfig.model_validate({**node("method", "sre2l")["recover"], **dict(
        iterations=4, batch=4, lr=0.1, r_bn=1.0, jitter=1, crop_scale=(0.5, 1.0), ckpt_every=2)})
    lo, hi = pixel_bounds(dm.preprocessing)
    return hp, dm, [Backbone(net.eval())], torch.arange(10), lo, hi


def run_recover(out: Path, devices: int, strategy: str, one_process: Path | None = None) -> None:
    """Scenarios, each :func:`recover_batches` into ``<out>/<scenario>`` and each rank's result in
    ``<out>/<scenario>_rank<r>.pt``: ``fresh``; ``partial`` (batch 1 finished: its file copied from
    ``fresh``); ``ckpt`` (``fresh`` again with its batch files deleted: every round from its last
    checkpoint); ``other_world`` (``one_process``'s checkpoints, batch files deleted: written one batch
    per round, so under several processes the first round starts afresh and the last resumes)."""
    import shutil

    from configs import CountingTrainerFactory
    from lightning_dd.methods.images.statistics_matching.recover import recover_batches

    hp, dm, backbones, labels, lo, hi = recover_problem()
    factory = CountingTrainerFactory(accelerator="cpu", devices=devices, strategy=strategy, enable_progress_bar=False)
    teacher = out.parent / "teacher.pt"  # the file the batches' settings name (one for all the test's runs)
    if _rank() == 0:  # before the first fit: the other ranks start there
        if not teacher.is_file():
            torch.save(backbones[0].net.state_dict(), teacher)
        if one_process is not None:
            shutil.copytree(one_process / "checkpoints", out / "other_world" / "checkpoints")

    def recover(scenario: str, resume: bool, run_dir: str | None = None) -> None:
        r = recover_batches(hp, dm, backbones, labels, lo, hi, out / (run_dir or scenario), seed=5, trainer=factory,
                            resume=resume, teacher_paths=[teacher])
        torch.save({**r, "fits": len(factory.stages)}, out / f"{scenario}_rank{_rank()}.pt")

    recover("fresh", False)
    if _rank() == 0:
        (out / "partial" / "recover").mkdir(parents=True)
        shutil.copy(out / "fresh" / "recover" / "batch_001.pt", out / "partial" / "recover")
    _barrier()
    recover("partial", True)
    _barrier()
    if _rank() == 0:
        for f in (out / "fresh" / "recover").glob("*.pt"):
            f.unlink()
    _barrier()
    recover("ckpt", True, "fresh")
    if one_process is not None:
        recover("other_world", True)


def graph_method(name: str):
    """Tiny GCond / SGDD settings for Cora: 4 epochs alternating structure and feature updates (1 + 1),
    3 outer x 2 inner steps, 16-wide generators, the structure terms on (GCond's smoothness ``alpha``,
    SGDD's OT on a 400-node subgraph and smoothness, 3 warm-up steps)."""
    from configs import method

    common = dict(epochs=4, outer_loop=3, inner_loop=2, adj_epochs=1, feat_epochs=1, lr_feat=1e-3, lr_adj=1e-3,
                  ckpt_every=0)
    if name == "gcond":
        return method("gcond", pge_hidden=16, alpha=0.1, **common)
    return method("sgdd", ignr_hidden=16, ot_rank=16, mx_size=400, warmup_epochs=3, **common)


def run_graph(out: Path, devices: int, strategy: str, precision: str, name: str) -> None:
    """Condense Cora with :func:`graph_method` ``name`` (seed 0) under ``devices`` processes at Lightning's
    ``precision``; every rank
    writes the condensed graph, the loss history and the skipped-update count to ``<out>/<name>_rank<r>.pt``."""
    from conftest import SHARED_DATA
    from lightning_dd.core.trainer import TrainerFactory
    from lightning_dd.data.graphs import GraphDataModule
    from lightning_dd.methods.graphs.graph_run import fit_condenser

    dm = GraphDataModule("cora", root=str(SHARED_DATA / "planetoid"))
    dm.setup()
    module = graph_method(name).condenser(dm.data, 0)
    factory = TrainerFactory(accelerator="cpu", devices=devices, strategy=strategy, precision=precision,
                             enable_progress_bar=False)
    cond, _ = fit_condenser(module, module.hp.epochs, factory)
    shard = None if module.shard is None else module.shard.cls.tolist()
    torch.save({"x": cond.x, "adj": cond.adj, "y": cond.y, "losses": module.epoch_losses, "classes": shard,
                "skipped": module.skipped_updates, "warmup": list(getattr(module, "warmup_losses", []))},
               out / f"{name}_rank{_rank()}.pt")


if __name__ == "__main__":
    what, out, devices, strategy, *rest = sys.argv[1:]
    if what == "tm":
        run_tm(Path(out), int(devices), strategy, int(rest[0]), both=rest[1:] != ["keep_all"])
    elif what == "recover":
        run_recover(Path(out), int(devices), strategy, Path(rest[0]) if rest else None)
    elif what == "graph":
        for name in rest[1:]:
            run_graph(Path(out), int(devices), strategy, rest[0], name)
    else:
        raise SystemExit(f"unknown worker {what!r}")
    from lightning_dd.core.trainer import release_process_group

    release_process_group()  # as train.py does: a gloo group alive at exit can abort the process (-6)
