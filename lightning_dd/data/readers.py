"""Readers of image data sets in their original on-disk formats, with a decode cache.

* CIFAR-10/100 python pickles (what ``torchvision.datasets.CIFAR10/100`` download):
  ``cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`` and
  ``cifar-100-python/{train, test, meta}``; each row of ``data`` is 3072 uint8 = three 32x32
  channel planes.
* The class-folder layout ``train/<class>/*.{jpg,png,...}``, ``test/<class>/*`` (the real CIFAR-10
  copy in ``shared/data/cifar10`` is JPEG in this layout). Classes are the sorted folder names.

Decoded tensors are cached (``cache_dir``) keyed by the files' names, sizes and mtimes, so a
changed file is never served stale. Every write is atomic, and a cache entry carries a checksum:
a truncated or corrupted entry is reported, deleted and decoded again (:meth:`ImageSet.load_cache`).
"""
from __future__ import annotations

import hashlib
import pickle
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lightning_dd.io import atomic_save  # noqa: F401  (re-exported)
from lightning_dd.io import load_cache, require_keys, save_cache

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff"}


class DataNotFoundError(FileNotFoundError):
    """A data set's files are missing; the message names the files expected and how to get them."""


@dataclass
class ImageSet:
    """A decoded image classification data set.

    Attributes:
        train_images, test_images: ``(N, C, H, W)`` uint8.
        train_labels, test_labels: ``(N,)`` int64 in ``[0, K)``.
        classes: the ``K`` class names, index = label.
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list[str]

    def save_cache(self, path: str | Path) -> None:
        """Write this set as a decode-cache entry (atomic, with a checksum: :func:`lightning_dd.io.save_cache`)."""
        save_cache(dict(self.__dict__), path)

    @classmethod
    def load_cache(cls, path: str | Path) -> "ImageSet | None":
        """The decode-cache entry at ``path``, or ``None`` when it is missing or unusable
        (truncated, corrupted, not uint8 ``(N, C, H, W)`` images with ``(N,)`` labels: reported
        and deleted, so the caller decodes again; :func:`lightning_dd.io.load_cache`).

        Raises:
            lightning_dd.io.UnsafeFileError: the entry needs arbitrary unpickling (refused)."""
        def check(d):
            require_keys(*cls.__dataclass_fields__)(d)
            for split in ("train", "test"):
                x, y = d[f"{split}_images"], d[f"{split}_labels"]
                if not (isinstance(x, torch.Tensor) and x.dtype == torch.uint8 and x.dim() == 4
                        and isinstance(y, torch.Tensor) and y.shape == (len(x),)):
                    raise ValueError(f"{split} images/labels are not uint8 (N, C, H, W) and (N,)")

        d = load_cache(path, "decoded-image cache entry", check)
        return None if d is None else cls(**{k: d[k] for k in cls.__dataclass_fields__})


CIFAR_LAYOUT = {
    "cifar10": {"dir": "cifar-10-batches-py", "train": [f"data_batch_{i}" for i in range(1, 6)],
                "test": ["test_batch"], "meta": "batches.meta", "names": "label_names", "labels": "labels"},
    "cifar100": {"dir": "cifar-100-python", "train": ["train"], "test": ["test"], "meta": "meta",
                 "names": "fine_label_names", "labels": "fine_labels"},
}


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as fh:
        d = pickle.load(fh, encoding="bytes")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}


def cifar_pickle_dir(root: str | Path, name: str) -> Path | None:
    """The pickle directory of ``name`` under ``root`` (or ``root`` itself), if complete."""
    lay = CIFAR_LAYOUT[name]
    for d in (Path(root) / lay["dir"], Path(root)):
        if all((d / f).is_file() for f in lay["train"] + lay["test"] + [lay["meta"]]):
            return d
    return None


def read_cifar(root: str | Path, name: str = "cifar10") -> ImageSet:
    """Read the original CIFAR-10/100 python pickles under ``root``.

    Raises:
        ValueError: unknown ``name``. DataNotFoundError: a pickle file is missing.
    """
    if name not in CIFAR_LAYOUT:
        raise ValueError(f"CIFAR name must be one of {sorted(CIFAR_LAYOUT)}, got {name!r}")
    lay = CIFAR_LAYOUT[name]
    d = cifar_pickle_dir(root, name)
    if d is None:
        raise DataNotFoundError(missing_message(root, name))

    def load(files):
        parts = [_unpickle(d / f) for f in files]
        x = np.concatenate([p["data"] for p in parts]).reshape(-1, 3, 32, 32)
        y = np.concatenate([np.asarray(p[lay["labels"]], dtype=np.int64) for p in parts])
        return torch.from_numpy(x.copy()), torch.from_numpy(y)

    xtr, ytr = load(lay["train"])
    xte, yte = load(lay["test"])
    names = [n.decode() if isinstance(n, bytes) else n for n in _unpickle(d / lay["meta"])[lay["names"]]]
    return ImageSet(xtr, ytr, xte, yte, names)


def missing_message(root: str | Path, name: str) -> str:
    lay = CIFAR_LAYOUT.get(name, CIFAR_LAYOUT["cifar10"])
    root = Path(root)
    files = ", ".join(lay["train"] + lay["test"] + [lay["meta"]])
    return (f"{name}: no data found at {root.resolve()}. Expected either the original python pickles "
            f"{root / lay['dir']}/{{{files}}} or the class-folder layout {root}/train/<class>/*.jpg and "
            f"{root}/test/<class>/*.jpg. Point paths.data_dir (or the LDD_DATA_DIR environment variable) at the "
            f"directory holding '{root.name}', or pass data.download=true to fetch the pickles with torchvision.")


def _list_split(split_dir: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    files = []
    for c, cls in enumerate(classes):
        files += [(f, c) for f in sorted((split_dir / cls).iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    return classes, files


def _decode(path: Path) -> np.ndarray:
    """One image file -> ``(H, W, 3)`` uint8 RGB (any mode converted).

    Raises:
        OSError: the file cannot be decoded (truncated, corrupt, not an image); the message names
            ``path`` and PIL's reason.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise OSError(f"cannot decode image {path}: {type(e).__name__}: {e}") from e


