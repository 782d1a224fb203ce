"""The graph-condensation run (``method.family: graph``): condense a real graph with GCond
(arXiv 2110.07580) or SGDD (arXiv 2310.09192), or select a node coreset (random, herding,
k-center) or keep the full graph; save ``condensed.pt``; evaluate it on the real graph across
GNN architectures (with link prediction / anomaly detection where asked), against the coreset
baselines, and measure its LED shift (SGDD Sec. 3). Called by :func:`lightning_dd.runner.run`
through ``METHODS['graph']``; returns ``{"result": None, "metrics": ..., "timings": ...}`` (the
evaluation is done here, the runner writes ``metrics.json`` and the logs).

Coresets (GCond Sec. 5.1 baselines): per class, as many real training nodes as the synthetic
graph has (GCond's label allocation), chosen at random, by herding (Welling 2009: greedily match
the class mean) or k-center (greedy farthest point from the class mean's nearest node), in the
space of propagated features ``A_hat^2 X``; the reduced graph is the subgraph the chosen nodes
induce in the real graph.
"""
from __future__ import annotations

import logging
import resource
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from lightning_dd.results import CondensedGraph

log = logging.getLogger(__name__)

CONDENSERS = ("gcond", "sgdd")
CORESETS = ("random", "herding", "kcenter")
BASELINES = CORESETS + ("full",)


def _condenser(name: str):
    from lightning_dd.methods.gcond import GCond
    from lightning_dd.methods.sgdd import SGDD

    return {"gcond": GCond, "sgdd": SGDD}[name]


