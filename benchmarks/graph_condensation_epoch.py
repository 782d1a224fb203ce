"""Seconds per condensation epoch, GCond (arXiv 2110.07580) and SGDD (arXiv 2310.09192), against
the epoch's floor measured in the same run, ratio printed.

Default: the real Cora graph with the paper-size method configs (conf/method/{gcond,sgdd}.yaml:
20 outer x 15 inner steps, reduction rate 0.5 -> 70 nodes). ``--quick``: a random 300-node,
4-class graph (no data needed) with 4 outer x 3 inner steps and narrow generators.

Per method it times a structure-update epoch (epoch 0) and a feature-update epoch (epoch 10)
separately (best of ``--repeat`` after one warm-up), plus the setup (real-graph propagation; SGDD:
the original Laplacian's eigen-decomposition) and SGDD's structure warm-up (its first
``--warmup-steps`` timed, the whole extrapolated).

The floor of an epoch (:func:`floor_epoch`): the same loop (fresh SGC, ``outer_loop`` updates of
the same side -- ``X'`` or the generator -- with the inner loop's ``inner_loop`` SGC steps between
them) with the gradient matching replaced by what any training on the condensed graph needs: the
generator's ``A' = g(X')``, the SGC forward ``A'_hat^2 X' W + b`` on the condensed graph and its
cross-entropy backward to the updated side, plus the real-graph forward ``H W + b`` (the logits of
the real training nodes, which the matching's real-side gradients start from). The ratio
epoch / floor is the price of the matching itself (per-class gradients on both sides, the cosine
distance, SGDD's structure terms) over that.

Also a baseline of the closed-form per-class gradients: the real graph's matching gradients by
autograd (one backward per class, as GCond's code does) against the closed form used here.

    LDD_DATA_DIR=../shared/data python benchmarks/graph_condensation_epoch.py [--quick] [--threads 1] [--repeat 3] [--warmup-steps 20]
"""
from __future__ import annotations

import argparse
import copy
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QUICK = {"outer_loop": 4, "inner_loop": 3, "pge_hidden": 32, "ignr_hidden": 32, "ot_rank": 32,
         "warmup_epochs": 5}


def random_graph(n: int = 300, feats: int = 64, classes: int = 4, train_per_class: int = 20, seed: int = 0):
    """A connected random graph with class structure (``--quick``): a ring plus stochastic-block
    edges (p_in 0.04, p_out 0.004), features = class mean + noise, ``train_per_class`` labeled
    nodes per class. Returns a ``torch_geometric`` ``Data`` with ``x (n, feats)``, ``y (n,)``,
    ``edge_index (2, E)`` undirected, ``train_mask``/``val_mask``/``test_mask``."""
    import torch
    from torch_geometric.data import Data
    from torch_geometric.utils import to_undirected

    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    same = y[:, None] == y[None, :]
    p = torch.where(same, torch.tensor(0.04), torch.tensor(0.004))
    src, dst = (torch.rand(n, n, generator=g) < p).triu(1).nonzero().T
    ring = torch.arange(n)
    ei = to_undirected(torch.cat([torch.stack([src, dst]), torch.stack([ring, (ring + 1) % n])], 1), num_nodes=n)
    x = torch.randn(classes, feats, generator=g)[y] + torch.randn(n, feats, generator=g)
    x = x.clamp(min=0)
    x = x / x.sum(1, keepdim=True)                     # row-normalized, as NormalizeFeatures
    train = torch.zeros(n, dtype=torch.bool)
    train[: classes * train_per_class] = True
    test = ~train
    return Data(x=x, y=y, edge_index=ei, train_mask=train, val_mask=torch.zeros_like(train), test_mask=test,
                num_nodes=n)


