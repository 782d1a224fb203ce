"""Where a condensed graph's LED shift comes from: its structure's spectrum or its features.

For each saved condensed graph (``condensed.pt``) it prints, against real Cora:

* the LED shift and the LED's CDF at a few eigenvalues (SGDD, arXiv 2310.09192, Sec. 3);
* the structure alone: the fraction of the normalized Laplacian's eigenvalues above ``--high``
  and the number near 0 (connected components);
* the features alone: the energy fraction of ``X'`` above ``--high``.

A structure whose spectrum has much mass near 2 (small bipartite-like pieces) shifts the LED even
for smooth features; features with high-frequency content shift it on any structure.

``--pieces`` also lists, for each eigenvalue above ``--high``, its eigenvector's support (entries
above 0.1 in magnitude), the synthetic labels there, and the fraction of the support's edge weight
that joins nodes of opposite sign: near 1 means a near-bipartite piece of the structure.

    LDD_DATA_DIR=../shared/data python experiments/sgdd/spectrum_report.py outputs/sgdd3/*_epoch2000.pt
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from lightning_dd.data.graphs import GraphDataModule
from lightning_dd.evaluate.led import led_cdf, led_dense, spectrum_cdf, w1_between_cdfs
from lightning_dd.results import CondensedGraph

ROOT = Path(__file__).resolve().parents[2]
POINTS = (0.2, 0.5, 0.8, 1.0, 1.2, 1.5, 1.8)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("graphs", nargs="+", help="condensed.pt files")
    p.add_argument("--high", type=float, default=1.8, help="eigenvalue above which a frequency counts as high")
    p.add_argument("--pieces", action="store_true", help="list the high eigenvalues' supports (near-bipartite pieces)")
    p.add_argument("--data-dir", default=os.environ.get("LDD_DATA_DIR", str(ROOT.parent / "shared" / "data")))
    a = p.parse_args()
    dm = GraphDataModule("cora", root=f"{a.data_dir}/planetoid")
    dm.setup()
    grid = torch.linspace(0, 2, 2001, dtype=torch.float64)
    at = [int(round(x / 2 * (len(grid) - 1))) for x in POINTS]
    real = led_cdf(dm.data.edge_index, dm.data.x, grid)
    print(f"{'graph':48s} {'shift':>6s}  CDF at lambda {POINTS}  | eig>{a.high} eig~0 | energy>{a.high}")
    print(f"{'real Cora':48s} {0:6.3f}  {[round(float(real[i]), 2) for i in at]}")
    for path in a.graphs:
        g = CondensedGraph.load(path)
        lam, energy, u = led_dense(g.adj, g.x, with_basis=True)  # one eigen-decomposition serves every column
        cdf = spectrum_cdf(lam, energy, grid)
        print(f"{str(path)[-48:]:48s} {w1_between_cdfs(real, cdf, grid):6.3f}  {[round(float(cdf[i]), 2) for i in at]}"
              f"  | {float((lam > a.high).double().mean()):.3f} {int((lam < 1e-2).sum()):5d}"
              f" | {float(energy[lam > a.high].sum()):.3f}")
        if a.pieces:
            print_pieces(g, lam, u, a.high)


def print_pieces(g: CondensedGraph, lam: torch.Tensor, u: torch.Tensor, high: float) -> None:
    """One line per normalized-Laplacian eigenvalue above ``high`` of ``g.adj`` (``lam (N,)``,
    eigenvectors ``u (N, N)`` from :func:`led_dense`): eigenvalue, support (|v_i| > 0.1), labels on
    it, fraction of the support's edge weight across v's sign."""
    adj = g.adj.double()
    for k in (lam > high).nonzero().squeeze(1).tolist():
        v = u[:, k]
        sup = (v.abs() > 0.1).nonzero().squeeze(1)
        w = adj[sup][:, sup]
        cross = float((w * (v[sup, None].sign() != v[None, sup].sign())).sum() / w.sum().clamp(min=1e-300))
        print(f"    lambda {float(lam[k]):.3f}: {len(sup)} nodes, labels {sorted(set(g.y[sup].tolist()))}, "
              f"weight across the sign split {cross:.2f}")


if __name__ == "__main__":
    main()
