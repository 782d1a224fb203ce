"""LED shift (and GCN accuracy) along a GCond / SGDD condensation of Cora (experiments/sgdd/README.md).

Condenses in segments of ``--every`` epochs. Each segment resumes from the previous one's
checkpoint, which gives the same graph as an uninterrupted run (tests/test_graph_condensation.py).
After each segment it measures the condensed graph's LED shift against real Cora and, every
``--acc-every`` epochs, the accuracy of a GCN trained on it (300 epochs, 2 seeds). Rows are appended
to ``OUT.json``, so a later call with ``--start`` beyond the last row continues the same run.

    LDD_DATA_DIR=../shared/data python experiments/sgdd/led_trajectory.py sgdd --epochs 600 --every 50 --out outputs/sgdd2/traj_sgdd_seed0
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from lightning_dd.data.graphs import GraphDataModule
from lightning_dd.evaluate.graph import evaluate_graph
from lightning_dd.evaluate.led import led_cdf, w1_between_cdfs
from lightning_dd.core.trainer import TrainerFactory
from lightning_dd.methods.graphs.gcond import GCondMethod
from lightning_dd.methods.graphs.graph_run import fit_condenser
from lightning_dd.methods.graphs.sgdd import SGDDMethod

ROOT = Path(__file__).resolve().parents[2]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("method", choices=["gcond", "sgdd"])
    p.add_argument("--epochs", type=int, default=600)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--acc-every", type=int, default=100)
    p.add_argument("--start", type=int, default=0, help="first epoch to measure (> 0: continue OUT.ckpt)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=os.environ.get("LDD_DATA_DIR", str(ROOT.parent / "shared" / "data")))
    p.add_argument("--out", required=True, help="path prefix: OUT_checkpoints/last.ckpt (condensation), OUT.json (rows)")
    p.add_argument("--save-at", type=int, nargs="*", default=[],
                   help="epochs whose condensed graph is also saved, as OUT_epochN.pt (evaluate it with "
                        "python -m lightning_dd.evaluate.graph)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="method overrides, e.g. reg_every_step=true (OmegaConf dotlist)")
    a = p.parse_args()
    torch.set_num_threads(1)
    dm = GraphDataModule("cora", root=f"{a.data_dir}/planetoid")
    dm.setup()
    data = dm.data
    grid = torch.linspace(0, 2, 2001, dtype=torch.float64)
    real = led_cdf(data.edge_index, data.x, grid)
    raw = OmegaConf.to_container(OmegaConf.merge(OmegaConf.load(ROOT / "conf" / "method" / f"{a.method}.yaml"),
                                                 OmegaConf.from_dotlist(a.set)))
    raw.pop("_target_", None)
    hp = (GCondMethod if a.method == "gcond" else SGDDMethod)(**raw)
    make_trainer = TrainerFactory(accelerator="cpu", enable_progress_bar=False)
    ckdir, rows_path = Path(f"{a.out}_checkpoints"), Path(f"{a.out}.json")
    ckpt = ckdir / "last.ckpt"
    rows = json.loads(rows_path.read_text()) if a.start > 0 else []
    t0 = time.perf_counter()
    for epoch in range(a.start, a.epochs + 1, a.every):
        module = hp.condenser(data, a.seed)
        if epoch == 0:
            if a.method == "sgdd":
                module.warmup_structure()
            cond = module.condensed()
        else:
            cond, _ = fit_condenser(module, epoch, make_trainer, ckpt_dir=ckdir, ckpt_every=a.every,
                                    resume_from=ckpt if ckpt.is_file() and epoch > a.every else None)
        if epoch in a.save_at:
            cond.save(f"{a.out}_epoch{epoch}.pt")
        acc = None
        if epoch % a.acc_every == 0:
            acc = evaluate_graph(cond, data, "GCN", epochs=300, num_eval=2, eval_every=10).mean
        rows.append({"epoch": epoch, "led_shift": w1_between_cdfs(real, led_cdf(cond.adj, cond.x, grid), grid),
                     "gcn_acc_300ep_2seeds": acc, "edge_w": float(cond.adj.mean()),
                     "s": time.perf_counter() - t0})
        print(json.dumps(rows[-1]), flush=True)
        rows_path.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
