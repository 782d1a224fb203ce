"""Networks built from their config (``net.name`` or ``net._target_``), and the flat-parameter view
used by unrolled (functional) training."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.func import functional_call

from lightning_dd.nets.convnet import ConvNet  # noqa: F401  (an architecture, see ARCHITECTURES)
from lightning_dd.nets.small import WRN16_2, mobilenet_v2, shufflenet_v2  # noqa: F401
from lightning_dd.nets.zoo import VGG11, AlexNet, resnet  # noqa: F401

#: Architectures (names of :data:`ARCHITECTURES`) that ``trainer.compile=true`` compiles
#: (:func:`maybe_compile`): each one's compiled training is checked against its eager twin by
#: ``tests/test_compile.py`` (same step-1 loss and gradient; later steps, parameters, buffers and
#: test-mode logits within 10x of what a 1e-6 perturbation of the init changes in eager runs).
#:
#: (The history of this set, and why ResNet50 and the statistics-matching backbones are not in it: the
#: "Compiled networks" section of ``experiments/baselines/README.md``.)
COMPILE_VERIFIED = {"ConvNet", "AlexNet", "VGG11", "VGG11BN", "ResNet18", "ResNet18BN"}

#: Architectures whose compiled *functional* per-step functions (trajectory matching's compiled
#: ``recompute`` meta-gradient over :class:`FlatParams`, :mod:`lightning_dd.methods.images.meta_grad`) were
#: checked against the unrolled gradient (tests/test_meta_grad.py) -- a different use of
#: ``torch.compile`` from :func:`maybe_compile`'s, verified separately.
FLAT_COMPILE_VERIFIED = frozenset({"ConvNet"})


def VGG11BN(channel: int, num_classes: int, im_size, **kw) -> nn.Module:
    """VGG11 with BatchNorm."""
    return VGG11(channel, num_classes, im_size, **{"norm": "batchnorm", **kw})


def ResNet18(channel: int, num_classes: int, im_size, **kw) -> nn.Module:
    """ResNet-18 with instance norm (MTT's evaluation net)."""
    return resnet(18, channel, num_classes, im_size, **kw)


def ResNet18BN(channel: int, num_classes: int, im_size, **kw) -> nn.Module:
    """ResNet-18 with BatchNorm (SRe2L/CDA teachers and students)."""
    return resnet(18, channel, num_classes, im_size, **{"norm": "batchnorm", **kw})


def ResNet50(channel: int, num_classes: int, im_size, **kw) -> nn.Module:
    """ResNet-50 with BatchNorm."""
    return resnet(50, channel, num_classes, im_size, **{"norm": "batchnorm", **kw})


# small BatchNorm backbones for multi-backbone statistics matching (G-VBSM)
MobileNetV2 = mobilenet_v2
ShuffleNetV2 = shufflenet_v2

#: The architectures a net config may name (``net.name`` / ``eval.nets``): the callables of this
#: package, ``(channel, num_classes, im_size, **kwargs) -> nn.Module``. A net config may instead
#: give ``_target_`` (a dotted path to any such callable).
ARCHITECTURES = ("ConvNet", "AlexNet", "VGG11", "VGG11BN", "ResNet18", "ResNet18BN", "ResNet50",
                 "MobileNetV2", "ShuffleNetV2", "WRN16_2")


def net_target(net_cfg: dict) -> str:
    """The dotted path a net config builds: its ``_target_``, else ``lightning_dd.nets.<name>``.

    Raises:
        ValueError: neither given, or a ``name`` that is not one of :data:`ARCHITECTURES`.
    """
    if net_cfg.get("_target_"):
        return str(net_cfg["_target_"])
    name = net_cfg.get("name")
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown net.name {name!r}; known: {sorted(ARCHITECTURES)} (or give net._target_)")
    return f"{__name__}.{name}"


def build_net_cfg(net_cfg: dict, channel: int, num_classes: int, im_size) -> nn.Module:
    """The network of ``net_cfg`` (``{"name" | "_target_": ..., **kwargs}``) for ``(C, H, W)`` inputs
    and ``num_classes`` outputs, built with ``hydra.utils.instantiate``.

    Raises:
        ValueError: unknown architecture (:func:`net_target`).
    """
    from hydra.utils import instantiate

    kwargs = {k: v for k, v in dict(net_cfg).items() if k not in ("name", "_target_")}
    target = net_target(net_cfg)
    net = instantiate({"_target_": target, **kwargs}, channel, num_classes, tuple(im_size))
    net.arch_name = str(net_cfg.get("name") or target.rsplit(".", 1)[-1])  # read by arch_name()
    return net


def build_net(name: str, channel: int, num_classes: int, im_size, **kwargs) -> nn.Module:
    """:func:`build_net_cfg` of ``{"name": name, **kwargs}``.

    Raises:
        ValueError: unknown ``name`` (the known names are listed).
    """
    return build_net_cfg({"name": name, **kwargs}, channel, num_classes, im_size)


def load_net_file(path, channel: int, num_classes: int, im_size, what: str = "teacher checkpoint") -> tuple[nn.Module, dict]:
    """A network saved as ``{"net_cfg": {"name": ..., **kwargs}, "state_dict": ..., ...}``
    (``torch.save``), rebuilt for ``(C, H, W)`` inputs and ``num_classes`` outputs, in eval mode;
    returns ``(net, the saved dict)`` (extra keys such as ``test_acc`` kept).

    Raises:
        FileNotFoundError: no file.
        ValueError: not such a dict (``what`` names it), an unknown
            net name, or weights that do not fit the data's shape / classes.
    """
    from lightning_dd.io import load_dict

    d = load_dict(path, ("net_cfg", "state_dict"), what)
    net = build_net_cfg(dict(d["net_cfg"]), channel, num_classes, im_size)
    try:
        net.load_state_dict(d["state_dict"])
    except RuntimeError as e:
        raise ValueError(f"{path}: the {what} does not fit this data ({num_classes} classes, "
                         f"{channel}x{'x'.join(map(str, im_size))}): {str(e)[:300]}") from None
    return net.eval(), d


def arch_name(net: nn.Module) -> str:
    """The architecture ``net`` was built as: the ``name`` (or ``_target_``'s last part) of its
    config when it came from :func:`build_net_cfg` / :func:`build_net` (``VGG11BN``, ``ResNet18``),
    else its class name."""
    return getattr(net, "arch_name", None) or type(net).__name__


def maybe_compile(net: nn.Module, compile: bool) -> nn.Module:
    """``torch.compile(net, dynamic=False)`` (an ``OptimizedModule`` sharing ``net``'s parameters
    and buffers) when ``compile`` and :func:`arch_name` of ``net`` is in :data:`COMPILE_VERIFIED`;
    otherwise ``net`` itself."""
    if compile and arch_name(net) in COMPILE_VERIFIED:
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


# torch.compile pays off only where a training step is expensive. On 8x8 digits a ConvNet step is a
# few ms eager, and compiling (~10-20 s per architecture on 2 CPU cores) made `python evaluate.py` on
# a digits result ~4x slower (25 s against 5.9 s); on 32x32 CIFAR images compiled ConvNet steps are
# ~1.7x faster and evaluations run for minutes. So evaluation runs eager below 32x32 pixels per image.
COMPILE_MIN_PIXELS = 32 * 32


def worth_compiling(image_shape: tuple[int, ...]) -> bool:
    """Whether ``trainer.compile`` should apply to evaluation nets on ``(C, H, W)`` images."""
    return image_shape[-2] * image_shape[-1] >= COMPILE_MIN_PIXELS
