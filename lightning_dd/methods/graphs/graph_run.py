"""The graph family on the method contract (:mod:`lightning_dd.methods.base`): condense a real graph
with GCond (arXiv 2110.07580, :class:`lightning_dd.methods.graphs.gcond.GCondMethod`) or SGDD (arXiv
2310.09192, :class:`lightning_dd.methods.graphs.sgdd.SGDDMethod`), or select a node coreset
(:class:`NodeCoresetMethod`: random, herding, k-center) or keep the full graph
(:class:`FullGraphMethod`); the result, a :class:`lightning_dd.results.CondensedGraph`, saves itself
as ``condensed.pt`` (:meth:`GraphMethod.save`); :meth:`GraphMethod.evaluate` judges it on the real
graph (:func:`lightning_dd.evaluate.graph.evaluate_graph_run`: GNNs across architectures, link
prediction / anomaly detection, the coreset baselines, the LED shift of SGDD Sec. 3).
``stage=condense`` stops after ``condensed.pt``.

Coresets (GCond Sec. 5.1 baselines): per class, as many real training nodes as the synthetic
graph has (GCond's label allocation), chosen at random, by herding (Welling 2009: greedily match
the class mean) or k-center (greedy farthest point from the class mean's nearest node) -- the
shared :func:`lightning_dd.training.coresets.herding` / ``k_center`` -- in the space of
propagated features ``A_hat^2 X``; the reduced graph is the subgraph the chosen nodes induce in
the real graph.

Deviations from the reference code: GCond's coreset baselines embed nodes with a trained GCN;
ours use the parameter-free ``A_hat^2 X`` (the condensation model's own features).
"""
from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import ClassVar, Literal

import torch
from pydantic import Field

from lightning_dd.core.config import ConfigError, NonNegInt, PositiveFloat, PositiveInt
from lightning_dd.data.graph_ops import dense_adjacency, propagate_sparse, synthetic_labels, training_view
from lightning_dd.data.protocols import GraphData
from lightning_dd.evaluate.graph import GraphEvalConfig, evaluate_graph_run
from lightning_dd.methods.base import Method, MethodOutput, RunContext
from lightning_dd.results import CondensedGraph
from lightning_dd.training.devices import require_ddp

log = logging.getLogger(__name__)

CORESETS = ("random", "herding", "kcenter")


