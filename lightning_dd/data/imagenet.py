"""ImageNet-1k and Tiny-ImageNet from their original JPEG layouts (the data of SRe2L arXiv
2306.13092, CDA arXiv 2311.18838 and G-VBSM arXiv 2311.17950).

Layouts (``layout=auto`` picks the first that matches under ``root``):

* ``imagenet``: ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG`` (the usual class-folder
  ImageNet, what ``torchvision.datasets.ImageFolder`` reads);
* ``tiny``: Tiny-ImageNet-200 as distributed: ``train/<wnid>/images/*.JPEG``, ``val/images/*.JPEG``
  with labels in ``val/val_annotations.txt`` (``<file>\\t<wnid>\\t...`` per line);
* ``flat``: ``<wnid>/*.JPEG`` directly under ``root`` (e.g. ``shared/data/imagenet_sample``, one
  image per class), served as both the train and the val split (smoke runs only).

Real-world files: grayscale (``L``), CMYK and palette JPEGs/PNGs are converted to RGB; sizes vary.
Two ways to serve images:

* in memory (what the framework's methods and the student evaluator read, see
  :class:`lightning_dd.data.images.ImageDataModule`): each image is decoded once, resized so its
  shorter side is ``resize_size`` and center-cropped to ``image_size`` (the standard
  256 -> 224 evaluation transform), stored as uint8 and cached (``cache_dir``, keyed by every
  file's name, size and mtime and the two sizes; checksummed, a corrupted entry is decoded again:
  :meth:`~lightning_dd.data.readers.ImageSet.load_cache`). ``train_per_class`` / ``val_per_class`` limit
  the files decoded per class. All of ImageNet-1k cannot be held this way: its 1.28M training
  images at 224 px are ~180 GiB as uint8 and ~720 GiB (~770 GB) as the float32 tensors the
  methods read, so :meth:`ImageNetDataModule.read` refuses, before decoding anything, a selection
  whose estimated peak memory (:func:`memory_estimate`) exceeds ``max_memory_gib``;
* streaming (:func:`image_folder_dataset`): a ``torch.utils.data.Dataset`` over the files with the
  standard training transforms (:func:`train_transforms`: RandomResizedCrop 224, flip, normalize;
  torchvision.transforms.v2) or evaluation transforms (:func:`val_transforms`), for training a
  teacher on the full set with a DataLoader.

Pixels map to model space with the ImageNet mean/std (0.485, 0.456, 0.406) / (0.229, 0.224,
0.225) unless ``normalize=fit``.
"""
from __future__ import annotations

import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from lightning_dd.data.images import ImageDataModule, Preprocessing
from lightning_dd.data.readers import (IMAGE_SUFFIXES, DataFormatError, DataNotFoundError, ImageDecodeError, ImageSet,
                                       cache_matches, utf8_name)

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LAYOUTS = ("auto", "imagenet", "tiny", "flat")


def _images_in(d: Path) -> list[Path]:
    return sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)


def _class_dirs(d: Path) -> list[Path]:
    """Sorted class folders of ``d`` (none when ``d`` is no folder).

    Raises:
        DataFormatError: a folder name that is not UTF-8 (it would become a class name).
    """
    dirs = sorted(p for p in d.iterdir() if p.is_dir()) if d.is_dir() else []
    for p in dirs:
        utf8_name(p, "class folder")
    return dirs


def _class_images(d: Path) -> list[Path]:
    """The images of class folder ``d``. Raises DataFormatError: none (an empty class)."""
    files = _images_in(d) if d.is_dir() else []
    if not files:
        raise DataFormatError(f"{d}: empty class folder (no {'/'.join(sorted(IMAGE_SUFFIXES))} files); remove it "
                              f"or add its images")
    return files


