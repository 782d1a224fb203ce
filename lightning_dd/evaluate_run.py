"""Evaluate a saved result on its own (``evaluate.py``): load it, validate it, rebuild the test set,
run the shared evaluator (and baselines), write ``metrics.json``.

Accepted results (``result=PATH``):

* a ``distilled.pt`` (:class:`lightning_dd.results.DistilledSet`), or a run directory holding one;
  its data and net configs are stored inside, so no other argument is needed;
* a coreset given as indices into the DataModule's training set (as configured by ``data=...``,
  including ``data.train_per_class``): a ``.pt`` holding a 1-D integer tensor or ``{"indices": ...}``,
  a ``.npy``, or a ``.txt`` with one index per line; hard labels are the real ones;
* a folder of images in the class-folder layout ``PATH/<class>/*.png`` (class names as in the
  data set), e.g. exported synthetic images; pixels are mapped to model space with the data
  set's preprocessing.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from lightning_dd.nets import COMPILE_MIN_PIXELS, worth_compiling
from lightning_dd.results import DistilledSet

log = logging.getLogger(__name__)


def _read_indices(p: Path) -> torch.Tensor:
    """A coreset index file -> ``(n,)`` int64 training-set indices (``.npy``, ``.txt`` one index per
    line, blank lines and ``#`` comments skipped, or a ``.pt`` tensor / ``{"indices": ...}`` loaded
    with ``weights_only=True``).

    Raises:
        ValueError: naming ``p``: a non-integer (for ``.txt`` with its line number), not a 1-D
            integer array, or duplicate indices (listed; a set with repeats is not the IPC it claims).
    """
    if p.suffix == ".npy":
        try:
            arr = np.load(p, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise ValueError(f"{p}: not a readable .npy array of indices: {e}") from None
        idx = torch.from_numpy(np.ascontiguousarray(arr))
    elif p.suffix == ".txt":
        values = []
        for n, line in enumerate(p.read_text().splitlines(), start=1):
            s = line.split("#", 1)[0].strip()
            if not s:
                continue
            try:
                values.append(int(s))
            except ValueError:
                raise ValueError(f"{p}, line {n}: expected one integer training-set index per line, got "
                                 f"{line.strip()[:80]!r}") from None
        idx = torch.tensor(values, dtype=torch.int64)
    else:
        from lightning_dd.io import safe_load

        d = safe_load(p, "coreset index file")
        idx = d["indices"] if isinstance(d, dict) and "indices" in d else d
    if not isinstance(idx, torch.Tensor) or idx.dim() != 1 or idx.is_floating_point() or idx.dtype == torch.bool:
        raise ValueError(f"{p}: expected a 1-D integer tensor of training-set indices")
    idx = idx.long()
    uniq, counts = torch.unique(idx, return_counts=True)
    if (counts > 1).any():
        dup = uniq[counts > 1]
        shown = ", ".join(f"{int(i)} (x{int(c)})" for i, c in zip(dup[:10], counts[counts > 1][:10]))
        raise ValueError(f"{p}: {len(dup)} indices appear more than once: {shown}{', ...' if len(dup) > 10 else ''}; "
                         f"a coreset lists each training image once")
    return idx


def _is_distilled(p: Path) -> bool:
    """Whether ``p`` is a saved ``DistilledSet`` (a ``.pt`` dict with ``images``); read with
    ``weights_only=True`` and ``mmap`` (no code runs, tensors are not read).

    Raises:
        ValueError: ``p`` is not a readable torch file, or holds objects beyond tensors, numbers,
            strings, lists and dicts (:func:`lightning_dd.io.safe_load`)."""
    if p.suffix != ".pt":
        return False
    from lightning_dd.io import safe_load

    try:
        d = safe_load(p, "result", mmap=True)
    except ValueError:
        d = safe_load(p, "result")  # legacy (non-zipfile) files cannot be mmap-ed; raises naming p
    return isinstance(d, dict) and "images" in d


def load_result(path: str | Path, dm=None, data_needed: list | None = None) -> DistilledSet:
    """Load ``path`` (see the module docstring) as a :class:`DistilledSet`. Coresets and image
    folders need the set-up DataModule ``dm``.

    Raises:
        FileNotFoundError: nothing at ``path``. ValueError: naming the file: malformed (a
            non-integer index with its line, duplicate or out-of-range indices, unknown class
            folder, image size mismatch, objects that ``weights_only=True`` refuses, or the checks
            of :meth:`DistilledSet.validate`: NaN/inf images or labels, an ``lr`` that is not
            ``None`` or finite and > 0). OSError: an undecodable image in a folder (its path named).
    """
    p = Path(path)
    if p.is_dir() and (p / "distilled.pt").is_file():
        p = p / "distilled.pt"
    if not p.exists():
        raise FileNotFoundError(f"result={path}: no such file or directory (expected a distilled.pt, a run "
                                f"directory, an index file or an image folder)")
    if p.is_file() and _is_distilled(p):
        return DistilledSet.load(p)
    if dm is None:
        raise ValueError(f"result={path} is a coreset or an image folder: pass data=<name> to say which data set")
    if p.is_file():
        idx = _read_indices(p)
        n = len(dm.train_labels)
        if len(idx) == 0 or idx.min() < 0 or idx.max() >= n:
            raise ValueError(f"{p}: indices must lie in [0, {n}) (the training set as configured), "
                             f"got [{int(idx.min()) if len(idx) else '-'}, {int(idx.max()) if len(idx) else '-'}]")
        y = dm.train_labels[idx]
        return DistilledSet(dm.train_images[idx].clone(), y.clone(), None, dm.classes, dm.preprocessing.state(),
                            method=f"coreset:{p.name}", ipc=int(torch.bincount(y).max()))
    from lightning_dd.data.readers import _decode_all, _list_split

    classes, files = _list_split(p)
    unknown = sorted(set(classes) - set(dm.classes))
    if not files or unknown:
        raise ValueError(f"{p}: expected <class>/*.png folders named after the data set's classes "
                         f"{dm.classes[:5]}...; unknown: {unknown}" if unknown else f"{p}: no images found")
    x, local = _decode_all(files, workers=4)
    if dm.image_shape[0] == 1:
        x = x.float().mean(1, keepdim=True)
    y = torch.tensor([dm.classes.index(classes[c]) for c in local.tolist()])
    images = dm.preprocessing.forward(x.float() / 255.0)
    return DistilledSet(images, y, None, dm.classes, dm.preprocessing.state(), method=f"folder:{p.name}",
                        ipc=int(torch.bincount(y).max()))


def evaluate_saved(cfg: DictConfig) -> dict:
    """Evaluate ``cfg.result`` (see ``conf/evaluate.yaml``); returns the flat metrics. A process
    group a DDP evaluation opened is destroyed at the end
    (:func:`lightning_dd.core.trainer.release_process_group`).

    Raises:
        FileNotFoundError: missing result. ValueError: malformed result (shape, label count, NaN,
            class count) or a result whose image shape does not match the test set.
    """
    from lightning_dd.core.trainer import release_process_group

    try:
        return _evaluate_saved(cfg)
    finally:
        release_process_group()


def _evaluate_saved(cfg: DictConfig) -> dict:
    from lightning_dd.core.config import instantiate_node, validated
    from lightning_dd.augment.dsa import AugmentSettings
    from lightning_dd.evaluate.images import ImageEvalConfig, ImageEvaluator
    from lightning_dd.evaluate.table import print_table
    from lightning_dd.quiet import quiet_lightning

    quiet_lightning()
    settings = validated(ImageEvalConfig, cfg.eval, "eval")
    augment = validated(AugmentSettings, cfg.augment, "augment")
    make_trainer = instantiate_node(cfg.trainer, "trainer")
    dm = instantiate_node(cfg.data, "data") if cfg.get("data") else None
    if dm is not None:
        dm.setup()
    result = load_result(cfg.result, dm)
    if dm is None:
        if not result.meta.get("data"):
            raise ValueError(f"result={cfg.result} records no data config; pass data=<name> (e.g. data=cifar10)")
        dm = instantiate_node(OmegaConf.create(result.meta["data"]), "data")
        dm.setup()
    if tuple(result.images.shape[1:]) != tuple(dm.image_shape):
        raise ValueError(f"result={cfg.result}: images are {tuple(result.images.shape[1:])}, "
                         f"the test set {tuple(dm.image_shape)}")
    if len(result.classes) != dm.num_classes:
        raise ValueError(f"result={cfg.result}: {len(result.classes)} classes, the test set has {dm.num_classes}")
    net = OmegaConf.to_container(cfg.net, resolve=True)
    if result.meta.get("net") and not cfg.get("use_config_net", False):
        net = dict(result.meta["net"])  # the architecture the set was made with
    if make_trainer.compile and not worth_compiling(tuple(dm.image_shape)):
        log.info("trainer.compile: skipped for %s images (below %d pixels compiling costs more than it saves)",
                 "x".join(map(str, dm.image_shape)), COMPILE_MIN_PIXELS)
        make_trainer.compile = False
    metrics = ImageEvaluator(settings, net, augment.build_dsa(), make_trainer).with_baselines(dm, result)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "net.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(net)))  # the net actually used (compare reads it)
    metrics = {k: float(v) for k, v in metrics.items()}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
    print_table(metrics, title=f"{result.method} (IPC {result.ipc}) from {cfg.result}")
    return metrics
