"""Image DataModules: CIFAR-10/100 (pickles or class folders) and scikit-learn's digits.

The data are small enough to live in memory as tensors: ``setup()`` decodes (or reads the decode
cache), optionally keeps ``train_per_class`` images per class, and maps pixels to *model space*
with :class:`Preprocessing` (per-channel mean/std, then ZCA whitening as in MTT/DATM's
``--zca``). Methods and the evaluator read ``train_images``/``test_images`` directly; the
Lightning dataloaders serve the same tensors.
"""
from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch

from lightning_dd.data.batches import batch_loader
from lightning_dd.data.readers import (CIFAR_LAYOUT, DataNotFoundError, ImageSet, cifar_pickle_dir,
                                       missing_message, read_cifar, read_class_folders)
from lightning_dd.io import cache_key, load_cache, require_keys, save_cache

log = logging.getLogger(__name__)


class Preprocessing:
    """Pixels in ``[0, 1]`` <-> model space: ``z = ZCA((x - mean) / std)``.

    ZCA (kornia's :func:`kornia.enhance.zca_mean`, ``eps`` added to the covariance eigenvalues;
    MTT uses 0.1) is fitted on the flattened normalized training images.

    Args:
        mean, std: per-channel ``(C,)``.
        zca: ``(D, D)`` whitening matrix, ``zca_mean`` ``(1, D)``, ``zca_inv`` ``(D, D)``, with
            ``D = C*H*W`` (all ``None`` = no whitening).
    """

    def __init__(self, mean, std, zca=None, zca_mean=None, zca_inv=None):
        self.mean = torch.as_tensor(mean, dtype=torch.float32)
        self.std = torch.as_tensor(std, dtype=torch.float32)
        self.zca, self.zca_mean, self.zca_inv = zca, zca_mean, zca_inv

    @classmethod
    def fit(cls, images01: torch.Tensor, zca: bool, eps: float = 0.1) -> "Preprocessing":
        """Fit mean/std (and ZCA) on ``images01`` ``(N, C, H, W)`` float in ``[0, 1]``."""
        mean = images01.mean((0, 2, 3))
        std = images01.std((0, 2, 3)).clamp(min=1e-6)
        pre = cls(mean, std)
        if zca:
            from kornia.enhance import zca_mean

            flat = pre._normalize(images01).reshape(len(images01), -1).double()
            w, m, inv = zca_mean(flat, dim=0, eps=eps, return_inverse=True)
            pre.zca, pre.zca_mean, pre.zca_inv = w.float(), m.float(), inv.float()
        return pre

    def _normalize(self, x):
        return (x - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)

    def forward(self, images01: torch.Tensor, chunk: int = 10000) -> torch.Tensor:
        """``(N, C, H, W)`` in ``[0, 1]`` -> model space (float32)."""
        z = self._normalize(images01.float())
        if self.zca is None:
            return z
        shape = z.shape
        flat = z.reshape(shape[0], -1)
        out = torch.cat([(part - self.zca_mean) @ self.zca.T for part in flat.split(chunk)])
        return out.reshape(shape)

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        """Model space -> pixels (``[0, 1]`` for real images; not clamped)."""
        if self.zca is not None:
            shape = z.shape
            z = (z.reshape(shape[0], -1) @ self.zca_inv.T + self.zca_mean).reshape(shape)
        return z * self.std.view(1, -1, 1, 1) + self.mean.view(1, -1, 1, 1)

    def state(self) -> dict:
        """Plain dict (saved in ``distilled.pt``); :meth:`from_state` rebuilds."""
        return {"mean": self.mean, "std": self.std, "zca": self.zca, "zca_mean": self.zca_mean,
                "zca_inv": self.zca_inv}

    @classmethod
    def from_state(cls, state: dict) -> "Preprocessing":
        return cls(**state)


