"""Evaluation of a condensed graph (GCond, arXiv 2110.07580, Sec. 5; SGDD, arXiv 2310.09192,
Sec. 5): train a fresh GNN on the condensed graph ``(X', A', y')``, select the epoch by accuracy
on the real graph's validation nodes, report accuracy on its test nodes; several seeds, mean ±
std, across architectures. The same trainer runs the full-graph reference (loss on the real
training nodes only) and the node-coreset baselines (induced subgraphs).

Other tasks, from the network trained on the condensed graph (weights at the best validation
epoch):

* link prediction on the real graph (SGDD, Sec. 5): nodes embedded by the network's hidden layer
  on the real graph, an edge scored by the cosine of its end points' embeddings; AUC of all real
  edges against as many uniformly drawn non-edges (``torch_geometric.utils.negative_sampling``,
  seeded);
* anomaly detection (fraud graphs, binary labels): AUC of the predicted anomaly probability and
  macro-F1 of the arg-max prediction on the test nodes.

:func:`evaluate_graph_run` is the whole judgement of a graph method's result (what
:meth:`lightning_dd.methods.graphs.graph_run.GraphMethod.evaluate` returns); its ``eval`` node is
:class:`GraphEvalConfig` (``conf/graph/cora_eval.yaml``).

Deviations from the reference code: GCond's ``fit_with_val`` is followed (lr / 10 with a fresh
Adam at half the epochs); link prediction uses no trained decoder (cosine of embeddings).
"""
from __future__ import annotations

import copy
import logging
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from pydantic import Field

from lightning_dd.core.config import Fraction, NonNegFloat, PositiveFloat, PositiveInt, Typed
from lightning_dd.evaluate.student import EvalResult
from lightning_dd.nets.gnn import GNN, dense_to_edges
from lightning_dd.quiet import quiet_lightning
from lightning_dd.results import CondensedGraph

log = logging.getLogger(__name__)

GNNKind = Literal["GCN", "SGC", "APPNP", "ChebNet", "GraphSAGE", "MLP"]


class GraphEvalConfig(Typed):
    """The ``eval`` node of the graph family; ``conf/graph/cora_eval.yaml`` holds its values (no defaults here).

    Fields: nets (GNNs trained on the condensed graph); num_eval (seeds ``seed ..``); epochs;
    full_epochs (epochs of the full-graph baseline, None: ``epochs``); lr, weight_decay (Adam);
    lr_decay_at (fraction of the epochs after which lr drops 10x with a fresh Adam, 0: constant);
    hidden, dropout; eval_every (real-graph validation every N epochs); baselines (random |
    herding | kcenter | full); baseline_nets (None: ``nets``); link_prediction; led (LED shift).
    """

    nets: list[GNNKind] = Field(min_length=1)
    num_eval: PositiveInt
    epochs: PositiveInt
    full_epochs: PositiveInt | None
    lr: PositiveFloat
    weight_decay: NonNegFloat
    lr_decay_at: Fraction
    hidden: PositiveInt
    dropout: float = Field(ge=0, lt=1)
    eval_every: PositiveInt
    seed: int
    baselines: list[Literal["random", "herding", "kcenter", "full"]]
    baseline_nets: list[GNNKind] | None
    link_prediction: bool
    led: bool


@dataclass
class GraphEvalResult(EvalResult):
    """Accuracies per seed plus other per-seed scores (``extra[name] = [...]``, e.g. ``link_auc``)."""

    extra: dict = field(default_factory=dict)

    def metrics(self, prefix: str) -> dict[str, float]:
        m = super().metrics(prefix)
        for k, v in self.extra.items():
            m[f"{prefix}/{self.net}/{k}_mean"] = float(np.mean(v))
            m[f"{prefix}/{self.net}/{k}_std"] = float(np.std(v))
        return m


