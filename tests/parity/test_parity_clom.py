"""CLoM terms (arXiv 2310.03295) against the authors' ``utils_clom/CLoM.py`` (fixture: ``gen_clom.py``).

Tolerance: values ``rtol 1e-5``; gradients w.r.t. the synthetic images ``rtol 1e-4, atol 1e-7``
(float32).
"""
import pytest
import torch

from fixture_io import load_fixture
from lightning_dd.methods.images.clom import ClomTerm, ModelPool, PoolMember
from lightning_dd.nets import FlatParams, build_net
from configs import method

pytestmark = pytest.mark.parity


def _term(kind: str):
    fx = load_fixture("clom")["cases"]
    inp, case = fx["inputs"], fx[kind]
    net = build_net("ConvNet", 3, inp["num_classes"], tuple(inp["syn"].shape[-2:]), width=inp["width"],
                    depth=inp["depth"])
    net.load_state_dict(inp["state"])
    flat = FlatParams(net.eval())
    pool = ModelPool([flat], ["ConvNet"], [PoolMember(0, 0, inp["epoch"], flat.flatten())])
    hp = method("dm", **{"clom.enabled": True, "clom.kind": kind, "clom.alpha": case["alpha"]}).clom
    term = ClomTerm(hp, pool)
    return term, inp, case


@pytest.mark.parametrize("kind", ["ce", "cos"])
def test_clom_term_value_and_gradient_equal_the_authors(kind):
    """Pins ClomTerm's ``alpha * L`` through a pooled model (ModelPool.logits / .features, the
    penultimate features = the authors' ``model.embed``) for CE-CLoM (``alpha * CE(f(S), y_S)``) and
    cosine CLoM (``alpha * sum(M * D) / sum(D)`` against the recorded real batch), value and gradient
    w.r.t. the synthetic images.
    Mutations checked: ce: label smoothing 0.1 in the CE (value differs); cos: normalising by
    ``D.numel()`` instead of ``sum(D)`` (value differs); cos: features = logits instead of the
    penultimate layer (value differs)."""
    term, inp, case = _term(kind)
    x = inp["syn"].clone().requires_grad_(True)
    real = (inp["real"][case["real_idx"]], inp["real_labels"][case["real_idx"]]) if kind == "cos" else None
    loss, member = term(x, inp["syn_labels"], torch.Generator().manual_seed(0), real=real)
    (grad,) = torch.autograd.grad(loss, x)
    assert member.epoch == inp["epoch"]
    assert loss.item() == pytest.approx(case["loss"].item(), rel=1e-5)
    assert torch.allclose(grad, case["grad"], rtol=1e-4, atol=1e-7)
