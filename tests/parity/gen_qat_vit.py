"""Parity fixture of QAT-ViT (Huang et al., arXiv 2307.00331): runs the authors' code
(github.com/HuangOwen/Quantization-Variation) on fixed inputs and writes
``tests/parity/fixtures/qat_vit.pt``.

Exercised, from the checkout given by ``--reference``:

* ``quantization/lsq_layer.py``: ``quantize_by_mse`` (the weight-step init, through
  ``QuantLinear.initialize_scale``), ``QuantLinear.forward`` (LSQ weight quantizer: forward, and the
  gradients of the weight, the step and the input), ``QuantAct.forward`` (LSQ activation quantizer:
  the step init on its first batch, then forward and the gradients of the input, the step and the
  offset; signed, unsigned, unsigned with offset), ``QuantLinear.to_integer_forward``.
* ``util_loss.py``: ``BinReg`` (the variation-aware bin regularizer of ``QuantLinear`` layers:
  value, weight and step gradients) and ``CosineTempDecay`` (its weight per epoch, as
  ``train_VVTQ.py`` builds it).
* ``fp_pretrained/oscillation_tracking_utils.py``: ``TrackOscillation`` over a fixed sequence of
  weights (per-step and cumulative counts of oscillating integer codes).
* ``train_VVTQ.py``'s epoch loop (``range(start, epochs, num_crops)``, single-crop finish): read, not
  run (it needs ImageNet and GPUs); the arithmetic is pinned in ``tests/test_qat_vit.py``.

Replaced to run here: nothing of the exercised code; ``lsq_layer.py``'s ``import utils`` (the
reference's distributed-logging helpers, unused by these functions) imports the checkout's own
``utils.py``. ``print`` calls of the reference are silenced.

Usage: ``python tests/parity/gen_qat_vit.py --reference /tmp/ref/Quantization-Variation``
"""
from __future__ import annotations

import argparse
import contextlib
import io
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixture_io import add_reference_to_path, save_fixture  # noqa: E402


def weight_cases(lsq) -> dict:
    """QuantLinear at 2/3/4/8 bits: MSE init of the step, then forward/backward at that step x 0.8
    (so some weights clip)."""
    out = {}
    for bits in (2, 3, 4, 8):
        g = torch.Generator().manual_seed(100 + bits)
        w = torch.randn(16, 24, generator=g) * 0.05
        b = torch.randn(16, generator=g) * 0.01
        x = torch.randn(5, 24, generator=g)
        dy = torch.randn(5, 16, generator=g)
        layer = lsq.QuantLinear(24, 16, nbits=bits, mixpre=False)
        with torch.no_grad():
            layer.weight.copy_(w)
            layer.bias.copy_(b)
        layer.initialize_scale("cpu")
        init_step = layer.alpha.data[bits - 2].clone()
        with torch.no_grad():
            layer.alpha.mul_(0.8)
        xi = x.clone().requires_grad_()
        y = layer(xi)
        (y * dy).sum().backward()
        out[f"weight_{bits}bit"] = {"bits": bits, "w": w, "b": b, "x": x, "dy": dy, "init_step": init_step,
                                    "step": layer.alpha.data[bits - 2].clone(), "y": y, "w_grad": layer.weight.grad,
                                    "step_grad": layer.alpha.grad[bits - 2].clone(), "x_grad": xi.grad}
    return out


def act_cases(lsq) -> dict:
    """QuantAct: the first batch initializes the step (and quantizes); a second batch at a moved
    step (and offset) gives forward and gradients."""
    out = {}
    for name, bits, signed, offset in (("act_signed_4bit", 4, True, False), ("act_unsigned_4bit", 4, False, False),
                                       ("act_offset_4bit", 4, False, True), ("act_signed_8bit", 8, True, False),
                                       ("act_signed_2bit", 2, True, False)):
        g = torch.Generator().manual_seed(200 + bits + 10 * signed + 20 * offset)
        shift = -0.1 if offset else 0.0
        x1 = torch.randn(4, 7, 12, generator=g) * 0.9 + (0.0 if signed else 0.4) + shift
        x2 = torch.randn(4, 7, 12, generator=g) * 1.1 + (0.0 if signed else 0.4) + shift
        if not signed:
            x1, x2 = x1.clamp(min=-0.17), x2.clamp(min=-0.17)  # GELU-like outputs
        dy1, dy2 = torch.randn(4, 7, 12, generator=g), torch.randn(4, 7, 12, generator=g)
        q = lsq.QuantAct(nbits=bits, signed=signed, offset=offset, mixpre=False)
        x1i = x1.clone().requires_grad_()
        y1 = q(x1i)
        (y1 * dy1).sum().backward()
        case = {"bits": bits, "signed": signed, "offset": offset, "x1": x1, "dy1": dy1,
                "init_step": q.alpha.data[bits - 2].clone(), "y1": y1, "x1_grad": x1i.grad,
                "step1_grad": q.alpha.grad[bits - 2].clone()}
        if offset:
            case["init_beta"] = q.beta.data[bits - 2].clone()
            case["beta1_grad"] = q.beta.grad[bits - 2].clone()
        q.alpha.grad = None
        with torch.no_grad():
            q.alpha.mul_(1.3)
            if offset:
                q.beta.fill_(-0.12)
                q.beta.grad = None
        x2i = x2.clone().requires_grad_()
        y2 = q(x2i)
        (y2 * dy2).sum().backward()
        case.update({"x2": x2, "dy2": dy2, "step2": q.alpha.data[bits - 2].clone(), "y2": y2, "x2_grad": x2i.grad,
                     "step2_grad": q.alpha.grad[bits - 2].clone()})
        if offset:
            case.update({"beta2": q.beta.data[bits - 2].clone(), "beta2_grad": q.beta.grad[bits - 2].clone()})
        out[name] = case
    return out