class GraphStudentModule(L.LightningModule):
    """Full-batch training of ``net`` on a training graph; every ``eval_every`` steps (and at the
    last), accuracy on the real graph's val/test nodes; keeps the test accuracy and the weights
    at the best val accuracy.

    Args:
        net: a fresh :class:`GNN`. x ``(n, F)``, edge_index ``(2, E)``, edge_weight ``(E,) | None``,
            y ``(n,)``: the training graph; train_idx: nodes whose loss counts (None: all).
        real: the real graph (``Data`` with masks). lr, weight_decay: Adam settings.
        decay_step: at this step the lr drops to ``lr / 10`` and Adam restarts (its moments
            cleared): GCond's ``fit_with_val``, which builds a new Adam at ``train_iters // 2``
            (arXiv 2110.07580, code of Sec. 5). None: constant lr.
    """

    def __init__(self, net: GNN, x, edge_index, edge_weight, y, real, train_idx=None, lr: float = 0.01,
                 weight_decay: float = 5e-4, eval_every: int = 1, decay_step: int | None = None):
        super().__init__()
        self.net, self.real, self.lr, self.weight_decay = net, real, lr, weight_decay
        self.x, self.ei, self.w, self.y, self.train_idx = x, edge_index, edge_weight, y, train_idx
        self.eval_every, self.decay_step = eval_every, decay_step
        self.best_val, self.test_at_best, self.best_state = -1.0, 0.0, None

    def on_fit_start(self):
        if self.x.device != self.device:  # the graphs are plain attributes: follow the accelerator
            move = (lambda t: None if t is None else t.to(self.device))
            self.x, self.ei, self.w, self.y, self.train_idx = map(move, (self.x, self.ei, self.w, self.y, self.train_idx))
            self.real = self.real.clone().to(self.device)

    def training_step(self, batch, batch_idx):
        if self.decay_step and self.global_step == self.decay_step:
            opt = self.optimizers().optimizer
            opt.state.clear()
            for group in opt.param_groups:
                group["lr"] = self.lr * 0.1
        out = self.net(self.x, self.ei, self.w)
        if self.train_idx is not None:
            return F.cross_entropy(out[self.train_idx], self.y[self.train_idx])
        return F.cross_entropy(out, self.y)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        step = self.global_step
        if step % self.eval_every and step != self.trainer.max_steps:
            return
        self.net.eval()
        with torch.no_grad():
            r = self.real
            pred = self.net(r.x, r.edge_index).argmax(1)
            val = (pred[r.val_mask] == r.y[r.val_mask]).float().mean().item()
            test = (pred[r.test_mask] == r.y[r.test_mask]).float().mean().item()
        self.net.train()
        if val > self.best_val:
            self.best_val, self.test_at_best = val, test
            self.best_state = copy.deepcopy(self.net.state_dict())

    def configure_optimizers(self):
        return torch.optim.Adam(self.net.parameters(), lr=self.lr, weight_decay=self.weight_decay)


def train_gnn(x, edge_index, edge_weight, y, real, arch: str = "GCN", train_idx=None, epochs: int = 600,
              seed: int = 0, hidden: int = 256, dropout: float = 0.5, lr: float = 0.01, weight_decay: float = 5e-4,
              eval_every: int = 1, accelerator: str = "cpu", lr_decay_at: float | None = 0.5,
              make_trainer=None) -> GraphStudentModule:
    """Train one fresh ``arch`` network for ``epochs`` full-batch steps; returns the module
    (``test_at_best``, ``best_state``: weights at the best real-validation accuracy; its ``net``
    back on the CPU). ``lr_decay_at``: fraction of ``epochs`` after which the lr drops 10x with a
    fresh Adam (GCond's protocol: 0.5); None or 0: constant lr. ``make_trainer``: the run's
    :class:`lightning_dd.core.trainer.TrainerFactory` (default: one on ``accelerator``)."""
    from lightning_dd.core.trainer import TrainerFactory

    quiet_lightning()
    L.seed_everything(seed, verbose=False)
    k = int(real.y.max()) + 1
    net = GNN(arch, real.x.shape[1], k, hidden=hidden, dropout=dropout)
    decay_step = int(epochs * lr_decay_at) if lr_decay_at else None
    module = GraphStudentModule(net, x, edge_index, edge_weight, y, real, train_idx, lr, weight_decay, eval_every,
                                decay_step)
    make = make_trainer or TrainerFactory(accelerator=accelerator, enable_progress_bar=False)
    fit = make("evaluate", max_steps=epochs, max_epochs=-1, enable_progress_bar=False)
    fit.fit(module, DataLoader(range(epochs), batch_size=None))
    if module.best_state is not None:
        net.load_state_dict(module.best_state)
    net.cpu().eval()
    return module