def _val_annotations(root: Path, index: dict[str, int]) -> list[tuple[Path, int]]:
    """Tiny-ImageNet's ``val/val_annotations.txt``: ``<file>\\t<wnid>[\\t...]`` per line.

    Raises:
        DataFormatError: not UTF-8 text, a line without two tab-separated fields, a file name with
            a path in it, a file listed twice or missing from ``val/images``, or a wnid not in
            ``train`` (the message names the file and line).
    """
    path = root / "val" / "val_annotations.txt"
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{path}: not UTF-8 text ({e})") from None
    files, seen = [], set()
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        where = f"{path} line {i}"
        if len(parts) < 2 or not parts[0]:
            raise DataFormatError(f"{where}: expected '<file>\\t<wnid>...', got {line[:80]!r}")
        name, wnid = parts[0], parts[1]
        if Path(name).name != name or name in (".", ".."):
            raise DataFormatError(f"{where}: {name[:80]!r} must be a file name in {root / 'val' / 'images'}")
        if wnid not in index:
            raise DataFormatError(f"{where}: class {wnid[:80]!r} is not in {root}/train")
        if name in seen:
            raise DataFormatError(f"{where}: {name[:80]!r} is listed twice")
        f = root / "val" / "images" / name
        if not f.is_file():
            raise DataFormatError(f"{where}: {f} does not exist")
        seen.add(name)
        files.append((f, index[wnid]))
    return sorted(files)


def expected_layouts(root: Path) -> str:
    """Human-readable list of the paths each layout needs (for :class:`DataNotFoundError`)."""
    return (f"expected one of: (imagenet) {root}/train/<wnid>/*.JPEG and {root}/val/<wnid>/*.JPEG; "
            f"(tiny) {root}/train/<wnid>/images/*.JPEG, {root}/val/images/*.JPEG and "
            f"{root}/val/val_annotations.txt; (flat) {root}/<wnid>/*.JPEG. Point paths.data_dir (or "
            f"LDD_DATA_DIR) at the directory holding '{root.name}', or set data.root.")