def regularizer_cases(lsq, util_loss) -> dict:
    """BinReg over a model of two QuantLinear layers (4 bit, 2 bit... one model per bit width, as the
    reference quantizes all blocks at one width), weight 1 (the lambda multiplies the sum)."""
    out = {}
    for bits in (2, 3, 4):
        g = torch.Generator().manual_seed(300 + bits)
        model = torch.nn.Sequential(lsq.QuantLinear(32, 24, nbits=bits, mixpre=False),
                                    lsq.QuantLinear(24, 16, nbits=bits, mixpre=False))
        ws = [torch.randn(24, 32, generator=g) * 0.04, torch.randn(16, 24, generator=g) * 0.06]
        for lay, w in zip(model, ws):
            with torch.no_grad():
                lay.weight.copy_(w)
            lay.initialize_scale("cpu")
        steps = [lay.alpha.data[bits - 2].clone() for lay in model]
        reg = util_loss.BinReg(0.7)(model)
        reg.backward()
        out[f"binreg_{bits}bit"] = {"bits": bits, "lmbda": 0.7, "w0": ws[0], "w1": ws[1], "step0": steps[0],
                                    "step1": steps[1], "value": reg.detach(), "w0_grad": model[0].weight.grad,
                                    "w1_grad": model[1].weight.grad,
                                    "step0_grad": model[0].alpha.grad[bits - 2].clone(),
                                    "step1_grad": model[1].alpha.grad[bits - 2].clone()}
    sched = util_loss.CosineTempDecay(t_max=150, temp_range=(0, 0.01), rel_decay_start=0.25)
    epochs = list(range(0, 150))
    out["reg_weight_schedule"] = {"t_max": 150, "peak": 0.01, "start": 0.25, "epochs": epochs,
                                  "weights": torch.tensor([float(sched(e)) for e in epochs], dtype=torch.float64)}
    return out


def oscillation_case(lsq, osc) -> dict:
    """TrackOscillation of a 4-bit QuantLinear's integer codes over 12 steps of a random walk of its
    weights (the step fixed)."""
    g = torch.Generator().manual_seed(400)
    layer = lsq.QuantLinear(20, 10, nbits=4, mixpre=False)
    w0 = torch.randn(10, 20, generator=g) * 0.05
    with torch.no_grad():
        layer.weight.copy_(w0)
    layer.initialize_scale("cpu")
    step = layer.alpha.data[2].clone()
    tracker = osc.TrackOscillation(int_fwd=layer.to_integer_forward)
    tracker()  # init: the codes of w0
    seq, per_step, total = [], [], []
    w = w0.clone()
    for _ in range(12):
        w = w + torch.randn(10, 20, generator=g) * step * 0.6
        with torch.no_grad():
            layer.weight.copy_(w)
        tracker()
        seq.append(w.clone())
        per_step.append(int(tracker.oscillated_sum))
        total.append(int(tracker.total_oscillation.sum()))
    return {"oscillation": {"w0": w0, "step": step, "weights": torch.stack(seq), "oscillated": torch.tensor(per_step),
                            "total": torch.tensor(total), "total_per_weight": tracker.total_oscillation.clone()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference", required=True, help="checkout of HuangOwen/Quantization-Variation")
    args = ap.parse_args()
    root = add_reference_to_path(args.reference)
    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()):
        from quantization import lsq_layer as lsq
        import util_loss
        sys.path.insert(0, str(root / "fp_pretrained"))
        import oscillation_tracking_utils as osc  # imports quantization.lsq_layer (already loaded: the top-level one)
        cases = {**weight_cases(lsq), **act_cases(lsq), **regularizer_cases(lsq, util_loss), **oscillation_case(lsq, osc)}
    path = save_fixture("qat_vit", cases, reference=root, repo="HuangOwen/Quantization-Variation",
                        replaced="")
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
