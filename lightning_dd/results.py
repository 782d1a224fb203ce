"""Saved result artifacts and their validation.

``distilled.pt`` (:class:`DistilledSet`) holds everything needed to use a distilled image set:
images in model space, hard labels or soft-label logits, the learned student lr, class names,
the preprocessing (mean/std or ZCA matrices) that maps real pixels to model space and back, the
method and IPC.
"""
from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field
from pathlib import Path

import torch

from lightning_dd.io import atomic_save, format_version, load_dict

FORMAT_VERSION = 1
"""Version of the ``distilled.pt`` / ``condensed.pt`` dicts. 1: every dataclass field, as
written since the first release. 0 (no ``format_version`` key: a file written by hand or by
another tool): only the required keys; ``lr`` defaults to ``None`` and ``classes`` to
``["0", "1", ...]`` (one per label class), the other fields to their dataclass defaults."""


def _version0_defaults(d: dict) -> dict:
    """Fill what a version-0 artifact may lack (see :data:`FORMAT_VERSION`)."""
    out = dict(d)
    out.setdefault("lr", None)
    out.setdefault("preprocessing", {})
    labels = out.get("labels")
    if "classes" not in out and isinstance(labels, torch.Tensor) and labels.numel():
        k = labels.shape[1] if labels.dim() == 2 else int(labels.max()) + 1
        out["classes"] = [str(i) for i in range(k)]
    return out