def select_coreset(kind: str, h: torch.Tensor, y: torch.Tensor, per_class: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Indices (into ``h``'s rows) of a per-class node coreset.

    Args:
        kind: random | herding | kcenter. h: ``(n, F)`` node embeddings; y: ``(n,)`` labels;
            per_class: ``(C,)`` number of nodes to pick in each class.

    Raises:
        ValueError: unknown kind, or a class with fewer nodes than asked.
    """
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
            continue
        e = h[idx]
        mu = e.mean(0)
        chosen: list[int] = []
        if kind == "herding":
            acc = torch.zeros_like(mu)
            for t in range(k):
                d = (mu[None] - (acc[None] + e) / (t + 1)).norm(dim=1)
                if chosen:
                    d[chosen] = float("inf")
                i = int(d.argmin())
                chosen.append(i)
                acc += e[i]
        else:
            chosen.append(int((e - mu).norm(dim=1).argmin()))
            dist = (e - e[chosen[0]]).norm(dim=1)
            for _ in range(k - 1):
                i = int(dist.argmax())
                chosen.append(i)
                dist = torch.minimum(dist, (e - e[i]).norm(dim=1))
        out.append(idx[torch.tensor(chosen)])
    return torch.cat(out)


def induced_subgraph(data, nodes: torch.Tensor, method: str = "coreset", rate: float = 0.0) -> CondensedGraph:
    """The subgraph of ``data`` induced by ``nodes`` ``(n,)`` as a :class:`CondensedGraph`
    (binary adjacency, real features and labels)."""
    n = len(nodes)
    pos = torch.full((data.num_nodes,), -1, dtype=torch.long)
    pos[nodes] = torch.arange(n)
    ei = pos[data.edge_index]
    ei = ei[:, (ei >= 0).all(0)]
    adj = torch.zeros(n, n)
    adj[ei[0], ei[1]] = 1.0
    adj.fill_diagonal_(0)
    return CondensedGraph(data.x[nodes].clone(), adj, data.y[nodes].clone(), method=method, reduction_rate=rate)


def coreset_graph(kind: str, data, rate: float, nlayers: int = 2, seed: int = 0,
                  setting: str = "transductive") -> CondensedGraph:
    """A ``kind`` node coreset of ``data``'s training nodes of the size GCond's rate gives;
    herding / k-center embed the nodes on the graph ``setting`` lets condensation see (the whole
    graph, or the training subgraph when inductive)."""
    from lightning_dd.methods.gcond import propagate_sparse, synthetic_labels, training_view

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


def _eval_kwargs(ev) -> dict:
    return dict(epochs=int(ev.epochs), num_eval=int(ev.num_eval), seed=int(ev.seed), hidden=int(ev.hidden),
                dropout=float(ev.dropout), lr=float(ev.lr), weight_decay=float(ev.weight_decay),
                eval_every=int(ev.eval_every), lr_decay_at=float(ev.get("lr_decay_at") or 0) or None)


def evaluate_condensed(cond: CondensedGraph | None, data, ev, prefix: str, nets, task: str = "node") -> dict:
    """Flat metrics ``{prefix}/{net}/acc_mean|acc_std|n_runs|seconds`` (+ link / anomaly scores)."""
    from lightning_dd.evaluate.graph import evaluate_graph

    metrics = {}
    kw = _eval_kwargs(ev)
    if cond is None and ev.get("full_epochs"):
        kw["epochs"] = int(ev.full_epochs)
    for net in nets:
        r = evaluate_graph(cond, data, net, link_prediction=bool(ev.get("link_prediction", False)),
                           anomaly=task == "anomaly", **kw)
        metrics.update(r.metrics(prefix))
        log.info("%s/%s: %.2f ± %.2f %% over %d runs (%.0fs)", prefix, net, 100 * r.mean, 100 * r.std, len(r.accs),
                 r.seconds)
    return metrics


def run_graph(cfg: DictConfig, dm, out_dir: Path, loggers: list, callbacks: list) -> dict:
    """Condense (or select) ``dm.data``, save ``condensed.pt``, evaluate; see the module docstring.

    Config: ``method`` (name: gcond | sgdd | random | herding | kcenter | full, + the method's
    keys), ``eval`` (nets, num_eval, epochs, lr, weight_decay, hidden, dropout, eval_every,
    baselines, baseline_nets, link_prediction, led, full_epochs).

    Raises:
        ValueError: unknown method name or baseline; a data module without a graph.
    """
    from lightning_dd.evaluate.led import led_cdf, w1_between_cdfs

    hp = OmegaConf.to_container(cfg.method, resolve=True)
    name = hp.get("name")
    if name not in CONDENSERS + BASELINES:
        raise ValueError(f"method.name {name!r} is not a graph method; known: {CONDENSERS + BASELINES}")
    data = getattr(dm, "data", None)
    if data is None:
        raise ValueError("method.family=graph needs a graph data module (data=cora, _target_ GraphDataModule)")
    ev = cfg.eval
    for b in ev.get("baselines") or []:
        if b not in BASELINES:
            raise ValueError(f"eval.baselines: unknown graph baseline {b!r} (known: {BASELINES})")
    threads = int(hp.get("num_threads") or 0)
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)  # tiny dense ops: one thread beats two busy ones
    task = getattr(dm, "task", "node")
    rate = float(hp.get("reduction_rate", 0.5))
    setting = str(hp.get("setting", "transductive"))
    seed = int(cfg.seed)
    timings, metrics = {}, {}
    try:
        t0 = time.perf_counter()
        if name in CONDENSERS:
            from lightning_dd.methods.gcond import condense

            torch.manual_seed(seed)
            module = _condenser(name)(data, hp, seed)
            ckpt = out_dir / "checkpoints" / "last.ckpt"
            resume_from = cfg.get("ckpt_path") or (ckpt if cfg.get("resume") and ckpt.is_file() else None)
            if resume_from:
                log.info("resuming condensation from %s", resume_from)
            epochs = int(hp["epochs"])
            cond, secs = condense(module, epochs, loggers, callbacks, ckpt_path=ckpt,
                                  ckpt_every=int(hp.get("ckpt_every") or 0), resume_from=resume_from)
            timings["condense_s"] = secs
            timings["condense_epoch_s"] = secs / max(1, epochs - module.start_epoch)
            metrics["condense/resumed_from_epoch"] = module.start_epoch
            metrics["condense/final_match_loss"] = module.epoch_losses[-1]
            metrics["condense/skipped_updates"] = module.skipped_updates  # non-finite losses (expected 0)
            warm = getattr(module, "warmup_losses", None)  # SGDD's structure warm-up (not on resume)
            if warm:
                metrics["condense/warmup_loss_start"], metrics["condense/warmup_loss_end"] = warm[0], warm[-1]
        elif name in CORESETS:
            cond = coreset_graph(name, data, rate, int(hp.get("nlayers", 2)), seed, setting)
            timings["select_s"] = time.perf_counter() - t0
        else:
            cond = None
        if cond is not None:
            cond.meta.update(data=OmegaConf.to_container(cfg.data, resolve=True), method_cfg=hp)
            cond.save(out_dir / "condensed.pt")
            metrics.update({"condensed/nodes": cond.x.shape[0], "condensed/edge_weight_mean": float(cond.adj.mean())})
        if cfg.stage != "all":
            return {"result": None, "metrics": metrics, "timings": timings}

        t0 = time.perf_counter()
        nets = list(ev.nets)
        metrics.update(evaluate_condensed(cond, data, ev, "eval", nets, task))
        timings["eval_s"] = time.perf_counter() - t0

        baselines = {}
        t0 = time.perf_counter()
        base_nets = list(ev.get("baseline_nets") or nets)
        for b in ev.get("baselines") or []:
            if b == name:
                continue
            bg = None if b == "full" else coreset_graph(b, data, rate, 2, seed, setting)
            baselines[b] = bg
            metrics.update(evaluate_condensed(bg, data, ev, f"baseline/{b}", base_nets, task))
        timings["baselines_s"] = time.perf_counter() - t0
        for net in nets:
            if f"baseline/random/{net}/acc_mean" in metrics:
                metrics[f"eval/{net}/improvement_over_random"] = (metrics[f"eval/{net}/acc_mean"]
                                                                  - metrics[f"baseline/random/{net}/acc_mean"])

        if ev.get("led", True):
            t0 = time.perf_counter()
            grid = torch.linspace(0, 2, 2001, dtype=torch.float64)
            real_cdf = led_cdf(data.edge_index, data.x, grid)
            # the full graph is the original: its LED shift is 0 by definition
            metrics["led_shift"] = 0.0 if cond is None else w1_between_cdfs(real_cdf, led_cdf(cond.adj, cond.x, grid), grid)
            for b, bg in baselines.items():
                if bg is not None:
                    metrics[f"baseline/{b}/led_shift"] = w1_between_cdfs(real_cdf, led_cdf(bg.adj, bg.x, grid), grid)
            timings["led_s"] = time.perf_counter() - t0
        metrics["memory/peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    finally:
        torch.set_num_threads(old_threads)
    return {"result": None, "metrics": metrics, "timings": timings}


__all__ = ["coreset_graph", "evaluate_condensed", "induced_subgraph", "run_graph", "select_coreset"]
