"""Saved result artifacts and their validation.

``distilled.pt`` (:class:`DistilledSet`) holds everything needed to use a distilled image set:
images in model space, hard labels or soft-label logits, the learned student lr, class names,
the preprocessing (mean/std or ZCA matrices) that maps real pixels to model space and back, the
method and IPC.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lightning_dd.data.readers import atomic_save

FORMAT_VERSION = 1


def load_dict(path: str | Path, keys: tuple[str, ...], what: str) -> dict:
    """``torch.load`` a saved artifact that must be a dict holding ``keys``.

    Raises:
        FileNotFoundError: no file at ``path``. ValueError: not a dict with those keys (``what``
            names the artifact in the message).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    d = torch.load(path, weights_only=False)
    if not isinstance(d, dict) or any(k not in d for k in keys):
        raise ValueError(f"{path}: not a lightning_dd {what} (expected keys {', '.join(keys)}, ...)")
    return d


def load_artifact(cls, path: str | Path, keys: tuple[str, ...], what: str):
    """Load a saved dataclass artifact ``cls`` (unknown keys ignored) and validate it; errors are
    prefixed with ``path``.

    Raises:
        FileNotFoundError: no file. ValueError: not such an artifact, or invalid (``cls.validate``).
    """
    d = load_dict(path, keys, what)
    out = cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})
    try:
        out.validate()
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return out


@dataclass
class DistilledSet:
    """A distilled (or selected) image set.

    Attributes:
        images: ``(N, C, H, W)`` float32, model space (see ``preprocessing``).
        labels: ``(N,)`` int64 hard labels, or ``(N, K)`` float32 soft-label logits.
        lr: learned student learning rate (``None`` when the method learns none).
        classes: ``K`` class names.
        preprocessing: :class:`lightning_dd.data.Preprocessing` state (mean, std, zca_*).
        method: producing method; ipc: images per class; meta: free-form extras.
    """

    images: torch.Tensor
    labels: torch.Tensor
    lr: float | None
    classes: list[str]
    preprocessing: dict
    method: str = ""
    ipc: int = 0
    meta: dict = field(default_factory=dict)

    @property
    def soft(self) -> bool:
        return self.labels.dim() == 2

    def hard_labels(self) -> torch.Tensor:
        """``(N,)`` int64 class of each image: the class it was synthesized for when the method
        recorded it (``meta["hard_labels"]``, e.g. SRe2L's recovered class, whose soft labels are a
        teacher's prediction), else the argmax of soft labels, else the labels."""
        if self.meta.get("hard_labels") is not None:
            return torch.as_tensor(self.meta["hard_labels"], dtype=torch.long)
        return self.labels.argmax(1) if self.soft else self.labels

    def save(self, path: str | Path) -> None:
        """Write atomically (a killed run never leaves half a file)."""
        self.validate()
        atomic_save({"format_version": FORMAT_VERSION, **asdict(self)}, path)

    @classmethod
    def load(cls, path: str | Path) -> "DistilledSet":
        """Read and validate ``path``.

        Raises:
            FileNotFoundError: missing file. ValueError: not a distilled set, or invalid (see
            :meth:`validate`).
        """
        return load_artifact(cls, path, ("images", "labels"), "distilled set")

    def validate(self) -> None:
        """Raises ValueError naming the problem: shape, label count/range, NaN, class count."""
        from lightning_dd.evaluate.student import check_set

        check_set(self.images, self.labels, len(self.classes))


@dataclass
class CondensedGraph:
    """A condensed (or selected) graph, ``condensed.pt``.

    Attributes:
        x: ``(N', F)`` float32 node features.
        adj: ``(N', N')`` float32 weighted adjacency: symmetric, non-negative, zero diagonal.
        y: ``(N',)`` int64 labels.
        method: producing method; reduction_rate: GCond's convention (N' / number of labeled
            training nodes, transductive); meta: free-form extras (data config, ...).
    """

    x: torch.Tensor
    adj: torch.Tensor
    y: torch.Tensor
    method: str = ""
    reduction_rate: float = 0.0
    meta: dict = field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        """Validate, then write atomically."""
        self.validate()
        atomic_save({"format_version": FORMAT_VERSION, "kind": "condensed_graph", **asdict(self)}, path)

    @classmethod
    def load(cls, path: str | Path) -> "CondensedGraph":
        """Raises FileNotFoundError / ValueError (see :meth:`validate`)."""
        return load_artifact(cls, path, ("x", "adj", "y"), "condensed graph")

    def validate(self) -> None:
        """Raises ValueError naming the problem: shapes, label count, NaN, asymmetric or negative
        adjacency, self loops."""
        n = self.x.shape[0]
        if self.x.dim() != 2:
            raise ValueError(f"x must be (N, F), got {tuple(self.x.shape)}")
        if tuple(self.adj.shape) != (n, n):
            raise ValueError(f"adj must be ({n}, {n}) for {n} nodes, got {tuple(self.adj.shape)}")
        if self.y.shape != (n,) or self.y.dtype != torch.int64:
            raise ValueError(f"y must be ({n},) int64, got {tuple(self.y.shape)} {self.y.dtype}")
        if not (torch.isfinite(self.x).all() and torch.isfinite(self.adj).all()):
            raise ValueError("x or adj contain NaN/inf")
        if (self.adj < 0).any():
            raise ValueError("adj has negative weights")
        if not torch.allclose(self.adj, self.adj.T, atol=1e-6):
            raise ValueError("adj is not symmetric")
        if self.adj.diagonal().abs().max() > 0 if n else False:
            raise ValueError("adj has self loops (non-zero diagonal)")
