"""Weight selection (Xu et al., "Initializing Models with Larger Ones", ICLR 2024, arXiv 2311.18823):
initialize a smaller network from a larger pretrained one of the same family.

Layer selection: the student's layers take the teacher's layers of the same name, so a student
with ``depth`` blocks takes the teacher's first ``depth`` blocks (``blocks.0 .. blocks.depth-1``;
the paper's "first-N" selection). Component mapping: parameters are matched by name. Element
selection: in every dimension, uniformly spaced indices (:func:`uniform_indices`: every ``k``-th
when the sizes divide, else a rounded ``linspace(0, T-1, S)``, the authors' ``uniform_element_selection``
in ``weight_selection.py``), the same rule for every tensor, so that the selected channels agree
across layers (the paper's "consistency"). Parameters whose names contain one of ``fresh`` (the
classifier head, ``"head" in key`` in the authors' loop) keep the student's own initialization.

Attention projections are selected in the fused ``qkv`` layout of timm and the authors' ViT (rows of
the ``(3D, D)`` matrix), whichever layout the teacher's state dict comes in, and split into this
project's separate ``q``/``k``/``v`` afterwards: when the student's width does not divide the
teacher's, selecting from each of q, k, v separately would pick other rows. Equal to the reference
on fixed inputs: ``tests/parity/test_parity_weight_selection.py``.
"""
from __future__ import annotations

import re

import torch
import torch.nn as nn

from lightning_dd.nets.vit import split_fused_qkv

_QKV_PART = re.compile(r"^(.*\.attn)\.([qkv])\.(weight|bias)$")


def uniform_indices(src: int, dst: int) -> torch.Tensor:
    """``dst`` uniformly spaced indices into ``src`` elements: ``0, k, 2k, ...`` with ``k = src // dst``
    when ``dst`` divides ``src``, else ``round(linspace(0, src - 1, dst))``.

    Shapes: -> ``(dst,)`` int64, strictly increasing.

    Raises:
        ValueError: ``dst > src`` or ``dst < 1``."""
    if not 1 <= dst <= src:
        raise ValueError(f"weight selection: cannot select {dst} of {src} elements")
    if src % dst == 0:
        return torch.arange(0, src, src // dst)
    return torch.linspace(0, src - 1, dst).round().long()


def select_elements(t: torch.Tensor, shape) -> torch.Tensor:
    """``t`` reduced to ``shape`` by :func:`uniform_indices` in every dimension.

    Shapes: ``t (T_1, ..., T_n)`` -> ``(S_1, ..., S_n)`` with ``S_i <= T_i``.

    Raises:
        ValueError: a different number of dimensions or a dimension that would grow."""
    if t.dim() != len(shape):
        raise ValueError(f"weight selection: {tuple(t.shape)} vs {tuple(shape)} differ in dimensions")
    for d, s in enumerate(shape):
        t = t.index_select(d, uniform_indices(t.shape[d], int(s)))
    return t


def fuse_qkv(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`lightning_dd.nets.vit.split_fused_qkv`: each ``<block>.attn.{q,k,v}.{weight,bias}``
    triple stacked (in the order q, k, v) into ``<block>.attn.qkv.{weight,bias}``; other keys, and a
    state dict that is already fused, unchanged.

    Shapes: three ``(D, D)`` -> ``qkv.weight (3D, D)``; three ``(D,)`` -> ``qkv.bias (3D,)``.

    Raises:
        KeyError: a block with only some of q, k, v."""
    out: dict[str, torch.Tensor] = {}
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, t in state.items():
        m = _QKV_PART.match(key)
        if m is None:
            out[key] = t
        else:
            parts.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = t
    for (prefix, kind), qkv in parts.items():
        out[f"{prefix}.qkv.{kind}"] = torch.cat([qkv["q"], qkv["k"], qkv["v"]])
    return out


@torch.no_grad()
def weight_selection(student: nn.Module, teacher_state: dict[str, torch.Tensor],
                     fresh: tuple[str, ...] = ("head",)) -> nn.Module:
    """Initialize ``student`` in place from ``teacher_state`` (the larger model's state dict, with fused
    or separate q/k/v) by weight selection (module docstring) and return it; keys containing one of
    ``fresh`` keep their init.

    Raises:
        ValueError: a student entry without a teacher entry of the same name (e.g. a student deeper
            than its teacher), or a student tensor larger than the teacher's in some dimension.
    """
    state = fuse_qkv(student.state_dict())
    teacher = fuse_qkv(teacher_state)
    keep = {k for k in state if any(f in k for f in fresh)}
    missing = [k for k in state if k not in keep and k not in teacher]
    if missing:
        raise ValueError(f"weight selection: the teacher has no {missing[:5]} (is the student deeper or of "
                         f"another family?)")
    new = {k: (v if k in keep else select_elements(teacher[k].to(v.dtype), v.shape)) for k, v in state.items()}
    student.load_state_dict(split_fused_qkv(new), strict=True)
    return student