def _decode_all(files: list[tuple[Path, int]], workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode ``(file, label)`` pairs in a thread pool -> ``(N, 3, H, W)`` uint8, ``(N,)`` int64.

    Raises:
        OSError: a file cannot be decoded (named). ValueError: the images differ in size (one file
            of each size is named).
    """
    with ThreadPoolExecutor(max(1, workers)) as pool:  # PIL releases the GIL while decoding
        arrays = list(pool.map(_decode, [f for f, _ in files], chunksize=256))
    by_shape: dict[tuple, tuple[Path, int]] = {}
    for (f, _), a in zip(files, arrays):
        first, count = by_shape.get(a.shape, (f, 0))
        by_shape[a.shape] = (first, count + 1)
    if len(by_shape) > 1:
        sizes = "; ".join(f"{c} of {s[1]}x{s[0]} (e.g. {f})" for s, (f, c) in
                          sorted(by_shape.items(), key=lambda kv: -kv[1][1])[:4])
        raise ValueError(f"images of different sizes: {sizes}{'; ...' if len(by_shape) > 4 else ''}: resize them "
                         f"to one size first")
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor([c for _, c in files], dtype=torch.int64)


def read_class_folders(root: str | Path, cache_dir: str | Path | None = None, workers: int = 4) -> ImageSet:
    """Read ``root/train/<class>/*`` and ``root/test/<class>/*`` (equal-size RGB images).

    Args:
        root: the data set directory.
        cache_dir: where decoded tensors are cached (``None`` = no cache); the key covers every
            file's name, size and mtime.

    Raises:
        DataNotFoundError: ``root/train`` or ``root/test`` missing or empty.
        ValueError: the test split has classes the train split lacks, or image sizes differ.
        OSError: an image cannot be decoded (truncated, corrupt); the message names the file.
    """
    root = Path(root)
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise DataNotFoundError(f"class-folder data set not found: expected {root}/train/<class>/* and "
                                f"{root}/test/<class>/*")
    classes, train = _list_split(root / "train")
    test_classes, test = _list_split(root / "test")
    if not train or not test:
        raise DataNotFoundError(f"no images under {root}/train/<class>/ or {root}/test/<class>/ "
                                f"(suffixes {sorted(IMAGE_SUFFIXES)})")
    if test_classes != classes:
        raise ValueError(f"{root}: test classes {test_classes} differ from train classes {classes}")
    cache = None
    if cache_dir is not None:
        h = hashlib.sha1()
        for f, c in train + test:
            st = f.stat()
            h.update(f"{f.relative_to(root)}|{c}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        cache = Path(cache_dir) / "decoded" / f"{root.name}-{h.hexdigest()[:16]}.pt"
        cached = ImageSet.load_cache(cache)
        if cached is not None:
            return cached
    xtr, ytr = _decode_all(train, workers)
    xte, yte = _decode_all(test, workers)
    out = ImageSet(xtr, ytr, xte, yte, classes)
    if cache is not None:
        out.save_cache(cache)
    return out
