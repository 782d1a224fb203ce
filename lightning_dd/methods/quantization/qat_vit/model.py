"""The quantized ViT of QAT-ViT (Huang et al., arXiv 2307.00331, Sec. 3 / reference code): what is
quantized, calibration, the integer export and its reload.

At the target bits ``b`` (weights ``w_bits``, activations ``a_bits``), in every block:

* weights of ``attn.q``, ``attn.k``, ``attn.v``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2`` (signed);
* the input of each of these Linears (signed; one quantizer ``attn.in_act`` for the shared input of
  q, k and v, as the reference's ``quant_input`` in ``DeiT_quant.py``; the input of ``proj`` is
  ``attn @ v``; the input of ``fc2`` is the GELU output: unsigned with a learned offset);
* q, k and v after their projections (signed) and the softmax output (unsigned).

At 8 bits (``keep_bits``): the patch-embedding conv and its input, the head and its input, and
Swin's patch-merging reduction weight (its input stays in floating point, as ``Swin_quant.py``). Floating point: LayerNorms, the class token
and position embedding, Swin's relative position bias, biases, residual adds and the pre-softmax
logits. The same rules serve DeiT (:class:`lightning_dd.nets.vit.ViT`) and Swin
(:class:`lightning_dd.nets.swin.Swin`): every :class:`~lightning_dd.nets.vit.Attention` (Swin's
window attention is one) and :class:`~lightning_dd.nets.vit.Mlp` is quantized where it stands.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from lightning_dd.methods.quantization.qat_vit.quantizer import MIN_STEP, GradScale, QConv2d, QLinear, Quantizer
from lightning_dd.nets.swin import PatchMerging, Swin
from lightning_dd.nets.vit import Attention, Mlp, ViT

QUANTIZABLE = (ViT, Swin)  # the nets QAT-ViT quantizes (their attention forward exposes every hook)


def quantize_vit(fp: ViT | Swin, w_bits: int, a_bits: int | None = None, keep_bits: int = 8,
                 grad_scale: GradScale = "reference") -> ViT | Swin:
    """A deep copy of ``fp`` with the quantizers of the module docstring in place. Weight steps are
    initialized at once (MSE fit); activation steps on the first forward (:func:`calibrate`).

    Raises:
        TypeError: ``fp`` is not one of :data:`QUANTIZABLE` (DeiT/ViT or Swin).
    """
    if not isinstance(fp, QUANTIZABLE):
        raise TypeError(f"quantize_vit needs a lightning_dd.nets.vit.ViT or nets.swin.Swin, got {type(fp).__name__}")
    a_bits = a_bits or w_bits
    m = copy.deepcopy(fp)

    def act(signed=True, offset=False, bits=a_bits):
        return Quantizer(bits, signed, "act", offset=offset, grad_scale=grad_scale)

    for mod in list(m.modules()):
        if isinstance(mod, Attention):
            mod.in_act = act()
            for name in ("q", "k", "v"):
                setattr(mod, name, QLinear(getattr(mod, name), w_bits, None, grad_scale))
            mod.proj = QLinear(mod.proj, w_bits, act(), grad_scale)
            mod.q_act, mod.k_act, mod.v_act = act(), act(), act()
            mod.attn_act = act(signed=False)
        elif isinstance(mod, Mlp):
            mod.fc1 = QLinear(mod.fc1, w_bits, act(), grad_scale)
            mod.fc2 = QLinear(mod.fc2, w_bits, act(signed=False, offset=True), grad_scale)
        elif isinstance(mod, PatchMerging):
            mod.reduction = QLinear(mod.reduction, keep_bits, None, grad_scale)  # input in FP (Swin_quant.py)
    m.patch_embed.proj = QConv2d(m.patch_embed.proj, keep_bits, grad_scale)
    m.head = QLinear(m.head, keep_bits, act(bits=keep_bits), grad_scale)
    return m


def quantizers(model: nn.Module) -> dict[str, Quantizer]:
    """Every quantizer of ``model`` by module name (``blocks.0.attn.q.wq``, ...)."""
    return {n: q for n, q in model.named_modules() if isinstance(q, Quantizer)}


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every :class:`QLinear` / :class:`QConv2d` of ``model`` by module name."""
    return {n: q for n, q in model.named_modules() if isinstance(q, (QLinear, QConv2d))}