def detect_layout(root: str | Path) -> str:
    """The layout of ``root`` (``imagenet`` | ``tiny`` | ``flat``).

    Raises:
        DataNotFoundError: ``root`` matches no layout (the message names the files expected).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataNotFoundError(f"ImageNet data not found: {root} does not exist; " + expected_layouts(root))
    if (root / "val" / "val_annotations.txt").is_file() and (root / "train").is_dir():
        return "tiny"
    if (root / "train").is_dir() and (root / "val").is_dir():
        return "imagenet"
    if any(_images_in(d) for d in _class_dirs(root)):
        return "flat"
    raise DataNotFoundError(f"no ImageNet layout recognized under {root}; " + expected_layouts(root))


def list_files(root: str | Path, layout: str = "auto",
               split: str = "train") -> tuple[list[str], list[tuple[Path, int]]]:
    """Class names (sorted wnids) and ``(file, label)`` pairs of one split.

    Args:
        root: the data set directory. layout: one of :data:`LAYOUTS`. split: ``train`` | ``val``.

    Raises:
        ValueError: unknown layout/split.
        DataFormatError (a ValueError): val classes the train split lacks, an empty class folder,
            a class folder name that is not UTF-8, a malformed ``val_annotations.txt`` (file and
            line named).
        DataNotFoundError: the split has no images where the layout expects them.
    """
    root = Path(root)
    if layout not in LAYOUTS:
        raise ValueError(f"data.layout must be one of {LAYOUTS}, got {layout!r}")
    if split not in ("train", "val"):
        raise ValueError(f"split must be train|val, got {split!r}")
    if layout == "auto":
        layout = detect_layout(root)
    if layout == "flat":
        dirs = _class_dirs(root)
        classes = [d.name for d in dirs]
        files = [(f, c) for c, d in enumerate(dirs) for f in _class_images(d)]
    elif layout == "imagenet":
        classes = [d.name for d in _class_dirs(root / "train")]
        index = {w: i for i, w in enumerate(classes)}
        files = []
        for d in _class_dirs(root / split):
            if d.name not in index:
                raise DataFormatError(f"{root}/{split}: class {d.name!r} is not in {root}/train")
            files += [(f, index[d.name]) for f in _class_images(d)]
    else:  # tiny
        classes = [d.name for d in _class_dirs(root / "train")]
        index = {w: i for i, w in enumerate(classes)}
        if split == "train":
            files = [(f, c) for c, w in enumerate(classes) for f in _class_images(root / "train" / w / "images")]
        else:
            files = _val_annotations(root, index)
    if not files:
        raise DataNotFoundError(f"no {split} images found under {root} (layout {layout}); " + expected_layouts(root))
    return classes, files


def limit_per_class(files: list[tuple[Path, int]], n: int | None, seed: int = 0) -> list[tuple[Path, int]]:
    """At most ``n`` files per class, chosen by a fixed permutation of ``seed`` (``None`` = all)."""
    if n is None:
        return files
    g = torch.Generator().manual_seed(seed)
    by_class: dict[int, list] = {}
    for f, c in files:
        by_class.setdefault(c, []).append((f, c))
    out = []
    for c in sorted(by_class):
        items = by_class[c]
        out += [items[i] for i in sorted(torch.randperm(len(items), generator=g)[:n].tolist())]
    return out


def memory_estimate(n_train: int, n_val: int, image_size: int, channels: int = 3) -> dict[str, float]:
    """Memory (GiB) that serving ``n_train`` training and ``n_val`` validation images of
    ``channels x image_size x image_size`` in memory takes.

    ``held``: the float32 model-space tensors kept after ``setup()`` (4 bytes per value).
    ``peak``: during ``setup()``: the uint8 decode of both splits (1 byte per value) plus the
    float32 copies :meth:`lightning_dd.data.images.ImageDataModule.setup` makes on the way to model
    space -- pixels in ``[0, 1]`` and the normalized training images (8 bytes per training value),
    and up to three float32 temporaries of the validation images while they are normalized
    (12 bytes per value): ``9 * train + 13 * val`` bytes per value in all.
    """
    values = channels * image_size * image_size
    gib = float(2 ** 30)
    return {"held": 4 * (n_train + n_val) * values / gib, "peak": (9 * n_train + 13 * n_val) * values / gib,
            "train_held": 4 * n_train * values / gib, "val_held": 4 * n_val * values / gib}


def decode_resized(path: str | Path, image_size: int, resize_size: int) -> np.ndarray:
    """One image file -> ``(image_size, image_size, 3)`` uint8 RGB: any mode (L, CMYK, P, RGBA) is
    converted to RGB, the shorter side resized to ``resize_size`` (bilinear, antialiased), then
    center-cropped (torchvision.transforms.v2.functional). Large JPEGs are decoded at a reduced
    scale first (PIL ``draft``) when that still leaves at least ``resize_size`` pixels.

    Raises:
        ImageDecodeError (an OSError): unreadable file (truncated, corrupt, not an image): the
            message names ``path`` and PIL's error.
    """
    from PIL import Image
    from torchvision.transforms.v2 import functional as TF

    try:
        with Image.open(path) as im:
            if im.format == "JPEG":
                im.draft("RGB", (resize_size, resize_size))  # keeps both sides >= the requested size
            im = im.convert("RGB")
    except Exception as e:  # PIL raises OSError (truncated), SyntaxError, ValueError, DecompressionBombError, ...
        raise ImageDecodeError(f"cannot decode image {path}: {type(e).__name__}: {e}") from e
    im = TF.resize(im, resize_size, antialias=True)
    im = TF.center_crop(im, [image_size, image_size])
    return np.asarray(im, dtype=np.uint8)


def decode_files(files: list[tuple[Path, int]], image_size: int, resize_size: int, workers: int = 4
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode ``files`` in a thread pool -> ``(N, 3, S, S)`` uint8 and ``(N,)`` int64 labels.

    Raises:
        ImageDecodeError (an OSError): a file cannot be decoded (:func:`decode_resized`; the
            message names it).
    """
    with ThreadPoolExecutor(max(1, workers)) as pool:  # PIL releases the GIL while decoding
        arrays = list(pool.map(lambda f: decode_resized(f[0], image_size, resize_size), files))
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor([c for _, c in files], dtype=torch.int64)


