"""Seconds per condensation epoch on the real Cora graph, GCond (arXiv 2110.07580) and SGDD
(arXiv 2310.09192), with the paper-size method configs (conf/method/{gcond,sgdd}.yaml: 20 outer
x 15 inner steps, reduction rate 0.5 -> 70 nodes). Times a structure-update epoch (epoch 0) and
a feature-update epoch (epoch 10) separately, after one warm-up epoch, plus the setup (real-graph
propagation; SGDD: the original Laplacian's eigen-decomposition) and SGDD's structure warm-up.
Baseline in the same run: the per-class matching gradients of the real graph by autograd (one
backward per class, as GCond's code does) against the closed form used here, with their ratio.

    LDD_DATA_DIR=../shared/data python benchmarks/graph_condensation_epoch.py [--threads 1] [--repeat 3]
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    import torch
    from omegaconf import OmegaConf

    from lightning_dd.data.graphs import GraphDataModule
    import torch.nn.functional as F

    from lightning_dd.methods.gcond import GCondMethod, class_gradients
    from lightning_dd.methods.sgdd import SGDDMethod

    p = argparse.ArgumentParser()
    p.add_argument("--data-dir", default=os.environ.get("LDD_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data")))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dm = GraphDataModule("cora", root=f"{args.data_dir}/planetoid")
    dm.setup()
    conf = Path(__file__).resolve().parents[1] / "conf" / "method"
    print(f"Cora: {dm.data.num_nodes} nodes, {dm.data.edge_index.shape[1] // 2} edges; torch threads {args.threads}")
    for name, cls in (("gcond", GCondMethod), ("sgdd", SGDDMethod)):
        raw = OmegaConf.to_container(OmegaConf.load(conf / f"{name}.yaml"))
        raw.pop("_target_", None)
        hp = cls(**raw)
        t = time.perf_counter()
        module = hp.condenser(dm.data, seed=0)
        setup = time.perf_counter() - t
        warm = ""
        if hasattr(module, "warmup_structure") and getattr(hp, "warmup_epochs", 0):
            t = time.perf_counter()
            module.warmup_structure()
            warm = f" | structure warm-up ({hp.warmup_epochs} steps) {time.perf_counter() - t:.2f} s"
        opts = module.configure_optimizers()
        module.optimizers = lambda: opts            # run the epoch outside a Trainer: no Lightning overhead
        module.manual_backward = lambda loss: loss.backward()
        module.log_dict = lambda *a, **k: None
        res = {}
        for label, epoch in (("structure epoch", 0), ("feature epoch", 10)):
            module.epoch_losses = [0.0] * epoch           # training_step's epoch = epochs done
            module.training_step(torch.tensor(epoch), 0)  # warm-up
            ts = []
            for _ in range(args.repeat):
                module.epoch_losses = [0.0] * epoch
                t = time.perf_counter()
                module.training_step(torch.tensor(epoch), 0)
                ts.append(time.perf_counter() - t)
            res[label] = min(ts)
        period = hp.adj_epochs + hp.feat_epochs
        mean = (hp.adj_epochs * res["structure epoch"] + hp.feat_epochs * res["feature epoch"]) / period
        print(f"{name}: setup {setup:.2f} s | structure epoch {res['structure epoch']:.3f} s | feature epoch "
              f"{res['feature epoch']:.3f} s | mean epoch {mean:.3f} s -> {hp.epochs} epochs ~ "
              f"{mean * hp.epochs / 60:.1f} min{warm}")
    # baseline: per-class real-graph gradients by autograd vs the closed form (same numbers)
    h, y = module.h_real, module.onehot_real.argmax(1)
    w, b = module.init_model()

    def autograd_grads():
        return torch.stack([torch.autograd.grad(F.cross_entropy(h[y == c] @ w + b, y[y == c]), w)[0]
                            for c in range(module.num_classes)])

    def closed_form():
        return class_gradients(h, w.detach(), b.detach(), module.onehot_real, module.cw_real)

    times = {}
    for label, fn in (("autograd", autograd_grads), ("closed form", closed_form)):
        fn()
        ts = []
        for _ in range(20):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        times[label] = min(ts)
    assert torch.allclose(autograd_grads(), closed_form(), atol=1e-6)
    print(f"real-graph class gradients ({module.num_classes} classes, {len(h)} nodes): autograd "
          f"{1e3 * times['autograd']:.2f} ms, closed form {1e3 * times['closed form']:.2f} ms -> "
          f"{times['autograd'] / times['closed form']:.1f}x")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
