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
import io
import logging
import pickle
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lightning_dd.io import atomic_save  # noqa: F401  (re-exported)
from lightning_dd.io import load_cache, require_keys, save_cache

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff"}


def printable(text: str) -> str:
    """``text`` with any undecodable file-name bytes (the surrogates Python decodes a non-UTF-8 name
    to) shown as ``\\xNN`` escapes, so an error message naming such a file can be printed."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that did not come from a file name
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


class DataNotFoundError(FileNotFoundError):
    """A data set's files are missing; the message names the files expected and how to get them."""

    def __init__(self, message: str):
        super().__init__(printable(message))


class DataFormatError(ValueError):
    """A data file exists but is malformed: truncated or corrupt, wrong keys, dtypes or shapes,
    non-finite values, labels out of range, an empty class, a name that is not UTF-8, or a pickle
    that asks for objects a data file never holds. The message names the file and the problem."""

    def __init__(self, message: str):
        super().__init__(printable(message))


class ImageDecodeError(DataFormatError, OSError):
    """An image file cannot be decoded (truncated, corrupt, not an image); also an ``OSError``, as
    PIL's own errors are."""


def utf8_name(path: Path, what: str) -> str:
    """``path.name``, which must be valid UTF-8 (it becomes a class name in results and logs).

    Raises:
        DataFormatError: the name holds bytes that are not UTF-8 (the message shows them escaped).
    """
    try:
        path.name.encode("utf-8")
    except UnicodeEncodeError:
        raise DataFormatError(f"{path}: {what} name is not valid UTF-8; rename it") from None
    return path.name


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


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for ``bytes`` (latin-1 only)."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return text.encode(encoding)


def numpy_pickle_globals() -> dict[tuple[str, str], object]:
    """The globals a pickled ``numpy.ndarray`` refers to (numpy 1.x and 2.x module names, pickle
    protocols 2-5): ``_reconstruct``, ``scalar``, ``_frombuffer``, ``ndarray``, ``dtype`` and the
    ``_codecs.encode`` of protocol-2 ``bytes``. None of them runs code."""
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric
    out: dict[tuple[str, str], object] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                                          ("_codecs", "encode"): _latin1_encode}
    for mod in ("numpy.core", "numpy._core"):
        out[(f"{mod}.multiarray", "_reconstruct")] = multiarray._reconstruct
        out[(f"{mod}.multiarray", "scalar")] = multiarray.scalar
        out[(f"{mod}.numeric", "_frombuffer")] = numeric._frombuffer
    return out


def restricted_unpickle(path: Path, allowed: dict[tuple[str, str], object], what: str, encoding: str = "bytes",
                        data: bytes | None = None):
    """Unpickle ``path`` (or ``data``, read from ``path``) resolving only the globals in ``allowed``
    (``(module, name) -> object``): a crafted pickle cannot run code (``os.system``,
    ``builtins.eval``, ... are refused).

    Raises:
        DataFormatError: a global outside ``allowed`` (named), or not a readable pickle (empty,
            truncated, corrupt); the message names ``path`` and ``what`` it should be.
    """

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) not in allowed:
                raise DataFormatError(
                    f"{path}: refused to unpickle {module}.{name}: a {what} holds only "
                    f"{', '.join(sorted({m + '.' + n for m, n in allowed}))} and plain lists, dicts, strings "
                    f"and numbers; lightning_dd never unpickles other objects (they could run code)")
            return allowed[(module, name)]

        def persistent_load(self, pid):
            raise pickle.UnpicklingError("persistent ids are not supported")

    try:
        if data is not None:
            return Unpickler(io.BytesIO(data), encoding=encoding).load()
        with open(path, "rb") as fh:
            return Unpickler(fh, encoding=encoding).load()
    except DataFormatError:
        raise
    except Exception as e:  # EOFError, UnpicklingError, ValueError, TypeError, MemoryError, RecursionError, ...
        raise DataFormatError(f"{path}: not a readable {what} (empty, truncated or corrupt pickle): "
                              f"{type(e).__name__}: {str(e)[:200]}") from None


def _unpickle(path: Path) -> dict:
    """One CIFAR python pickle (numpy arrays, lists, strings, a dict) with ``str`` keys.

    Raises:
        DataFormatError: unsafe, unreadable, or not a dict (the message names ``path``).
    """
    d = restricted_unpickle(path, numpy_pickle_globals(), "CIFAR python batch")
    if not isinstance(d, dict):
        raise DataFormatError(f"{path}: not a CIFAR python batch: expected a pickled dict, got {type(d).__name__}")
    return {(k.decode("utf-8", "backslashreplace") if isinstance(k, bytes) else k): v for k, v in d.items()}