def load_artifact(cls, path: str | Path, keys: tuple[str, ...], what: str):
    """Load a saved dataclass artifact ``cls`` (unknown keys ignored; a version-0 file gets the
    defaults of :func:`_version0_defaults`) and validate it; errors are prefixed with ``path``.

    Raises:
        FileNotFoundError: no file. UnsafeFileError (a ValueError): the file needs arbitrary
            unpickling (refused, nothing runs). ValueError: not such an artifact, a format version
            newer than :data:`FORMAT_VERSION`, a missing field, or invalid (``cls.validate``).
    """
    d = load_dict(path, keys, what)
    if format_version(d, path, what, FORMAT_VERSION) == 0:
        d = _version0_defaults(d)
    fields = cls.__dataclass_fields__
    missing = [k for k, f in fields.items() if k not in d and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise ValueError(f"{path}: not a complete {what}: missing {', '.join(missing)}")
    out = cls(**{k: v for k, v in d.items() if k in fields})
    try:
        out.validate()
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return out


def check_set(images: torch.Tensor, labels: torch.Tensor, num_classes: int, image_shape: tuple | None = None) -> None:
    """Validate a set before training on it.

    Raises:
        ValueError: naming the problem (dims, shape vs. ``image_shape``, label count, label range,
            soft-label width, NaN/inf pixels).
    """
    if images.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    if image_shape is not None and tuple(images.shape[1:]) != tuple(image_shape):
        raise ValueError(f"images have shape (C, H, W)={tuple(images.shape[1:])}, the test set {tuple(image_shape)}")
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    if labels.dim() == 1:
        if labels.dtype != torch.int64:
            raise ValueError(f"hard labels must be int64, got {labels.dtype}")
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    elif labels.dim() == 2:
        if labels.shape[1] != num_classes:
            raise ValueError(f"soft labels have {labels.shape[1]} classes, expected {num_classes}")
        if not torch.isfinite(labels).all():
            raise ValueError("soft labels contain NaN or inf")
    else:
        raise ValueError(f"labels must be (N,) or (N, K), got shape {tuple(labels.shape)}")
    if not torch.isfinite(images).all():
        raise ValueError(f"images contain {int((~torch.isfinite(images)).sum())} NaN/inf values")


def check_lr(lr) -> None:
    """Raises ValueError unless ``lr`` is ``None`` or a finite number > 0 (a 0-d tensor counts)."""
    if lr is None:
        return
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(f"lr must be a number, got a tensor of shape {tuple(lr.shape)}")
        lr = lr.item()
    if isinstance(lr, bool) or not isinstance(lr, (int, float)):
        raise ValueError(f"lr must be None or a number, got {type(lr).__name__}")
    if not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be None or a finite number > 0, got {lr} (a student trained with it learns "
                         f"nothing; re-run the distillation, or drop the lr and evaluate with eval.lr)")


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
            FileNotFoundError: missing file.
            ValueError: not a distilled set, or invalid (see
                :meth:`validate`).
        """
        return load_artifact(cls, path, ("images", "labels"), "distilled set")

    def validate(self) -> None:
        """Raises ValueError naming the problem: images/labels not tensors, shape, label
        count/range, NaN/inf pixels or soft labels, class count, an ``lr`` that is not ``None`` or
        a finite number > 0 (a NaN lr would train every student to chance), a negative ``ipc``."""
        if not isinstance(self.images, torch.Tensor) or not isinstance(self.labels, torch.Tensor):
            raise ValueError(f"images and labels must be tensors, got {type(self.images).__name__} and "
                             f"{type(self.labels).__name__}")
        if not self.images.is_floating_point():
            raise ValueError(f"images must be floating point (model space), got {self.images.dtype}")
        if not isinstance(self.classes, (list, tuple)) or not all(isinstance(c, str) for c in self.classes):
            raise ValueError(f"classes must be a list of class-name strings, got {str(self.classes)[:80]}")
        for name, value, typ in (("preprocessing", self.preprocessing, dict), ("meta", self.meta, dict),
                                 ("method", self.method, str)):
            if not isinstance(value, typ):
                raise ValueError(f"{name} must be a {typ.__name__}, got {type(value).__name__}")
        check_set(self.images, self.labels, len(self.classes))
        check_lr(self.lr)
        if not isinstance(self.ipc, int) or self.ipc < 0:
            raise ValueError(f"ipc must be a non-negative int, got {self.ipc!r}")
        pre = self.preprocessing
        if pre:  # a version-0 file may have none
            c, d = self.images.shape[1], self.images[0].numel()
            try:
                mean, std = (torch.as_tensor(pre[k], dtype=torch.float32) for k in ("mean", "std"))
            except (KeyError, TypeError, ValueError, RuntimeError) as e:
                raise ValueError(f"preprocessing must hold numeric 'mean' and 'std': {type(e).__name__}: {e}") from None
            if mean.shape != (c,) or std.shape != (c,) or not torch.isfinite(mean).all() or not (std > 0).all():
                raise ValueError(f"preprocessing mean/std must be {c} finite values (std > 0), got shapes "
                                 f"{tuple(mean.shape)} and {tuple(std.shape)}")
            for k, shape in (("zca", (d, d)), ("zca_mean", (1, d)), ("zca_inv", (d, d))):
                v = pre.get(k)
                if v is not None and not (isinstance(v, torch.Tensor) and tuple(v.shape) == shape
                                          and torch.isfinite(v).all()):
                    raise ValueError(f"preprocessing[{k!r}] must be a finite {shape} tensor or None")
        hl = self.meta.get("hard_labels")
        if hl is not None and not (isinstance(hl, torch.Tensor) and hl.dtype == torch.int64
                                   and tuple(hl.shape) == (len(self.images),)
                                   and (not len(hl) or (int(hl.min()) >= 0 and int(hl.max()) < len(self.classes)))):
            raise ValueError(f"meta['hard_labels'] must be ({len(self.images)},) int64 class indices in "
                             f"[0, {len(self.classes)})")


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
        for name in ("x", "adj", "y"):
            if not isinstance(getattr(self, name), torch.Tensor):
                raise ValueError(f"{name} must be a tensor, got {type(getattr(self, name)).__name__}")
        if not isinstance(self.meta, dict):
            raise ValueError(f"meta must be a dict, got {type(self.meta).__name__}")
        if self.x.dim() != 2:
            raise ValueError(f"x must be (N, F), got {tuple(self.x.shape)}")
        n = self.x.shape[0]
        if tuple(self.adj.shape) != (n, n):
            raise ValueError(f"adj must be ({n}, {n}) for {n} nodes, got {tuple(self.adj.shape)}")
        if self.y.shape != (n,) or self.y.dtype != torch.int64:
            raise ValueError(f"y must be ({n},) int64, got {tuple(self.y.shape)} {self.y.dtype}")
        if not (self.x.is_floating_point() and self.adj.is_floating_point()):
            raise ValueError(f"x and adj must be floating point, got {self.x.dtype} and {self.adj.dtype}")
        if n and int(self.y.min()) < 0:
            raise ValueError(f"y must be class indices >= 0, got min {int(self.y.min())}")
        if not (torch.isfinite(self.x).all() and torch.isfinite(self.adj).all()):
            raise ValueError("x or adj contain NaN/inf")
        if (self.adj < 0).any():
            raise ValueError("adj has negative weights")
        if not torch.allclose(self.adj, self.adj.T, atol=1e-6):
            raise ValueError("adj is not symmetric")
        if self.adj.diagonal().abs().max() > 0 if n else False:
            raise ValueError("adj has self loops (non-zero diagonal)")
