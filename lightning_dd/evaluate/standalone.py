"""Evaluate a saved result on its own (``evaluate.py``): load, validate, rebuild the test set, run
the shared evaluator (and baselines), write ``metrics.json``."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lightning_dd.results import DistilledSet

log = logging.getLogger(__name__)


def resolve_result_path(path: str | Path) -> Path:
    """``path`` itself, or ``path/distilled.pt`` for a run directory.

    Raises:
        FileNotFoundError: neither exists.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "distilled.pt"
    if not p.is_file():
        raise FileNotFoundError(f"result={path}: no distilled.pt there (give the file or the run directory)")
    return p


def evaluate_saved(cfg: DictConfig) -> dict:
    """Evaluate ``cfg.result`` (see ``conf/evaluate.yaml``); returns the flat metrics.

    Raises:
        FileNotFoundError: missing result. ValueError: malformed result (shape, label count, NaN,
            class count) or a result whose image shape does not match the test set.
    """
    from lightning_dd.quiet import quiet_lightning
    from lightning_dd.runner import build_datamodule, evaluate_with_baselines, print_table

    quiet_lightning()
    path = resolve_result_path(cfg.result)
    result = DistilledSet.load(path)
    data_cfg = cfg.get("data") or result.meta.get("data")
    if not data_cfg:
        raise ValueError(f"{path}: the result records no data config; pass data=<name> (e.g. data=cifar10)")
    dm = build_datamodule(OmegaConf.create(data_cfg) if isinstance(data_cfg, dict) else data_cfg)
    dm.setup()
    if tuple(result.images.shape[1:]) != tuple(dm.image_shape):
        raise ValueError(f"{path}: images are {tuple(result.images.shape[1:])}, the test set {tuple(dm.image_shape)}")
    if len(result.classes) != dm.num_classes:
        raise ValueError(f"{path}: {len(result.classes)} classes, the test set has {dm.num_classes}")
    if result.meta.get("net") and not cfg.get("use_config_net", False):
        cfg.net = OmegaConf.create(result.meta["net"])  # the architecture the set was made with
    metrics = evaluate_with_baselines(cfg, dm, result)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = {k: float(v) for k, v in metrics.items()}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
    print_table(metrics, title=f"{result.method} (IPC {result.ipc}) from {path}")
    return metrics