def _key(path: Path, d: dict, key: str):
    if key not in d:
        raise DataFormatError(f"{path}: key {key!r} missing (found {sorted(map(str, d))})")
    return d[key]


def _cifar_batch(path: Path, labels_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """``data`` ``(n, 3072)`` uint8 and ``labels`` ``(n,)`` int64 in ``[0, num_classes)`` of one batch.

    Raises:
        DataFormatError: a key missing, wrong dtype or shape, label count or range (names ``path``).
    """
    d = _unpickle(path)
    x = _key(path, d, "data")
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
        got = f"{x.dtype} array of shape {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise DataFormatError(f"{path}: 'data' must be a (N, 3072) uint8 array (three 32x32 planes per row), "
                              f"got a {got}")
    raw = _key(path, d, labels_key)
    try:
        y = np.asarray(raw)
    except Exception as e:  # ragged lists, ints beyond int64, ...
        raise DataFormatError(f"{path}: {labels_key!r} is not a list of integers: {type(e).__name__}: {e}") from None
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) and y.dtype != np.bool_):
        raise DataFormatError(f"{path}: {labels_key!r} must be a list of integers, got {y.dtype} of shape {y.shape}")
    if len(y) != len(x):
        raise DataFormatError(f"{path}: {len(x)} images but {len(y)} {labels_key!r}")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise DataFormatError(f"{path}: {labels_key!r} must lie in [0, {num_classes}), got [{y.min()}, {y.max()}]")
    return x, y.astype(np.int64)


def _cifar_names(path: Path, key: str, num_classes: int) -> list[str]:
    """The ``num_classes`` distinct class names of a CIFAR meta file.

    Raises:
        DataFormatError: key missing, not a list of ``num_classes`` distinct UTF-8 strings.
    """
    raw = _key(path, _unpickle(path), key)
    names = []
    for n in raw if isinstance(raw, (list, tuple)) else ():
        if isinstance(n, bytes):
            try:
                n = n.decode("utf-8")
            except UnicodeDecodeError:
                raise DataFormatError(f"{path}: class name {n!r} in {key!r} is not UTF-8") from None
        if not isinstance(n, str):
            break
        names.append(n)
    if not isinstance(raw, (list, tuple)) or len(names) != len(raw) or len(names) != num_classes:
        got = f"{len(raw)} entries" if isinstance(raw, (list, tuple)) else type(raw).__name__
        raise DataFormatError(f"{path}: {key!r} must list {num_classes} class names (strings), got {got}")
    if len(set(names)) != len(names):
        raise DataFormatError(f"{path}: {key!r} repeats a class name: {names}")
    return names


def cifar_pickle_dir(root: str | Path, name: str) -> Path | None:
    """The pickle directory of ``name`` under ``root`` (or ``root`` itself), if complete."""
    lay = CIFAR_LAYOUT[name]
    for d in (Path(root) / lay["dir"], Path(root)):
        if all((d / f).is_file() for f in lay["train"] + lay["test"] + [lay["meta"]]):
            return d
    return None