class ImageDataModule(L.LightningDataModule):
    """An in-memory image classification data set in model space.

    After :meth:`setup`: ``train_images`` ``(N, C, H, W)`` float32, ``train_labels`` ``(N,)``
    int64, ``test_images``, ``test_labels``, ``classes``, ``num_classes``, ``image_shape``
    ``(C, H, W)`` and ``preprocessing``. Subclasses implement :meth:`read`.

    Args:
        name: data set name (for cache keys and logs).
        zca: ZCA-whiten (MTT/DATM ``--zca``).
        train_per_class: keep this many training images per class (``None`` = all), chosen by a
            fixed permutation of ``subset_seed``; the test set is always complete.
        train_offset_per_class: skip the first this many images of each class's permutation, so
            that runs with offsets 0 and ``train_per_class`` see disjoint training images (e.g. a
            teacher and a student trained on different halves).
        batch_size: of the Lightning dataloaders.
        cache_dir: decode/ZCA cache (``None`` = none).
    """

    def __init__(self, name: str, zca: bool = False, train_per_class: int | None = None, batch_size: int = 256,
                 cache_dir: str | None = None, subset_seed: int = 0, zca_eps: float = 0.1,
                 train_offset_per_class: int = 0):
        super().__init__()
        if train_offset_per_class < 0:
            raise ValueError(f"data.train_offset_per_class must be >= 0, got {train_offset_per_class}")
        self.train_offset_per_class = train_offset_per_class
        self.name, self.zca, self.train_per_class, self.batch_size = name, zca, train_per_class, batch_size
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.subset_seed, self.zca_eps = subset_seed, zca_eps
        self._ready = False

    def read(self) -> ImageSet:  # pragma: no cover - abstract
        raise NotImplementedError

    def source(self) -> str:
        """What identifies the raw data (a path, a package) in cache keys."""
        return self.name

    def identity(self) -> dict:
        """Everything that determines the tensors this module serves (cache keys of later stages)."""
        ident = {"name": self.name, "source": self.source(), "zca": self.zca, "zca_eps": self.zca_eps,
                 "train_per_class": self.train_per_class, "subset_seed": self.subset_seed,
                 "n_train": getattr(self, "_n_train_raw", None)}
        if self.train_offset_per_class:  # only when set: the keys of every earlier cache entry stay valid
            ident["train_offset_per_class"] = self.train_offset_per_class
        return ident

    def setup(self, stage: str | None = None) -> None:
        if self._ready:
            return
        raw = self.read()
        self._n_train_raw = len(raw.train_labels)
        idx = self._subset(raw.train_labels)
        x01 = raw.train_images[idx].float() / 255.0
        self.classes = list(raw.classes)
        self.num_classes = len(self.classes)
        self.train_labels = raw.train_labels[idx].clone()
        self.preprocessing = self._fit_preprocessing(x01)
        self.train_images = self.preprocessing.forward(x01)
        self.test_images = self.preprocessing.forward(raw.test_images.float() / 255.0)
        self.test_labels = raw.test_labels.clone()
        self.image_shape = tuple(self.train_images.shape[1:])
        self._ready = True
        log.info("%s: %d train / %d test images %s, %d classes, zca=%s", self.name, len(self.train_labels),
                 len(self.test_labels), self.image_shape, self.num_classes, self.zca)

    def _subset(self, labels: torch.Tensor) -> torch.Tensor:
        if self.train_per_class is None and not self.train_offset_per_class:
            return torch.arange(len(labels))
        g = torch.Generator().manual_seed(self.subset_seed)
        parts, lo = [], self.train_offset_per_class
        for c in range(int(labels.max()) + 1):
            i = (labels == c).nonzero().squeeze(1)
            hi = len(i) if self.train_per_class is None else lo + self.train_per_class
            if len(i) < max(hi, lo + 1):
                raise ValueError(f"data.train_per_class={self.train_per_class} with data.train_offset_per_class="
                                 f"{lo} but class {c} has {len(i)} images")
            parts.append(i[torch.randperm(len(i), generator=g)[lo:hi]].sort().values)
        return torch.cat(parts).sort().values

    def _fit_preprocessing(self, x01: torch.Tensor) -> Preprocessing:
        if not self.zca or self.cache_dir is None:
            return Preprocessing.fit(x01, self.zca, self.zca_eps)
        key = cache_key(self.identity())
        path = self.cache_dir / "preprocessing" / f"{self.name}-{key}.pt"
        c, d = x01.shape[1], x01[0].numel()

        def check(st):  # the matrices of this data's (C, H, W); else the entry is rebuilt
            require_keys("mean", "std", "zca", "zca_mean", "zca_inv")(st)
            if tuple(st["mean"].shape) != (c,) or tuple(st["std"].shape) != (c,):
                raise ValueError(f"mean/std of shape {tuple(st['mean'].shape)}, expected ({c},)")
            if any(not isinstance(st[k], torch.Tensor) or tuple(st[k].shape) != s
                   for k, s in (("zca", (d, d)), ("zca_mean", (1, d)), ("zca_inv", (d, d)))):
                raise ValueError(f"ZCA matrices are not ({d}, {d}), (1, {d}), ({d}, {d})")

        state = load_cache(path, "cached ZCA preprocessing", check)  # None: missing, or unusable (deleted)
        if state is not None:
            return Preprocessing.from_state(state)
        pre = Preprocessing.fit(x01, self.zca, self.zca_eps)
        save_cache(pre.state(), path)
        return pre

    def class_indices(self) -> list[torch.Tensor]:
        """Per class, the indices of its training images."""
        return [(self.train_labels == c).nonzero().squeeze(1) for c in range(self.num_classes)]

    def random_subset(self, ipc: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``ipc`` random training images per class (class-major) and their hard labels.

        Raises:
            ValueError: a class has fewer than ``ipc`` images.
        """
        g = torch.Generator().manual_seed(seed)
        idx = []
        for c, i in enumerate(self.class_indices()):
            if len(i) < ipc:
                raise ValueError(f"ipc={ipc} but class {self.classes[c]!r} has {len(i)} training images")
            idx.append(i[torch.randperm(len(i), generator=g)[:ipc]])
        idx = torch.cat(idx)
        return self.train_images[idx].clone(), self.train_labels[idx].clone()

    def train_dataloader(self):
        return batch_loader(self.train_images, self.train_labels, self.batch_size, seed=self.subset_seed)

    def test_dataloader(self):
        return batch_loader(self.test_images, self.test_labels, 1000)


class CIFARDataModule(ImageDataModule):
    """CIFAR-10/100 from ``root``: the original python pickles if present, else the class-folder
    layout ``root/train/<class>/*``, ``root/test/<class>/*``.

    Args:
        root: the data set directory (``${paths.data_dir}/cifar10``).
        name: ``cifar10`` or ``cifar100``.
        download: fetch the pickles with torchvision when nothing is found (never otherwise).

    Raises (from :meth:`setup`):
        DataNotFoundError: neither layout under ``root`` (the message names both).
    """

    def __init__(self, root: str, name: str = "cifar10", download: bool = False, **kwargs):
        if name not in CIFAR_LAYOUT:
            raise ValueError(f"data.name must be one of {sorted(CIFAR_LAYOUT)}, got {name!r}")
        super().__init__(name=name, **kwargs)
        self.root, self.download = Path(root), download

    def source(self) -> str:
        return str(self.root.resolve())

    def read(self) -> ImageSet:
        if cifar_pickle_dir(self.root, self.name) is not None:
            return read_cifar(self.root, self.name)
        if (self.root / "train").is_dir() and (self.root / "test").is_dir():
            return read_class_folders(self.root, cache_dir=self.cache_dir)
        if self.download:
            import torchvision

            cls = torchvision.datasets.CIFAR10 if self.name == "cifar10" else torchvision.datasets.CIFAR100
            cls(str(self.root), train=True, download=True)
            return read_cifar(self.root, self.name)
        raise DataNotFoundError(missing_message(self.root, self.name))


class DigitsDataModule(ImageDataModule):
    """scikit-learn's bundled handwritten digits (1797 real 8x8 grayscale images, 10 classes),
    shipped inside the package: the embedded default needs no download.

    Split: a fixed stratified 75/25 train/test split (``random_state=0``); pixels 0..16 -> [0, 1].
    """

    def __init__(self, **kwargs):
        kwargs.setdefault("name", "digits")
        super().__init__(**kwargs)

    def source(self) -> str:
        return "sklearn.datasets.load_digits"

    def read(self) -> ImageSet:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        d = load_digits()
        x = torch.from_numpy((d.images * (255.0 / 16.0)).round().astype("uint8")).unsqueeze(1)
        y = torch.from_numpy(d.target.astype("int64"))
        tr, te = train_test_split(range(len(y)), test_size=0.25, stratify=d.target, random_state=0)
        tr, te = torch.tensor(sorted(tr)), torch.tensor(sorted(te))
        return ImageSet(x[tr], y[tr], x[te], y[te], [str(i) for i in range(10)])


__all__ = ["Preprocessing", "ImageDataModule", "CIFARDataModule", "DigitsDataModule", "DataNotFoundError"]
