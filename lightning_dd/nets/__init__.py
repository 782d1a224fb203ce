"""Networks by name, and the flat-parameter view used by unrolled (functional) training."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.func import functional_call

from lightning_dd.nets.convnet import ConvNet
from lightning_dd.nets.small import WRN16_2, mobilenet_v2, shufflenet_v2
from lightning_dd.nets.zoo import VGG11, AlexNet, resnet

# torch.compile is applied (trainer.compile=true) only to architectures whose compiled training was
# checked against eager training (same test accuracy). On CPU with torch 2.14.1 a compiled VGG11
# evaluated to 0% test accuracy where eager reached 50%, so the others run eagerly.
COMPILE_VERIFIED = {"ConvNet"}

NETS = {
    "ConvNet": ConvNet,
    "AlexNet": AlexNet,
    "VGG11": VGG11,
    "VGG11BN": lambda c, k, s, **kw: VGG11(c, k, s, **{"norm": "batchnorm", **kw}),
    "ResNet18": lambda c, k, s, **kw: resnet(18, c, k, s, **kw),
    "ResNet18BN": lambda c, k, s, **kw: resnet(18, c, k, s, **{"norm": "batchnorm", **kw}),
    "ResNet50": lambda c, k, s, **kw: resnet(50, c, k, s, **{"norm": "batchnorm", **kw}),
    # small BatchNorm backbones for multi-backbone statistics matching (G-VBSM)
    "MobileNetV2": mobilenet_v2,
    "ShuffleNetV2": shufflenet_v2,
    "WRN16_2": WRN16_2,
}


def build_net(name: str, channel: int, num_classes: int, im_size, **kwargs) -> nn.Module:
    """Instantiate architecture ``name`` for ``(C, H, W)`` inputs and ``num_classes`` outputs.

    Raises:
        ValueError: unknown ``name`` (the known names are listed).
    """
    if name not in NETS:
        raise ValueError(f"unknown net.name {name!r}; known: {sorted(NETS)}")
    return NETS[name](channel, num_classes, tuple(im_size), **kwargs)


def load_net_file(path, channel: int, num_classes: int, im_size, what: str = "teacher checkpoint") -> tuple[nn.Module, dict]:
    """A network saved as ``{"net_cfg": {"name": ..., **kwargs}, "state_dict": ..., ...}``
    (``torch.save``), rebuilt for ``(C, H, W)`` inputs and ``num_classes`` outputs, in eval mode;
    returns ``(net, the saved dict)`` (extra keys such as ``test_acc`` kept).

    Raises:
        FileNotFoundError: no file. ValueError: not such a dict (``what`` names it), an unknown
        net name, or weights that do not fit the data's shape / classes.
    """
    from lightning_dd.results import load_dict

    d = load_dict(path, ("net_cfg", "state_dict"), what)
    cfg = dict(d["net_cfg"])
    net = build_net(cfg.pop("name"), channel, num_classes, im_size, **cfg)
    try:
        net.load_state_dict(d["state_dict"])
    except RuntimeError as e:
        raise ValueError(f"{path}: the {what} does not fit this data ({num_classes} classes, "
                         f"{channel}x{'x'.join(map(str, im_size))}): {str(e)[:300]}") from None
    return net.eval(), d


def maybe_compile(net: nn.Module, compile: bool) -> nn.Module:
    """``torch.compile(net)`` when ``compile`` and ``net`` is an instance of a class in
    :data:`COMPILE_VERIFIED`; otherwise ``net`` itself (same parameters either way)."""
    if compile and type(net).__name__ in COMPILE_VERIFIED:
        return torch.compile(net, dynamic=False)
    return net


class FlatParams:
    """Maps a module's parameters to one flat vector ``(P,)`` and back (MTT's "reparam" trick).

    ``flatten(module)`` -> ``(P,)``; ``call(vec, x)`` runs the module with the parameters in
    ``vec`` through :func:`torch.func.functional_call`, differentiably in ``vec``.

    Raises:
        ValueError: if the module has buffers (e.g. BatchNorm running stats), which an unrolled
            functional student cannot carry.
    """

    def __init__(self, module: nn.Module):
        if any(True for _ in module.buffers()):
            raise ValueError("unrolled training needs a buffer-free net (use net.norm=instancenorm, not batchnorm)")
        self.module = module
        self.names = [n for n, _ in module.named_parameters()]
        self.shapes = [p.shape for p in module.parameters()]
        self.numels = [p.numel() for p in module.parameters()]
        self.size = sum(self.numels)

    def flatten(self, module: nn.Module | None = None) -> torch.Tensor:
        m = module or self.module
        return torch.cat([p.detach().reshape(-1) for p in m.parameters()])

    def unflatten(self, vec: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: t.view(s) for n, t, s in zip(self.names, vec.split(self.numels), self.shapes)}

    def call(self, vec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.module, self.unflatten(vec), (x,))