@torch.no_grad()
def calibrate(model: nn.Module, images: torch.Tensor, reset: bool = True) -> nn.Module:
    """Initialize every activation step from one batch ``images (B, C, H, W)`` (on the model's
    device): the reference's ``2 * mean|x| / sqrt(2^(b-1) - 1)`` per quantizer, each seeing the inputs that the
    quantizers before it already quantized. ``reset`` re-initializes ones already set; weight
    steps are refitted by the MSE fit. The model is left in eval mode."""
    model.eval()
    for q in quantizers(model).values():
        if reset:
            q.initialized.fill_(False)
    for layer in quantized_layers(model).values():
        layer.wq.init_weight(layer.weight)
    dev = next(model.parameters()).device
    model(images.to(dev))
    return model


# ---------------------------------------------------------------------------------------- export


def export_quantized(model: ViT | Swin, net_cfg: dict, w_bits: int, a_bits: int, keep_bits: int,
                     grad_scale: str) -> dict:
    """The integer model: ``{"format": "lightning_dd.qat_vit/1", "net_cfg", "bits": {w, a, keep},
    "grad_scale", "int_weights": {layer: int8 (out, in[, kh, kw])}, "float_state": every other entry
    of the state dict (weight steps, activation steps and offsets, biases, LayerNorms, embeddings)}``.
    A weight is ``int_weights[layer] * float_state[layer + ".wq.step"]`` (no offset: weights are
    symmetric). Plain tensors only: loads with ``weights_only=True``.

    Raises:
        ValueError: a weight quantizer wider than 8 bits (int8 storage) or not yet initialized.
    """
    ints, skip = {}, set()
    for name, layer in quantized_layers(model).items():
        if layer.wq.bits > 8 or not bool(layer.wq.initialized):
            raise ValueError(f"{name}: cannot export a {layer.wq.bits}-bit / uninitialized weight quantizer as int8")
        ints[name] = layer.wq.integers(layer.weight).to(torch.int8).cpu()
        skip.add(f"{name}.weight")
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k not in skip}
    return {"format": "lightning_dd.qat_vit/1", "net_cfg": dict(net_cfg),
            "bits": {"w": w_bits, "a": a_bits, "keep": keep_bits}, "grad_scale": grad_scale,
            "int_weights": ints, "float_state": state}


def load_quantized(d: dict, channel: int, num_classes: int, im_size) -> ViT | Swin:
    """Rebuild the fake-quantized model from :func:`export_quantized`'s dict: the net from ``net_cfg``,
    the same quantizers, weights ``int * step``, everything else loaded strictly. Its predictions
    equal the exported model's (the weights re-quantize to the same integers). Eval mode.

    Raises:
        ValueError: not such a dict, or tensors that do not fit the architecture.
    """
    from lightning_dd.nets import build_net_cfg

    if not isinstance(d, dict) or d.get("format") != "lightning_dd.qat_vit/1":
        raise ValueError("not a lightning_dd QAT-ViT export (format lightning_dd.qat_vit/1)")
    fp = build_net_cfg(dict(d["net_cfg"]), channel, num_classes, im_size)
    b = d["bits"]
    model = quantize_vit(fp, b["w"], b["a"], b["keep"], d.get("grad_scale", "reference"))
    state = dict(d["float_state"])
    for name, ints in d["int_weights"].items():
        state[f"{name}.weight"] = ints.float() * state[f"{name}.wq.step"].clamp(min=MIN_STEP)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"the quantized export does not fit its net_cfg: {str(e)[:400]}") from None
    return model.eval()
