"""QAT-ViT (arXiv 2307.00331) against the authors' code (fixture of ``gen_qat_vit.py``): the LSQ
weight and activation quantizers (init, forward, backward), the bin regularizer, its cosine weight
and the oscillation count, fed the same inputs as the reference.

Tolerances: float32 throughout, the same formulas in a different order of operations: forward
values to ``1e-6`` absolute (a quantized value is ``level * step``: exact codes required), gradients
to ``rtol 1e-5`` relative to their scale, steps from the init to ``rtol 1e-6``; the oscillation
counts exactly.
"""
import pytest
import torch
import torch.nn.functional as F
from fixture_io import load_fixture

from lightning_dd.methods.quantization.qat_vit.quantizer import Quantizer, qrange
from lightning_dd.methods.quantization.qat_vit.regularizer import OscillationTracker, bin_regularizer, ramp

pytestmark = pytest.mark.parity

CASES = load_fixture("qat_vit")["cases"]


def close(a, b, rtol=1e-5):
    """``a == b`` up to ``rtol`` of ``b``'s largest magnitude (a gradient's scale)."""
    torch.testing.assert_close(a, b, rtol=0, atol=rtol * max(1e-12, float(b.abs().max())))


@pytest.mark.parametrize("name", [k for k in CASES if k.startswith("weight_")])
def test_lsq_weight_quantizer_matches_reference_quantlinear(name):
    """Pins the weight quantizer (``QuantLinear``): the MSE init of the step, the quantized weight
    in the forward of a Linear, and the gradients of the weight, the step (scaled by
    ``1/sqrt(sum|w| Qp)``) and the input. Mutation checked: step-gradient factor
    ``1/sqrt(numel Qp)`` (fails on step_grad)."""
    c = CASES[name]
    q = Quantizer(c["bits"], True, "weight")
    q.init_weight(c["w"])
    torch.testing.assert_close(q.step.detach(), c["init_step"], rtol=1e-6, atol=0)
    with torch.no_grad():
        q.step.copy_(c["step"])
    w = c["w"].clone().requires_grad_()
    x = c["x"].clone().requires_grad_()
    y = F.linear(x, q(w), c["b"])
    (y * c["dy"]).sum().backward()
    torch.testing.assert_close(y, c["y"], rtol=0, atol=1e-6)
    close(w.grad, c["w_grad"])
    close(x.grad, c["x_grad"])
    close(q.step.grad, c["step_grad"])


@pytest.mark.parametrize("name", [k for k in CASES if k.startswith("act_")])
def test_lsq_activation_quantizer_matches_reference_quantact(name):
    """Pins the activation quantizer (``QuantAct``): the step init on the first batch
    (``2 mean|x| / sqrt(2^(b-1)-1)``, offset 0), forward and the gradients of the input, the step
    (scaled by ``1/(sqrt(numel) Qp)``) and the offset (not scaled), at the init and at a moved step
    and offset. Mutations checked: grad scale ``1/sqrt(numel Qp)`` (fails on step grads), offset
    gradient scaled by ``g`` (fails on beta grads), unsigned ``Qp`` in the init (fails on init_step
    of the unsigned cases), round before clamp (PyTorch's fused kernel: fails on x/step grads)."""
    c = CASES[name]
    q = Quantizer(c["bits"], c["signed"], "act", offset=c["offset"])
    x1 = c["x1"].clone().requires_grad_()
    y1 = q(x1)
    (y1 * c["dy1"]).sum().backward()
    torch.testing.assert_close(q.step.detach(), c["init_step"], rtol=1e-6, atol=0)
    torch.testing.assert_close(y1, c["y1"], rtol=0, atol=1e-6)
    close(x1.grad, c["x1_grad"])
    close(q.step.grad, c["step1_grad"])
    if c["offset"]:
        assert float(q.beta.detach()) == float(c["init_beta"]) == 0.0
        close(q.beta.grad, c["beta1_grad"])
    q.zero_grad()
    with torch.no_grad():
        q.step.copy_(c["step2"])
        if c["offset"]:
            q.beta.copy_(c["beta2"])
    x2 = c["x2"].clone().requires_grad_()
    y2 = q(x2)
    (y2 * c["dy2"]).sum().backward()
    torch.testing.assert_close(y2, c["y2"], rtol=0, atol=1e-6)
    close(x2.grad, c["x2_grad"])
    close(q.step.grad, c["step2_grad"])
    if c["offset"]:
        close(q.beta.grad, c["beta2_grad"])


@pytest.mark.parametrize("name", [k for k in CASES if k.startswith("binreg_")])
def test_bin_regularizer_matches_reference_binreg(name):
    """Pins the variation-aware regularizer (``BinReg``): its value (weight units, unbiased
    per-bin variance, mean squared distance to the quantized weight) and the gradients of the
    weights and of the steps (the step keeps the term's gradient, scaled by the weight quantizer's
    factor). Mutations checked: population variance (fails on the value), step detached (fails on
    step grads), integer units (fails on the value)."""
    c = CASES[name]
    qn, qp = qrange(c["bits"], True)
    total = 0.0
    grads = []
    for i in (0, 1):
        wq = Quantizer(c["bits"], True, "weight")
        wq.init_weight(c[f"w{i}"])
        torch.testing.assert_close(wq.step.detach(), c[f"step{i}"], rtol=1e-6, atol=0)
        w = c[f"w{i}"].clone().requires_grad_()
        total = total + bin_regularizer(w, wq.step, qn, qp, wq.grad_factor(w))
        grads.append((w, wq))
    total = c["lmbda"] * total
    total.backward()
    torch.testing.assert_close(total.detach(), c["value"], rtol=1e-5, atol=0)
    step_scale = max(abs(float(c["step0_grad"])), abs(float(c["step1_grad"])))  # one layer may have ~0
    for i, (w, wq) in enumerate(grads):
        close(w.grad, c[f"w{i}_grad"])
        torch.testing.assert_close(wq.step.grad, c[f"step{i}_grad"], rtol=0, atol=1e-5 * step_scale)


def test_regularizer_weight_matches_reference_cosine_decay():
    """Pins the regularizer's weight per epoch (``CosineTempDecay(t_max=epochs, (0, 0.01), 0.25)``):
    :func:`ramp` at ``epoch / epochs``. Mutation checked: a ramp starting at 0.2 fails."""
    c = CASES["reg_weight_schedule"]
    ours = torch.tensor([ramp(e / c["t_max"], c["peak"], c["start"]) for e in c["epochs"]], dtype=torch.float64)
    torch.testing.assert_close(ours, c["weights"], rtol=1e-9, atol=1e-15)


def test_oscillation_count_matches_reference_tracker():
    """Pins the oscillation count (``TrackOscillation``): over a fixed random walk of a 4-bit
    layer's weights, the number of weights whose integer code moved against its previous move, per
    step and in total. Mutation checked: counting every change as an oscillation fails."""
    c = CASES["oscillation"]
    lay = torch.nn.Module()
    lay.weight = torch.nn.Parameter(c["w0"].clone())
    lay.wq = Quantizer(4, True, "weight")
    with torch.no_grad():
        lay.wq.step.copy_(c["step"])
    tr = OscillationTracker({"l": lay})
    n = lay.weight.numel()
    counts = []
    for w in c["weights"]:
        lay.weight.data = w.clone()
        before = tr.flips["l"]
        tr.update()
        counts.append(round((tr.flips["l"] - before) * n))
    assert counts == c["oscillated"].tolist()
    assert round(tr.rates()["l"] * n * tr.steps) == int(c["total"][-1])
