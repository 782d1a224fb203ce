"""Weight selection (Xu et al., "Initializing Models with Larger Ones", ICLR 2024, arXiv 2311.18823):
initialize a smaller network from a larger pretrained one of the same family.

Layer selection: the student's layers take the teacher's layers of the same name, so a student
with ``depth`` blocks takes the teacher's first ``depth`` blocks (``blocks.0 .. blocks.depth-1``;
the paper's "first-N" selection). Component mapping: parameters are matched by name. Element
selection: in every dimension, uniformly spaced indices (:func:`uniform_indices`: every ``k``-th
when the sizes divide, else a rounded linspace), the same rule for every tensor, so that the
selected channels agree across layers (the paper's "consistency"). Parameters whose names start
with one of ``fresh`` (the classifier head) keep the student's own initialization.

Deviation: the paper's uniform selection for non-divisible sizes is not specified beyond
"uniform"; a rounded ``linspace(0, T-1, S)`` is used.
"""
from __future__ import annotations

import torch
import torch.nn as nn


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


@torch.no_grad()
def weight_selection(student: nn.Module, teacher_state: dict[str, torch.Tensor],
                     fresh: tuple[str, ...] = ("head.",)) -> nn.Module:
    """Initialize ``student`` in place from ``teacher_state`` (the larger model's state dict) by
    weight selection (module docstring) and return it; ``fresh`` prefixes keep their init.

    Raises:
        ValueError: a student entry without a teacher entry of the same name (e.g. a student deeper
        than its teacher), or a student tensor larger than the teacher's in some dimension.
    """
    state = student.state_dict()
    missing = [k for k in state if not k.startswith(fresh) and k not in teacher_state]
    if missing:
        raise ValueError(f"weight selection: the teacher has no {missing[:5]} (is the student deeper or of "
                         f"another family?)")
    new = {k: (v if k.startswith(fresh) else select_elements(teacher_state[k].to(v.dtype), v.shape))
           for k, v in state.items()}
    student.load_state_dict(new, strict=True)
    return student
