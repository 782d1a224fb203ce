"""SGDD (arXiv 2310.09192) against the authors' code: ``fixtures/sgdd.pt`` from ``gen_sgdd.py``
(``models/IGNR.py`` ``GraphonLearner`` forward / inference / ``opt_loss``, ``graph.py``
``mx_inv`` / ``mx_inv_sqrt``), fed to :mod:`lightning_dd.methods.graphs.sgdd`.

Tolerances: float32; ``1e-5`` relative for the generator's adjacency and the pseudo-inverses,
``1e-4`` relative for the OT loss, ``1e-3`` for its gradients (SVD and eigenvalue routines,
whose backward divides by singular-value gaps, summed in another order). SGDD's repository has no LED code, so the LED (``lightning_dd.evaluate.led``) has no
parity test here."""
from __future__ import annotations

import pytest
import torch
from fixture_io import load_fixture

from lightning_dd.methods.graphs.sgdd import IGNR, ReferenceOT, svd_pinv

pytestmark = pytest.mark.parity

FIX = load_fixture("sgdd")["cases"]

# reference GraphonLearner names -> ours (IGNR)
BLOCKS = {"net0.0.net.0": None, "net0.0.net.1": "feat_bns.0", "net0.1.net.0": "feat_mid.0", "net0.1.net.1": "feat_bns.1",
          "net0.2": "feat_out", "net1.0.net.0": "coord_lins.0", "net1.0.net.1": "coord_bns.0",
          "net1.1.net.0": "coord_lins.1", "net1.1.net.1": "coord_bns.1", "net1.2": "coord_out"}


def ignr_from_reference(state: dict, in_dim: int, n: int, ep_ratio: float) -> IGNR:
    """Our IGNR with the reference learner's weights (its first feature layer split in two)."""
    hidden = state["net0.0.net.0.weight"].shape[0]
    ours = IGNR(in_dim, n, hidden=hidden, nlayers=3, ep_ratio=ep_ratio)
    sd = {"feat_i.weight": state["net0.0.net.0.weight"][:, :in_dim], "feat_i.bias": state["net0.0.net.0.bias"],
          "feat_j.weight": state["net0.0.net.0.weight"][:, in_dim:], "coords": ours.coords}
    for ref, mine in BLOCKS.items():
        if mine is None:
            continue
        for k, v in state.items():
            if k.startswith(ref + "."):
                sd[mine + k[len(ref):]] = v
    ours.load_state_dict(sd)
    return ours


def test_ignr_adjacency_equals_sgdd_graphon_learner():
    """Pins IGNR (Sec. 4.1): the feature branch on ``[x_i; x_j]`` and the graphon branch on the
    latent grid in ``[-1, 1]^2``, multiplied layer by layer, mixed ``(1 - ep_ratio), ep_ratio`` in
    the last layer, ``sigmoid((f + f^T) / 2)``, zero diagonal; train mode (batch statistics), then
    ``inference`` in eval mode on the running statistics that forward left."""
    c = FIX["ignr"]
    ours = ignr_from_reference(c["state"], c["feat"].shape[1], c["feat"].shape[0], c["ep_ratio"])
    ours.train()
    torch.testing.assert_close(ours(c["feat"]), c["adj_train"], rtol=1e-5, atol=1e-6)
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(c["feat"]), c["adj_inference"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["full", "singular"])
def test_svd_pinv_equals_sgdd_mx_inv(name):
    """Pins SGDD's SVD pseudo-inverse rule: ``1 / D``, and when the smallest singular value is below
    0.009, that one (only) set to 0; the square-root variant ``D^-1/2``."""
    c = FIX["pinv"][name]
    rt, inv = svd_pinv(c["mx"])
    torch.testing.assert_close(inv, c["inv"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(inv, c["inv2"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rt, c["inv_rt"], rtol=1e-4, atol=1e-5)


def test_reference_ot_loss_and_gradients_equal_sgdd_opt_loss():
    """Pins SGDD's structure OT term as its code computes it (``opt_loss``): ``|N' tr(A'^+) -
    2 sum sqrt(eig(A'^{+1/2} P^T Lx^+ P A'^{+1/2}))|`` with the raw plan ``P`` (the code's Sinkhorn
    plan is unused) and ``Lx`` the original graph's renormalized adjacency; the loss and its
    gradients w.r.t. ``A'`` and ``P``."""
    c = FIX["opt_loss"]
    ot = ReferenceOT(c["lx"], c["adj"].shape[0])
    with torch.no_grad():
        ot.plan.copy_(c["plan"])
    adj = c["adj"].clone().requires_grad_()
    loss = ot(adj)
    torch.testing.assert_close(loss, c["loss"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(FIX["ignr"]["opt_loss"], c["loss"])  # the same term inside forward
    loss.backward()
    torch.testing.assert_close(adj.grad, c["grad_adj"], rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(ot.plan.grad, c["grad_plan"], rtol=1e-3, atol=1e-4)