def floor_epoch(module, epoch: int) -> None:
    """One epoch of the floor (see the module doc) on ``module`` (a GCond/SGDD condensation
    module whose ``optimizers()`` returns its two optimizers): the structure side is updated when
    ``epoch`` is a structure epoch of the method's schedule, else ``X'``."""
    import torch
    import torch.nn.functional as F

    hp = module.hp
    update_adj = epoch % (hp.adj_epochs + hp.feat_epochs) < hp.adj_epochs
    opt_feat, opt_adj = module.optimizers()
    opt = opt_adj if update_adj else opt_feat
    module.feat.requires_grad_(not update_adj)
    for p in module.generator_net.parameters():
        p.requires_grad_(update_adj)
    w, b = module.init_model()
    opt_model = torch.optim.Adam([w, b], lr=hp.lr_model)
    for ol in range(hp.outer_loop):
        module.generator_net.train()
        h_syn = module.propagate(module.adjacency(module.feat), module.feat)
        wd, bd = w.detach(), b.detach()
        with torch.no_grad():
            module.h_real @ wd + bd                   # the real-graph forward the matching starts from
        loss = F.cross_entropy(h_syn @ wd + bd, module.y_syn)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if ol == hp.outer_loop - 1:
            break
        with torch.no_grad():
            module.generator_net.eval()
            h_in = module.propagate(module.adjacency(module.feat), module.feat)
        for _ in range(hp.inner_loop):
            opt_model.zero_grad()
            F.cross_entropy(h_in @ w + b, module.y_syn).backward()
            opt_model.step()


def detach_from_trainer(module):
    """Run ``module``'s epochs outside a Trainer (no Lightning overhead in either row): its own
    optimizers, plain ``backward``, no logging."""
    opts = module.configure_optimizers()
    module.optimizers = lambda: opts
    module.manual_backward = lambda loss: loss.backward()
    module.log_dict = lambda *a, **k: None
    return module


def best_of(fns, repeat: int, sync=None) -> list[float]:
    """Seconds of the fastest of ``repeat`` calls of each of ``fns`` after one warm-up call each,
    the calls alternating (so that load from other processes reaches every row alike); ``sync``
    (e.g. ``torch.cuda.synchronize``) is called after each call, inside the timed span."""
    sync = sync or (lambda: None)
    for fn in fns:
        fn()
        sync()
    ts = [[] for _ in fns]
    for _ in range(repeat):
        for fn, t_list in zip(fns, ts):
            t = time.perf_counter()
            fn()
            sync()
            t_list.append(time.perf_counter() - t)
    return [min(t) for t in ts]