def select_coreset(kind: str, h: torch.Tensor, y: torch.Tensor, per_class: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Indices ``(sum(per_class),)`` (into ``h``'s rows) of a per-class node coreset.

    Args:
        kind: random | herding | kcenter. h: ``(n, F)`` node embeddings; y: ``(n,)`` labels;
            per_class: ``(C,)`` number of nodes to pick in each class.

    Raises:
        ValueError: unknown kind, or a class with fewer nodes than asked.
    """
    from lightning_dd.training.coresets import herding, k_center

    if kind not in CORESETS:
        raise ValueError(f"coreset kind must be one of {CORESETS}, got {kind!r}")
    g = torch.Generator().manual_seed(seed)
    out = []
    for c, k in enumerate(per_class.tolist()):
        idx = (y == c).nonzero().squeeze(1)
        if k > len(idx):
            raise ValueError(f"class {c}: {k} nodes asked, {len(idx)} available")
        if k == 0:
            continue
        if kind == "random":
            out.append(idx[torch.randperm(len(idx), generator=g)[:k]])
        else:
            out.append(idx[(herding if kind == "herding" else k_center)(h[idx], k)])
    return torch.cat(out)


def induced_subgraph(data, nodes: torch.Tensor, method: str = "coreset", rate: float = 0.0) -> CondensedGraph:
    """The subgraph of ``data`` induced by ``nodes`` ``(n,)`` (``torch_geometric.utils.subgraph``)
    as a :class:`CondensedGraph` (binary ``(n, n)`` adjacency, real features and labels)."""
    from torch_geometric.utils import subgraph

    ei, _ = subgraph(nodes, data.edge_index, relabel_nodes=True, num_nodes=int(data.num_nodes))
    adj = dense_adjacency(ei, len(nodes))
    adj.fill_diagonal_(0)
    return CondensedGraph(data.x[nodes].clone(), adj, data.y[nodes].clone(), method=method, reduction_rate=rate)


def coreset_graph(kind: str, data, rate: float, nlayers: int = 2, seed: int = 0,
                  setting: str = "transductive") -> CondensedGraph:
    """A ``kind`` node coreset of ``data``'s training nodes of the size GCond's rate gives;
    herding / k-center embed the nodes on the graph ``setting`` lets condensation see (the whole
    graph, or the training subgraph when inductive)."""
    train = data.train_mask.nonzero().squeeze(1)
    k = int(data.y.max()) + 1
    per_class = torch.bincount(synthetic_labels(data.y[train], k, rate), minlength=k)
    if kind == "random":
        h = data.x[train]
    else:
        xv, eiv, nv, trv = training_view(data, setting)
        h = propagate_sparse(eiv, nv, xv, nlayers)[trv]
    pick = select_coreset(kind, h, data.y[train], per_class, seed)
    return induced_subgraph(data, train[pick], kind, rate)


def fit_condenser(module, epochs: int, make_trainer, ckpt_dir: str | Path | None = None, ckpt_every: int = 0,
                  resume_from: str | Path | None = None, loggers=None, callbacks=None) -> tuple[CondensedGraph, float]:
    """Fit a condensation module (:class:`lightning_dd.methods.graphs.gcond.GradientMatchingCondenser`) up
    to epoch ``epochs`` with ``make_trainer("condense", ...)`` (a
    :class:`lightning_dd.core.trainer.TrainerFactory`); returns the condensed graph and the
    seconds this call took.

    Args:
        ckpt_dir: with ``ckpt_every > 0``, Lightning's ``ModelCheckpoint(dirpath=ckpt_dir,
            save_last=True, every_n_epochs=ckpt_every)``, and ``ckpt_dir/last.ckpt`` is also written
            after the last epoch.
        resume_from: a checkpoint written so (``trainer.fit(ckpt_path=...)``): the run continues at
            its epoch (nothing to do when it already holds ``epochs`` epochs).
    """
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader

    t = time.perf_counter()
    callbacks = list(callbacks or [])
    if ckpt_dir is not None and ckpt_every > 0:
        callbacks.append(ModelCheckpoint(dirpath=str(ckpt_dir), save_last=True, every_n_epochs=ckpt_every))
    else:
        ckpt_dir = None
    trainer = make_trainer("condense", max_epochs=epochs, logger=loggers or False, callbacks=callbacks,
                           enable_checkpointing=ckpt_dir is not None, log_every_n_steps=10)
    trainer.fit(module, DataLoader([0], batch_size=None), ckpt_path=None if resume_from is None else str(resume_from))
    if ckpt_dir is not None and module.saved_epochs != len(module.epoch_losses):
        trainer.save_checkpoint(Path(ckpt_dir) / "last.ckpt")   # the last epoch, when not a multiple of ckpt_every
    return module.condensed(), time.perf_counter() - t


class GraphMethod(Method):
    """Base of the graph family: builds a reduced graph (:meth:`build`) from a
    :class:`lightning_dd.data.protocols.GraphData` DataModule, saves it as ``condensed.pt``
    (:meth:`save`); :meth:`evaluate` judges it on the real graph (``eval`` node: :class:`GraphEvalConfig`).

    Fields:
        reduction_rate: GCond's convention, ``N' = rate x`` (number of labeled training nodes).
        nlayers: propagation steps of ``A_hat^k X`` (condensation model / coreset embeddings).
        num_threads: torch threads while the method runs and evaluates (0: leave as is; tiny
            dense ops: one thread beats two busy ones).
        setting: transductive | inductive (GCond Sec. 3; what condensation may see).
    """

    stages: ClassVar[tuple[str, ...]] = ("all", "condense")
    eval_schema: ClassVar[type | None] = GraphEvalConfig
    data_protocol: ClassVar[type | None] = GraphData
    reduction_rate: float = Field(gt=0, le=1)
    nlayers: PositiveInt
    num_threads: NonNegInt
    setting: Literal["transductive", "inductive"]

    @contextlib.contextmanager
    def threads(self):
        """``torch.set_num_threads(num_threads)`` for the block (restored after)."""
        old = torch.get_num_threads()
        if self.num_threads:
            torch.set_num_threads(int(self.num_threads))
        try:
            yield
        finally:
            torch.set_num_threads(old)

    def build(self, ctx: RunContext[GraphData], data) -> tuple[CondensedGraph | None, dict, dict]:
        """``(reduced graph or None for the full graph, metrics, timings)``."""
        raise NotImplementedError

    def run(self, ctx: RunContext[GraphData]) -> MethodOutput:
        """Build the reduced graph (``result``; ``None``: the full graph) and its size metrics."""
        with self.threads():
            cond, metrics, timings = self.build(ctx, ctx.dm.data)
        if cond is not None:
            metrics.update({"condensed/nodes": cond.x.shape[0], "condensed/edge_weight_mean": float(cond.adj.mean())})
        return MethodOutput(result=cond, metrics=metrics, timings=timings)

    def save(self, ctx: RunContext[GraphData], out: MethodOutput) -> None:
        """``<out_dir>/condensed.pt``: the reduced graph, its ``meta`` holding the data node
        (``python -m lightning_dd.evaluate.graph`` rebuilds the real graph from it) and the method's
        fields (nothing for the full graph)."""
        cond = out.result
        if cond is None:
            return
        cond.meta.update(data=dict(ctx.data), method_cfg=self.model_dump())
        cond.save(ctx.out_dir / "condensed.pt")

    def evaluate(self, ctx: RunContext[GraphData], out: MethodOutput) -> dict:
        """:func:`lightning_dd.evaluate.graph.evaluate_graph_run` with ``ctx.eval``; the baselines'
        node coresets of this method's rate and setting (``A_hat^2 X`` embeddings, ``ctx.seed``)."""
        data = ctx.dm.data
        with self.threads():
            return evaluate_graph_run(
                ctx.eval, data, out.result, self.name,
                lambda b: coreset_graph(b, data, self.reduction_rate, 2, int(ctx.seed), self.setting),
                ctx.make_trainer, ctx.dm.task)


class NodeCoresetMethod(GraphMethod):
    """A node coreset of the training nodes (GCond Sec. 5.1 baselines), ``kind``: random | herding |
    kcenter (see the module docstring); the reduced graph is the induced subgraph."""

    kind: Literal["random", "herding", "kcenter"]

    def build(self, ctx, data):
        t0 = time.perf_counter()
        cond = coreset_graph(self.kind, data, self.reduction_rate, self.nlayers, int(ctx.seed), self.setting)
        return cond, {}, {"select_s": time.perf_counter() - t0}


class FullGraphMethod(GraphMethod):
    """The full real graph (a GNN trained on its labeled training nodes): the upper reference."""


    def build(self, ctx, data):
        return None, {}, {}


class CondensationMethod(GraphMethod):
    """Gradient-matching condensation (GCond Alg. 1; SGDD reuses it): the shared fields and run.
    A subclass names its LightningModule in ``module_class``.

    Fields: epochs; outer_loop / inner_loop (matching steps / model steps per epoch); lr_feat,
    lr_adj, lr_model (Adam lrs of ``X'``, the generator, the condensation model); adj_epochs /
    feat_epochs (structure updated in epochs ``e % (adj + feat) < adj``, features otherwise);
    reg_every_step (smoothness term on feature epochs too); inference_bn (the generator's batch norm
    when it builds the inner loop's and the condensed graph: ``batch`` statistics as GCond's
    ``PGE.inference``, ``running`` statistics as SGDD's ``GraphonLearner.inference``); ckpt_every (``checkpoints/last.ckpt``
    every N epochs, 0: none).
    """

    module_class: ClassVar[type | None] = None
    epochs: PositiveInt
    outer_loop: PositiveInt
    inner_loop: NonNegInt
    lr_feat: PositiveFloat
    lr_adj: PositiveFloat
    lr_model: PositiveFloat
    adj_epochs: NonNegInt
    feat_epochs: NonNegInt
    reg_every_step: bool
    inference_bn: Literal["batch", "running"]
    ckpt_every: NonNegInt

    def check(self, ctx: RunContext) -> None:
        """Raises ConfigError: ``adj_epochs + feat_epochs == 0``, or a strategy other than one device /
        DDP (:func:`lightning_dd.training.devices.require_ddp`; under DDP the classes split over the ranks)."""
        if self.adj_epochs + self.feat_epochs == 0:
            raise ConfigError("method.adj_epochs + method.feat_epochs must be > 0")
        require_ddp(ctx.make_trainer, f"graph condensation ({self.name})")

    def condenser(self, data, seed: int = 0):
        """A fresh condensation module on ``data`` (``torch.manual_seed(seed)`` first, as a run does)."""
        torch.manual_seed(seed)
        return self.module_class(data, self, seed)

    def build(self, ctx, data):
        module = self.condenser(data, int(ctx.seed))
        ckpt_dir = ctx.out_dir / "checkpoints"
        resume = ctx.resume_from(ckpt_dir / "last.ckpt", "condensation")
        cond, secs = fit_condenser(module, self.epochs, ctx.make_trainer, ckpt_dir, self.ckpt_every, resume,
                                   ctx.loggers)
        metrics = {"condense/resumed_from_epoch": module.start_epoch,
                   "condense/final_match_loss": module.epoch_losses[-1],
                   "condense/skipped_updates": module.skipped_updates}  # non-finite losses (expected 0)
        warm = getattr(module, "warmup_losses", None)  # SGDD's structure warm-up (not on resume)
        if warm:
            metrics["condense/warmup_loss_start"], metrics["condense/warmup_loss_end"] = warm[0], warm[-1]
        timings = {"condense_s": secs, "condense_epoch_s": secs / max(1, self.epochs - module.start_epoch)}
        return cond, metrics, timings


__all__ = ["CORESETS", "CondensationMethod", "FullGraphMethod", "GraphMethod", "NodeCoresetMethod", "coreset_graph",
           "fit_condenser", "induced_subgraph", "select_coreset"]
