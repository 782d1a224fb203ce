"""Parity fixture ``fixtures/sgdd.pt`` from SGDD's code (Yang et al., arXiv 2310.09192;
github.com/RingBDStack/SGDD).

Exercised in the checkout (imported, run, never copied):

* ``models/IGNR.py`` ``GraphonLearner``: the structure generator's adjacency from fixed synthetic
  features and its own seeded initialization (``nfeat=16``), in train mode (``forward``: batch
  statistics) and then in ``inference`` (eval mode: the running statistics that forward left);
* ``graph.py`` ``mx_inv`` / ``mx_inv_sqrt``: the SVD pseudo-inverse (and its square root) of a
  full-rank and of a singular matrix;
* ``GraphonLearner.opt_loss``: the structure OT term on a fixed synthetic adjacency, with ``Lx`` the
  renormalized adjacency of a fixed 10-node graph (what ``SGDD_agent.py`` passes) and the learner's
  transport plan ``P`` -- the loss and its gradients w.r.t. the adjacency and ``P``.

SGDD's repository has no code for the LED (the Laplacian energy distribution of its Sec. 3), so
there is nothing of the authors' to pin ``lightning_dd.evaluate.led`` against.

    python tests/parity/gen_sgdd.py --reference /tmp/ref/sgdd
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixture_io import add_reference_to_path, save_fixture  # noqa: E402
import graph_reference_stubs as stubs  # noqa: E402

N_SYN, F_IN, HID, M = 6, 8, 16, 10


def small_graph_norm_adj(seed: int = 0) -> torch.Tensor:
    """``D^-1/2 (A + I) D^-1/2`` ``(10, 10)`` of a fixed connected 10-node graph."""
    g = torch.Generator().manual_seed(seed)
    a = (torch.rand(M, M, generator=g) < 0.3).float().triu(1)
    r = torch.arange(M)
    a[r[:-1], r[1:]] = 1
    a = a + a.T
    a = a + torch.eye(M)
    d = a.sum(1).rsqrt()
    return d[:, None] * a * d[None, :]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", required=True, help="checkout of github.com/RingBDStack/SGDD")
    ref = ap.parse_args().reference
    stubs.install()
    add_reference_to_path(ref)
    from graph import mx_inv, mx_inv_sqrt
    from models.IGNR import GraphonLearner

    cases = {}
    torch.manual_seed(0)
    args = SimpleNamespace(ep_ratio=0.5, sinkhorn_iter=5, mx_size=M)
    learner = GraphonLearner(node_feature=F_IN, nfeat=HID, nnodes=N_SYN, device="cpu", args=args)
    state = {k: v.clone() for k, v in learner.state_dict().items()}
    feat = torch.rand(N_SYN, F_IN)
    lx = small_graph_norm_adj()
    adj_train, opt_loss = learner(feat, Lx=lx)
    adj_infer = learner.inference(feat)
    cases["ignr"] = {"feat": feat, "state": state, "ep_ratio": 0.5, "adj_train": adj_train.detach(),
                     "adj_inference": adj_infer, "lx": lx, "opt_loss": opt_loss.detach()}

    g = torch.Generator().manual_seed(1)
    full = torch.randn(5, 5, generator=g)
    full = full @ full.T + 0.5 * torch.eye(5)
    u, _ = torch.linalg.qr(torch.randn(5, 5, generator=g))
    singular = u @ torch.diag(torch.tensor([2.0, 1.0, 0.5, 0.1, 0.0])) @ u.T
    cases["pinv"] = {name: {"mx": mx, "inv": mx_inv(mx), "inv_rt": mx_inv_sqrt(mx)[0], "inv2": mx_inv_sqrt(mx)[1]}
                     for name, mx in (("full", full), ("singular", singular))}

    adj = adj_train.detach().clone().requires_grad_()
    learner.zero_grad()
    loss = learner.opt_loss(adj)
    loss.backward()
    cases["opt_loss"] = {"adj": adj.detach(), "plan": learner.P.detach().clone(), "lx": lx, "loss": loss.detach(),
                         "grad_adj": adj.grad.clone(), "grad_plan": learner.P.grad.clone()}

    save_fixture("sgdd", cases, reference=ref, repo="RingBDStack/SGDD", replaced=(
        "torch.symeig (raises in torch 2, and opt_loss's try/except then silently returns 0) by "
        "torch.linalg.eigh(UPLO='U'); torch_sparse (SparseTensor, matmul: dense), deeprobust and ogb stubbed "
        "(tests/parity/graph_reference_stubs.py); GraphonLearner built with nfeat=16, mx_size=10"))


if __name__ == "__main__":
    main()