def train_transforms(image_size: int = 224, scale: tuple[float, float] = (0.08, 1.0)):
    """The standard ImageNet training transform (torchvision.transforms.v2): RandomResizedCrop
    ``image_size`` with ``scale``, horizontal flip, float in [0, 1], ImageNet normalization.
    Input: a PIL image (any mode is converted to RGB first); output ``(3, S, S)`` float32."""
    from torchvision.transforms import v2

    return v2.Compose([v2.Lambda(lambda im: im.convert("RGB")), v2.RandomResizedCrop(image_size, scale=scale,
                                                                                      antialias=True),
                       v2.RandomHorizontalFlip(), v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def val_transforms(image_size: int = 224, resize_size: int = 256):
    """The standard ImageNet evaluation transform: resize the shorter side to ``resize_size``,
    center crop ``image_size``, normalize. PIL image -> ``(3, S, S)`` float32."""
    from torchvision.transforms import v2

    return v2.Compose([v2.Lambda(lambda im: im.convert("RGB")), v2.Resize(resize_size, antialias=True),
                       v2.CenterCrop(image_size), v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class ImageFileDataset(torch.utils.data.Dataset):
    """Streaming ``(image (3, S, S) float32, label int)`` pairs over ``files`` with ``transform``
    (see :func:`train_transforms`, :func:`val_transforms`).

    ``dataset[i]`` raises :class:`ImageDecodeError` (an OSError) naming the file when it cannot be
    decoded (truncated, corrupt).
    """

    def __init__(self, files: list[tuple[Path, int]], transform):
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from PIL import Image

        path, label = self.files[i]
        im = None
        try:
            im = Image.open(path)
            im.load()  # decode here, so a truncated file fails with its name
        except Exception as e:
            if im is not None:
                im.close()
            raise ImageDecodeError(f"cannot decode image {path}: {type(e).__name__}: {e}") from e
        with im:
            return self.transform(im), label


class Views:
    """``n`` independent draws of ``transform`` on one image, stacked: every view its own
    random-resized crop (and flip) of the original image, as FKD's ``RandomResizedCrop_FKD`` in the
    QAT-ViT reference (``train_VVTQ.py``, arXiv 2307.00331). PIL image -> ``(n, 3, S, S)`` float32."""

    def __init__(self, transform, n: int):
        self.transform, self.n = transform, int(n)

    def __call__(self, im):
        return torch.stack([self.transform(im) for _ in range(self.n)])


def image_folder_dataset(root: str | Path, split: str = "train", layout: str = "auto", image_size: int = 224,
                         resize_size: int = 256, per_class: int | None = None, seed: int = 0,
                         views: int | None = None, scale: tuple[float, float] = (0.08, 1.0)) -> ImageFileDataset:
    """A streaming dataset of one split with the standard transforms (train: random-resized crop
    with ``scale`` + flip; val: resize + center crop). ``views`` (train only): each item is
    ``(views, 3, S, S)``, that many independent crops of the original image (:class:`Views`); ``None``:
    one ``(3, S, S)`` crop. Raises as :func:`list_files`."""
    _, files = list_files(root, layout, split)
    files = limit_per_class(files, per_class, seed)
    tf = train_transforms(image_size, tuple(scale)) if split == "train" else val_transforms(image_size, resize_size)
    return ImageFileDataset(files, Views(tf, views) if views and split == "train" else tf)


class ImageNetDataModule(ImageDataModule):
    """ImageNet-1k / Tiny-ImageNet / a flat class-folder sample, in memory at ``image_size`` px.

    Args:
        root: the data set directory (``${paths.data_dir}/imagenet``).
        layout: ``auto`` | ``imagenet`` | ``tiny`` | ``flat`` (see the module doc).
        image_size, resize_size: center crop after resizing the shorter side (224 / 256; Tiny-ImageNet
            64 / 64).
        train_per_class, val_per_class: files decoded per class (``None`` = all), a fixed
            permutation of ``subset_seed``.
        normalize: ``imagenet`` (the standard mean/std) | ``fit`` (fitted on the training images).
        decode_workers: decoding threads. cache_dir: decode cache (``None`` = decode every time).
        max_memory_gib: the most memory (GiB) that serving the selected images may take at its
            peak during :meth:`setup` (:func:`memory_estimate`); ``None`` = no limit.
        name, zca, batch_size, subset_seed: as in :class:`ImageDataModule`.

    Raises (from :meth:`setup`):
        DataNotFoundError: nothing in any layout under ``root`` (names the files expected).
        ValueError: the selected images would need more than ``max_memory_gib`` (raised before
            anything is decoded or read from the cache; names ``data.train_per_class``,
            ``data.val_per_class`` and the estimate).
        DataFormatError: an empty class folder, a folder name that is not UTF-8, a malformed
            ``val_annotations.txt`` (named).
        ImageDecodeError (a DataFormatError and an OSError): an unreadable image (its path is
            named). Nothing is written to ``cache_dir`` unless every image decoded.
    """

    def __init__(self, root: str, name: str = "imagenet", layout: str = "auto", image_size: int = 224,
                 resize_size: int = 256, train_per_class: int | None = None, val_per_class: int | None = None,
                 normalize: str = "imagenet", decode_workers: int = 4, max_memory_gib: float | None = 16.0,
                 **kwargs):
        if layout not in LAYOUTS:
            raise ValueError(f"data.layout must be one of {LAYOUTS}, got {layout!r}")
        if normalize not in ("imagenet", "fit"):
            raise ValueError(f"data.normalize must be imagenet|fit, got {normalize!r}")
        if resize_size < image_size:
            raise ValueError(f"data.resize_size={resize_size} must be >= data.image_size={image_size}")
        super().__init__(name=name, train_per_class=None, **kwargs)  # limits apply before decoding
        self.root, self.layout = Path(root), layout
        self.image_size, self.resize_size = int(image_size), int(resize_size)
        self.max_train_per_class, self.val_per_class = train_per_class, val_per_class
        self.normalize, self.decode_workers = normalize, decode_workers
        self.max_memory_gib = None if max_memory_gib is None else float(max_memory_gib)

    def source(self) -> str:
        return str(self.root.resolve())

    def identity(self) -> dict:
        return {**super().identity(), "layout": self.layout, "image_size": self.image_size,
                "resize_size": self.resize_size, "train_per_class": self.max_train_per_class,
                "val_per_class": self.val_per_class, "normalize": self.normalize}

    def read(self) -> ImageSet:
        classes, train = list_files(self.root, self.layout, "train")
        _, val = list_files(self.root, self.layout, "val")
        train = limit_per_class(train, self.max_train_per_class, self.subset_seed)
        val = limit_per_class(val, self.val_per_class, self.subset_seed)
        self.check_memory(len(train), len(val))
        cache = None
        if self.cache_dir is not None:
            h = hashlib.sha1(f"{self.image_size}|{self.resize_size}\n".encode())
            for split, files in (("train", train), ("val", val)):
                for f, c in files:
                    st = f.stat()
                    h.update(f"{split}|{f.relative_to(self.root)}|{c}|{st.st_size}|{st.st_mtime_ns}\n"
                             .encode("utf-8", "surrogateescape"))
            cache = self.cache_dir / "decoded" / f"{self.name}-{self.root.name}-{h.hexdigest()[:16]}.pt"
            cached = ImageSet.load_cache(cache)  # None: missing, or unusable (reported, deleted)
            if cached is not None and cache_matches(cached, cache, classes, train, val, lambda f: decode_resized(
                    f, self.image_size, self.resize_size)):
                return cached
        xtr, ytr = decode_files(train, self.image_size, self.resize_size, self.decode_workers)
        xte, yte = decode_files(val, self.image_size, self.resize_size, self.decode_workers)
        out = ImageSet(xtr, ytr, xte, yte, classes)
        if cache is not None:
            out.save_cache(cache)
        log.info("%s: decoded %d train / %d val images from %s", self.name, len(ytr), len(yte), self.root)
        return out

    def check_memory(self, n_train: int, n_val: int) -> None:
        """Refuse a selection that would not fit in ``max_memory_gib`` (see :func:`memory_estimate`).

        Raises:
            ValueError: the estimated peak exceeds the limit (the message names the keys to change).
        """
        if self.max_memory_gib is None:
            return
        est = memory_estimate(n_train, n_val, self.image_size)
        if est["peak"] <= self.max_memory_gib:
            return
        raise ValueError(
            f"{self.name}: holding {n_train} training + {n_val} validation images of 3x{self.image_size}x"
            f"{self.image_size} in memory needs ~{est['held']:.1f} GiB as float32 (train {est['train_held']:.1f} GiB, "
            f"val {est['val_held']:.1f} GiB) and ~{est['peak']:.1f} GiB at the peak of setup, over "
            f"data.max_memory_gib={self.max_memory_gib:g}. This in-memory DataModule cannot serve all of "
            f"ImageNet-1k: set data.train_per_class (now {self.max_train_per_class}) and/or data.val_per_class "
            f"(now {self.val_per_class}) to decode fewer images per class, or raise data.max_memory_gib if the "
            f"machine has the memory. Nothing was decoded.")

    def _fit_preprocessing(self, x01: torch.Tensor) -> Preprocessing:
        if self.normalize == "imagenet" and not self.zca:
            return Preprocessing(IMAGENET_MEAN, IMAGENET_STD)
        return super()._fit_preprocessing(x01)

    def streaming_dataset(self, split: str = "train") -> ImageFileDataset:
        """The split as a streaming dataset with the standard transforms (see
        :func:`image_folder_dataset`), honoring the per-class limits."""
        per_class = self.max_train_per_class if split == "train" else self.val_per_class
        return image_folder_dataset(self.root, split, self.layout, self.image_size, self.resize_size, per_class,
                                    self.subset_seed)