def method_epochs(name: str, data, quick: bool = False, repeat: int = 3, warmup_steps: int = 20,
                  device: str = "cpu", overrides: dict | None = None) -> dict:
    """Time one method's epochs (``name``: ``gcond`` or ``sgdd``, ``conf/method/<name>.yaml``; with
    ``quick`` the :data:`QUICK` sizes; ``overrides`` update the config fields last) on the graph
    ``data`` on ``device``. Returns ``hp`` (the method's settings), ``module`` (the condensation
    module, on ``device``), ``setup_s`` (seconds: the module's construction, real-graph propagation
    and SGDD's eigen-decomposition, on the CPU), ``warmup`` (SGDD: ``(seconds per structure warm-up
    step, steps timed)``, else ``None``), ``epochs``: ``{"structure": (method s, floor s),
    "feature": (method s, floor s)}`` (best of ``repeat`` after one warm-up, each call synchronized
    on CUDA) and ``mean``: ``(method s, floor s)`` of an epoch averaged over the method's
    structure/feature schedule."""
    import torch
    from omegaconf import OmegaConf

    from lightning_dd.methods.graphs.gcond import GCondMethod
    from lightning_dd.methods.graphs.sgdd import SGDDMethod

    cls = {"gcond": GCondMethod, "sgdd": SGDDMethod}[name]
    conf = Path(__file__).resolve().parents[1] / "conf" / "method"
    raw = OmegaConf.to_container(OmegaConf.load(conf / f"{name}.yaml"))
    raw.pop("_target_", None)
    if quick:
        raw.update({k: v for k, v in QUICK.items() if k in cls.model_fields})
    raw.update(overrides or {})
    hp = cls(**raw)
    t = time.perf_counter()
    module = hp.condenser(data, seed=0)
    setup = time.perf_counter() - t
    module.to(device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else None
    warm = None
    if hasattr(module, "warmup_structure") and getattr(hp, "warmup_epochs", 0):
        # time the first `--warmup-steps` of SGDD's structure warm-up (its steps all cost the same)
        n = min(hp.warmup_epochs, warmup_steps)
        module.hp = hp.model_copy(update={"warmup_epochs": n})
        t = time.perf_counter()
        module.warmup_structure()
        if sync:
            sync()
        per = (time.perf_counter() - t) / (n + 1)            # n steps + the final loss
        module.hp = hp
        warm = (per, n)
    floor_module = detach_from_trainer(copy.deepcopy(module))   # its own state: the rows never mix
    detach_from_trainer(module)
    res = {}
    for kind, epoch in (("structure", 0), ("feature", 10)):
        def method_epoch():
            module.epoch_losses = [0.0] * epoch           # training_step's epoch = epochs done
            module.training_step(torch.tensor(epoch), 0)
        res[kind] = best_of([method_epoch, lambda: floor_epoch(floor_module, epoch)], repeat, sync)
    period = hp.adj_epochs + hp.feat_epochs
    mean = tuple((hp.adj_epochs * res["structure"][i] + hp.feat_epochs * res["feature"][i]) / period for i in (0, 1))
    return {"hp": hp, "module": module, "setup_s": setup, "warmup": warm, "epochs": res, "mean": mean}


def main(argv=None):
    import torch
    import torch.nn.functional as F

    from lightning_dd.data.graphs import GraphDataModule
    from lightning_dd.methods.graphs.gcond import class_gradients

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=os.environ.get("LDD_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data")))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--warmup-steps", type=int, default=20, help="SGDD warm-up steps timed (extrapolated)")
    p.add_argument("--quick", action="store_true", help="a random 300-node graph, 4x3 loops (seconds)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        data = random_graph()
        label = "random graph (--quick)"
    else:
        dm = GraphDataModule("cora", root=f"{args.data_dir}/planetoid")
        dm.setup()
        data = dm.data
        label = "Cora"
    print(f"{label}: {data.num_nodes} nodes, {data.edge_index.shape[1] // 2} edges; torch threads {args.threads}")
    for name in ("gcond", "sgdd"):
        r = method_epochs(name, data, args.quick, args.repeat, args.warmup_steps)
        hp, module, setup, res = r["hp"], r["module"], r["setup_s"], r["epochs"]
        warm = ""
        if r["warmup"] is not None:
            per, n = r["warmup"]
            warm = (f" | structure warm-up {per * 1e3:.1f} ms/step (of {n}) -> {hp.warmup_epochs} steps "
                    f"~ {per * hp.warmup_epochs:.1f} s")
        mean, mean_floor = r["mean"]
        print(f"{name} ({hp.outer_loop} outer x {hp.inner_loop} inner, {len(module.y_syn)} synthetic nodes): "
              f"setup {setup:.2f} s{warm}")
        for kind, (t_m, t_f) in res.items():
            print(f"  {kind} epoch {t_m:.3f} s | floor {t_f:.3f} s | ratio {t_m / t_f:.2f}x")
        print(f"  mean epoch {mean:.3f} s | floor {mean_floor:.3f} s | ratio {mean / mean_floor:.2f}x -> "
              f"{hp.epochs} epochs ~ {mean * hp.epochs / 60:.1f} min")
    # baseline: per-class real-graph gradients by autograd vs the closed form (same numbers)
    h, y = module.h_real, module.onehot_real.argmax(1)
    w, b = module.init_model()

    def autograd_grads():
        return torch.stack([torch.autograd.grad(F.cross_entropy(h[y == c] @ w + b, y[y == c]), w)[0]
                            for c in range(module.num_classes)])

    def closed_form():
        return class_gradients(h, w.detach(), b.detach(), module.onehot_real, module.cw_real)

    times = dict(zip(("autograd", "closed form"), best_of([autograd_grads, closed_form], 20)))
    assert torch.allclose(autograd_grads(), closed_form(), atol=1e-6)
    print(f"real-graph class gradients ({module.num_classes} classes, {len(h)} nodes): autograd "
          f"{1e3 * times['autograd']:.2f} ms, closed form {1e3 * times['closed form']:.2f} ms -> "
          f"{times['autograd'] / times['closed form']:.1f}x")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