def check_condensed(cond: CondensedGraph, real) -> None:
    """Raises ValueError: invalid ``cond`` (see :meth:`CondensedGraph.validate`), or feature /
    class counts that differ from ``real``'s."""
    cond.validate()
    if cond.x.shape[1] != real.x.shape[1]:
        raise ValueError(f"condensed features have {cond.x.shape[1]} dims, the real graph {real.x.shape[1]}")
    k = int(real.y.max()) + 1
    if int(cond.y.max()) >= k:
        raise ValueError(f"condensed labels reach {int(cond.y.max())}, the real graph has {k} classes")


def evaluate_graph(cond: CondensedGraph | None, real, arch: str = "GCN", epochs: int = 600, num_eval: int = 5,
                   seed: int = 0, hidden: int = 256, dropout: float = 0.5, lr: float = 0.01,
                   weight_decay: float = 5e-4, eval_every: int = 1, accelerator: str = "cpu",
                   link_prediction: bool = False, anomaly: bool = False,
                   lr_decay_at: float | None = 0.5, make_trainer=None) -> GraphEvalResult:
    """Test accuracy (at the best real-validation epoch) of ``num_eval`` fresh ``arch`` networks
    trained on ``cond`` (``None``: the full real graph, loss on its training nodes); seeds
    ``seed .. seed+num_eval-1``; the lr drops 10x after ``lr_decay_at`` of the epochs (GCond's
    protocol, see :class:`GraphStudentModule`). Optionally per-seed ``link_auc`` and ``anomaly_auc`` /
    ``anomaly_macro_f1`` in ``extra``. ``make_trainer``: see :func:`train_gnn`.

    Raises:
        ValueError: see :func:`check_condensed`.
    """
    if cond is not None:
        check_condensed(cond, real)
        ei, w = dense_to_edges(cond.adj)
        x, y, train_idx = cond.x, cond.y, None
    else:
        x, ei, w, y = real.x, real.edge_index, None, real.y
        train_idx = real.train_mask.nonzero().squeeze(1)
    accs, extra, t0 = [], {}, time.perf_counter()
    for r in range(num_eval):
        m = train_gnn(x, ei, w, y, real, arch, train_idx, epochs, seed + r, hidden, dropout, lr, weight_decay,
                      eval_every, accelerator, lr_decay_at, make_trainer)
        accs.append(m.test_at_best)
        if link_prediction:
            extra.setdefault("link_auc", []).append(link_prediction_auc(m.net, real, seed=seed + r))
        if anomaly:
            for k, v in anomaly_scores(m.net, real).items():
                extra.setdefault(k, []).append(v)
    return GraphEvalResult(arch, accs, time.perf_counter() - t0, extra)


def evaluate_condensed(cond: CondensedGraph | None, data, ev: GraphEvalConfig, prefix: str, nets, task: str = "node",
                       make_trainer=None) -> dict:
    """Flat metrics ``{prefix}/{net}/acc_mean|acc_std|n_runs|seconds`` (+ link / anomaly scores) of
    ``cond`` (None: the full graph, ``ev.full_epochs`` epochs) for each net in ``nets``."""
    metrics = {}
    kw = dict(epochs=ev.epochs, num_eval=ev.num_eval, seed=ev.seed, hidden=ev.hidden, dropout=ev.dropout, lr=ev.lr,
              weight_decay=ev.weight_decay, eval_every=ev.eval_every, lr_decay_at=ev.lr_decay_at or None)
    if cond is None and ev.full_epochs:
        kw["epochs"] = ev.full_epochs
    for net in nets:
        r = evaluate_graph(cond, data, net, link_prediction=ev.link_prediction, anomaly=task == "anomaly",
                           make_trainer=make_trainer, **kw)
        metrics.update(r.metrics(prefix))
        log.info("%s/%s: %.2f ± %.2f %% over %d runs (%.0fs)", prefix, net, 100 * r.mean, 100 * r.std, len(r.accs),
                 r.seconds)
    return metrics