def read_cifar(root: str | Path, name: str = "cifar10") -> ImageSet:
    """Read the original CIFAR-10/100 python pickles under ``root``.

    The pickles are read with a restricted unpickler (:func:`restricted_unpickle`): numpy arrays,
    lists, strings and dicts only, so a crafted file cannot run code.

    Raises:
        ValueError: unknown ``name``. DataNotFoundError: a pickle file is missing.
        DataFormatError: a pickle is unsafe, truncated or corrupt, lacks a key, has ``data`` other
            than ``(N, 3072)`` uint8, labels not integers in ``[0, K)`` or not one per image, the
            meta file not ``K`` distinct names (K = 10 or 100), or a split without images; the
            message names the file. (A class without images is allowed: trimmed copies exist.)
    """
    if name not in CIFAR_LAYOUT:
        raise ValueError(f"CIFAR name must be one of {sorted(CIFAR_LAYOUT)}, got {name!r}")
    lay = CIFAR_LAYOUT[name]
    d = cifar_pickle_dir(root, name)
    if d is None:
        raise DataNotFoundError(missing_message(root, name))
    k = 10 if name == "cifar10" else 100
    names = _cifar_names(d / lay["meta"], lay["names"], k)

    def load(files):
        parts = [_cifar_batch(d / f, lay["labels"], k) for f in files]
        x = np.concatenate([p[0] for p in parts]).reshape(-1, 3, 32, 32)
        if len(x) == 0:
            raise DataFormatError(f"{d}: {', '.join(files)} hold no images")
        return torch.from_numpy(x.copy()), torch.from_numpy(np.concatenate([p[1] for p in parts]))

    xtr, ytr = load(lay["train"])
    xte, yte = load(lay["test"])
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
    """Sorted class folder names of ``split_dir`` and the ``(image file, label)`` pairs.

    Raises:
        DataFormatError: a class folder name that is not UTF-8, or a class folder without images.
    """
    classes = sorted(utf8_name(p, "class folder") for p in split_dir.iterdir() if p.is_dir())
    files = []
    for c, cls in enumerate(classes):
        mine = [(f, c) for f in sorted((split_dir / cls).iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
        if not mine:
            raise DataFormatError(f"{split_dir / cls}: empty class folder (no {'/'.join(sorted(IMAGE_SUFFIXES))} "
                                  f"files); remove it or add its images")
        files += mine
    return classes, files


def _decode(path: Path) -> np.ndarray:
    """One image file -> ``(H, W, 3)`` uint8 RGB (any mode converted).

    Raises:
        ImageDecodeError: the file cannot be decoded (truncated, corrupt, not an image); the message
            names ``path`` and PIL's reason.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise ImageDecodeError(f"cannot decode image {path}: {type(e).__name__}: {e}") from e


def _decode_all(files: list[tuple[Path, int]], workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode ``(file, label)`` pairs in a thread pool -> ``(N, 3, H, W)`` uint8, ``(N,)`` int64.

    Raises:
        ImageDecodeError: a file cannot be decoded (named). DataFormatError: the images differ in
            size (one file of each size is named).
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
        raise DataFormatError(f"images of different sizes: {sizes}{'; ...' if len(by_shape) > 4 else ''}: resize them "
                         f"to one size first")
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor([c for _, c in files], dtype=torch.int64)


def cache_matches(cached: ImageSet, path: Path, classes: list[str], train: list[tuple[Path, int]],
                  test: list[tuple[Path, int]], decode) -> bool:
    """Whether a decode-cache entry (checksum already verified) holds the listed files: the same
    class names, one image per file with the listing's labels, and the first image of each split
    equal to ``decode(file)`` ``(H, W, 3)`` uint8 (a spot check). An entry that differs (a writer bug,
    or a planted entry with a matching checksum) is reported and not used; the caller decodes again
    and overwrites it.
    """
    why = None
    if list(cached.classes) != list(classes):
        why = f"classes {list(cached.classes)[:5]} instead of {classes[:5]}"
    for split, files, x, y in (("train", train, cached.train_images, cached.train_labels),
                               ("test", test, cached.test_images, cached.test_labels)):
        if why is None and (len(x) != len(files) or not torch.equal(y, torch.tensor([c for _, c in files]))):
            why = f"{len(x)} {split} images/labels for {len(files)} files, or other labels"
        if why is None and not torch.equal(x[0].permute(1, 2, 0), torch.from_numpy(np.array(decode(files[0][0])))):
            why = f"its first {split} image differs from {files[0][0]}"
    if why is not None:
        log.warning("decoded-image cache entry %s does not match the files (%s): decoding again", path, why)
    return why is None


def read_class_folders(root: str | Path, cache_dir: str | Path | None = None, workers: int = 4) -> ImageSet:
    """Read ``root/train/<class>/*`` and ``root/test/<class>/*`` (equal-size RGB images).

    Args:
        root: the data set directory.
        cache_dir: where decoded tensors are cached (``None`` = no cache); the key covers every
            file's name, size and mtime.

    Raises:
        DataNotFoundError: ``root/train`` or ``root/test`` missing or empty.
        DataFormatError (a ValueError): the splits' class folders differ, a class folder is empty
            or its name not UTF-8, or image sizes differ.
        ImageDecodeError (a DataFormatError and an OSError): an image cannot be decoded
            (truncated, corrupt); the message names the file.
            Nothing is written to ``cache_dir`` unless every image decoded.
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
        raise DataFormatError(f"{root}: test classes {test_classes} differ from train classes {classes}")
    cache = None
    if cache_dir is not None:
        h = hashlib.sha1()
        for f, c in train + test:
            st = f.stat()
            h.update(f"{f.relative_to(root)}|{c}|{st.st_size}|{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
        cache = Path(cache_dir) / "decoded" / f"{root.name}-{h.hexdigest()[:16]}.pt"
        cached = ImageSet.load_cache(cache)
        if cached is not None and cache_matches(cached, cache, classes, train, test, _decode):
            return cached
    xtr, ytr = _decode_all(train, workers)
    xte, yte = _decode_all(test, workers)
    out = ImageSet(xtr, ytr, xte, yte, classes)
    if cache is not None:
        out.save_cache(cache)
    return out