def evaluate_graph_run(ev: GraphEvalConfig, data, cond: CondensedGraph | None, own: str,
                       baseline_graph: Callable[[str], CondensedGraph], make_trainer=None, task: str = "node") -> dict:
    """Everything a graph method's result is judged by: ``eval/<net>/...`` of ``cond`` (None: the
    full graph) over ``ev.nets``; ``baseline/<b>/<net>/...`` for each of ``ev.baselines`` but the
    method's own (``own``): ``full`` is the real graph, the others ``baseline_graph(b)`` (the node
    coresets of the method's rate, GCond Sec. 5.1, built by the method's family); ``eval/<net>/
    improvement_over_random``; ``led_shift`` and ``baseline/<b>/led_shift`` (SGDD Sec. 3, the full
    graph's is 0); ``timings/baselines_s``, ``timings/led_s``, ``memory/peak_rss_mib``."""
    from lightning_dd.evaluate.led import led_cdf, w1_between_cdfs

    nets = list(ev.nets)
    metrics = evaluate_condensed(cond, data, ev, "eval", nets, task, make_trainer)
    baselines = {}
    t0 = time.perf_counter()
    for b in ev.baselines:
        if b == own:
            continue
        bg = None if b == "full" else baseline_graph(b)
        baselines[b] = bg
        b_nets = list(ev.baseline_nets or nets)
        metrics.update(evaluate_condensed(bg, data, ev, f"baseline/{b}", b_nets, task, make_trainer))
    metrics["timings/baselines_s"] = time.perf_counter() - t0
    for net in nets:
        if f"baseline/random/{net}/acc_mean" in metrics:
            metrics[f"eval/{net}/improvement_over_random"] = (metrics[f"eval/{net}/acc_mean"]
                                                              - metrics[f"baseline/random/{net}/acc_mean"])
    if ev.led:
        t0 = time.perf_counter()
        grid = torch.linspace(0, 2, 2001, dtype=torch.float64)
        real_cdf = led_cdf(data.edge_index, data.x, grid)
        # the full graph is the original: its LED shift is 0 by definition
        metrics["led_shift"] = 0.0 if cond is None else w1_between_cdfs(real_cdf, led_cdf(cond.adj, cond.x, grid), grid)
        for b, bg in baselines.items():
            if bg is not None:
                metrics[f"baseline/{b}/led_shift"] = w1_between_cdfs(real_cdf, led_cdf(bg.adj, bg.x, grid), grid)
        metrics["timings/led_s"] = time.perf_counter() - t0
    metrics["memory/peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return metrics


@torch.no_grad()
def embed(net: GNN, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
    """Node embeddings ``(N, hidden)``: the output of ``net``'s first layer (before the ReLU);
    for single-layer nets (SGC) their logits."""
    if net.kind in ("MLP", "APPNP"):
        return net.layers[0](x)
    if len(net.layers) == 1:
        return net(x, edge_index)
    if net.kind == "GraphSAGE":
        return net.layers[0](x, edge_index)
    return net.layers[0](x, edge_index, None)


def link_prediction_auc(net: GNN, real, num_neg: int | None = None, seed: int = 0) -> float:
    """AUC of cosine scores of the real graph's edges (each undirected edge once) against
    ``num_neg`` (default: as many as edges) uniformly drawn distinct non-edges
    (``torch_geometric.utils.negative_sampling``, Python's RNG seeded with ``seed`` and restored),
    with ``net``'s embeddings of the real graph (no trained link decoder: embeddings of a network
    trained on the condensed graph only).

    Raises:
        RuntimeError: the sampler found fewer non-edges than asked (a near-complete graph)."""
    import random

    from sklearn.metrics import roc_auc_score
    from torch_geometric.utils import negative_sampling

    z = F.normalize(embed(net, real.x, real.edge_index), dim=1)
    ei = real.edge_index[:, real.edge_index[0] < real.edge_index[1]]
    num_neg = num_neg or ei.shape[1]
    state = random.getstate()
    random.seed(seed)
    try:
        neg = negative_sampling(real.edge_index, num_nodes=real.num_nodes, num_neg_samples=2 * num_neg,
                                force_undirected=True)
    finally:
        random.setstate(state)
    neg = neg[:, neg[0] < neg[1]]
    if neg.shape[1] != num_neg:
        raise RuntimeError(f"link prediction: {neg.shape[1]} non-edges sampled, {num_neg} asked")
    pos_s = (z[ei[0]] * z[ei[1]]).sum(1)
    neg_s = (z[neg[0]] * z[neg[1]]).sum(1)
    labels = np.r_[np.ones(len(pos_s)), np.zeros(len(neg_s))]
    return float(roc_auc_score(labels, torch.cat([pos_s, neg_s]).numpy()))


def anomaly_scores(net: GNN, real) -> dict[str, float]:
    """Fraud/anomaly detection on the real test nodes (labels 0 normal / 1 anomalous):
    ``anomaly_auc`` of the softmax probability of class 1, ``anomaly_macro_f1`` of the arg-max.

    Raises:
        ValueError: the graph is not binary."""
    from sklearn.metrics import f1_score, roc_auc_score

    if int(real.y.max()) != 1:
        raise ValueError(f"anomaly detection needs binary labels, got {int(real.y.max()) + 1} classes")
    with torch.no_grad():
        out = net(real.x, real.edge_index)
    m = real.test_mask
    y = real.y[m].numpy()
    p = torch.softmax(out[m], 1)[:, 1].numpy()
    auc = float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else float("nan")
    return {"anomaly_auc": auc, "anomaly_macro_f1": float(f1_score(y, out[m].argmax(1).numpy(), average="macro"))}


def full_graph_condensed(real) -> CondensedGraph:
    """The whole real graph with dense adjacency, every node labeled (for small graphs in tests;
    the full-graph *baseline* is ``evaluate_graph(None, real)``, trained on the training nodes)."""
    from lightning_dd.data.graph_ops import dense_adjacency

    adj = dense_adjacency(real.edge_index, real.num_nodes)
    adj.fill_diagonal_(0)
    return CondensedGraph(real.x, adj, real.y, method="full", reduction_rate=1.0)


__all__ = ["GraphEvalConfig", "GraphEvalResult", "GraphStudentModule", "anomaly_scores", "check_condensed", "embed",
           "evaluate_condensed", "evaluate_graph", "evaluate_graph_run", "full_graph_condensed", "link_prediction_auc",
           "train_gnn"]


def main(argv=None) -> dict:
    """``python -m lightning_dd.evaluate.graph RUN/condensed.pt --nets GCN SGC ...``: evaluate a
    saved condensed graph on the real graph it was condensed from (``cond.meta['data']``, its
    ``root`` re-pointed at ``--data-dir/planetoid`` when given); prints and returns flat metrics
    ``eval/<net>/acc_mean`` etc. (also written to ``--out`` as JSON)."""
    import argparse
    import json

    from lightning_dd.data.graphs import GraphDataModule

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("condensed")
    p.add_argument("--nets", nargs="+", default=["GCN"])
    p.add_argument("--num-eval", type=int, default=5)
    p.add_argument("--epochs", type=int, default=600)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--lr-decay-at", type=float, default=0.5, help="fraction of epochs where lr drops 10x (0: never)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--link-prediction", action="store_true")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    cond = CondensedGraph.load(a.condensed)
    data_cfg = dict(cond.meta.get("data") or {"name": "cora"})
    data_cfg.pop("_target_", None)
    if a.data_dir:
        data_cfg["root"] = f"{a.data_dir}/planetoid" if data_cfg.get("format", "planetoid") == "planetoid" else a.data_dir
    dm = GraphDataModule(**data_cfg)
    dm.setup()
    metrics = {}
    for net in a.nets:
        r = evaluate_graph(cond, dm.data, net, epochs=a.epochs, num_eval=a.num_eval, eval_every=a.eval_every,
                           lr_decay_at=a.lr_decay_at or None,
                           link_prediction=a.link_prediction, anomaly=dm.task == "anomaly")
        metrics.update(r.metrics("eval"))
        print(f"{net:10s} {100 * r.mean:6.2f} ± {100 * r.std:5.2f} %  ({len(r.accs)} runs, {r.seconds:.0f} s)", flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(metrics, indent=1, sort_keys=True))
    return metrics


if __name__ == "__main__":
    main()
