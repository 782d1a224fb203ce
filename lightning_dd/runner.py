"""The run walk every method shares: config -> DataModule -> method -> result artifact -> student
evaluation (+ baselines) -> ``metrics.json``, logs and a printed table."""
from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from lightning_dd.augment.dsa import DSA
from lightning_dd.evaluate.student import evaluate_set
from lightning_dd.methods import METHODS
from lightning_dd.quiet import quiet_lightning
from lightning_dd.results import DistilledSet
from lightning_dd.viz import PeriodicEvaluation, SyntheticImageLogger, save_grid

log = logging.getLogger(__name__)


def build_loggers(cfg: DictConfig, out_dir: Path) -> list:
    """CSV always; W&B when ``logger.wandb.enabled`` (offline unless ``WANDB_MODE``/``logger.wandb.mode``
    say online)."""
    from lightning.pytorch.loggers import CSVLogger

    loggers = [CSVLogger(save_dir=str(out_dir), name="csv", version="")]
    wb = cfg.logger.wandb
    if wb.enabled:
        from lightning.pytorch.loggers import WandbLogger

        mode = os.environ.get("WANDB_MODE", wb.mode)
        group, name = wb.group, wb.name
        sweep = _sweep_info()
        if sweep is not None:  # one W&B run per job, grouped by sweep
            group = f"{wb.group}-{sweep[0]}" if wb.group else sweep[0]
            name = name or sweep[1]
        os.environ.setdefault("WANDB_SILENT", "true")
        loggers.append(WandbLogger(project=wb.project, entity=wb.entity, group=group, name=name,
                                   save_dir=str(out_dir), offline=mode != "online", tags=list(wb.tags or []),
                                   config=OmegaConf.to_container(cfg, resolve=True), job_type=cfg.stage))
    return loggers


def _sweep_info() -> tuple[str, str] | None:
    """``(sweep id, job name)`` when running inside a Hydra multirun, else ``None``."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except (ImportError, ValueError):
        return None
    if hc.mode != RunMode.MULTIRUN:
        return None
    return Path(hc.sweep.dir).name, hc.job.override_dirname or f"job{hc.job.num}"


def eval_net_cfg(cfg: DictConfig, name: str) -> dict:
    """The net config used to evaluate on architecture ``name``: the run's own ``net`` when it is
    the same architecture, otherwise that architecture's defaults."""
    if name == cfg.net.name:
        return OmegaConf.to_container(cfg.net, resolve=True)
    return {"name": name}


def evaluate_result(cfg: DictConfig, dm, result: DistilledSet, prefix: str, lr: float | None = None,
                    num_eval: int | None = None, teacher: torch.nn.Module | None = None,
                    nets: list[str] | None = None, epochs: int | None = None) -> dict:
    """Evaluate ``result`` on every ``eval.nets`` architecture (or ``nets``) for ``eval.epochs`` (or
    ``epochs``); flat metrics under ``prefix``."""
    ev = cfg.eval
    dsa = DSA(**cfg.augment.dsa) if ev.augment == "dsa" else None
    if lr is None:
        lr = result.lr if (result.lr is not None and ev.use_learned_lr) else ev.lr
    metrics = {}
    for name in nets or ev.nets:
        r = evaluate_set(result.images, result.labels, dm.test_images, dm.test_labels, dm.num_classes,
                         eval_net_cfg(cfg, name), lr=lr, epochs=epochs or ev.epochs, batch_size=ev.batch_size,
                         num_eval=num_eval or ev.num_eval, seed=ev.seed, dsa=dsa, momentum=ev.momentum,
                         weight_decay=ev.weight_decay, accelerator=cfg.trainer.accelerator,
                         compile=bool(cfg.trainer.compile), augment=ev.augment, label_mode=ev.label_mode,
                         soft_loss_kind=ev.soft_loss, temperature=ev.temperature, teacher=teacher,
                         precision=str(ev.get("precision", "32-true")))
        metrics.update(r.metrics(prefix))
        log.info("%s/%s: %.2f ± %.2f %% over %d runs (%.0fs)", prefix, name, 100 * r.mean, 100 * r.std,
                 len(r.accs), r.seconds)
    return metrics


def _quick_eval(cfg: DictConfig, dm, images, labels, lr) -> float:
    """One-seed evaluation of a set during distillation on the run's own net, ``logger.eval_epochs``
    epochs (the same evaluator settings as the final evaluation otherwise)."""
    current = DistilledSet(images, labels, lr, dm.classes, {}, method="current")
    m = evaluate_result(cfg, dm, current, "periodic", num_eval=1, nets=[cfg.net.name], epochs=cfg.logger.eval_epochs)
    return m[f"periodic/{cfg.net.name}/acc_mean"]  # evaluate_result has logged it


def evaluate_with_baselines(cfg: DictConfig, dm, result: DistilledSet, init: DistilledSet | None = None,
                            teacher_ckpt: str | None = None) -> dict:
    """``eval/...`` for ``result``, then each of ``eval.baselines`` through the same evaluator:
    ``init`` (the method's initialization), ``random`` (a random real subset of the same IPC,
    hard labels, ``eval.lr``). Adds ``eval/<net>/improvement_over_random`` (accuracy points as a
    fraction, DD-Ranking's IOR idea) when both are there, and ``eval/<net>/gap_to_full`` when
    ``eval.full_data_acc`` (the architecture's full-data accuracy) is given. The KD teacher is
    ``eval.teacher_ckpt``, else ``teacher_ckpt`` (the one a method trained, e.g. SRe2L's)."""
    teacher_ckpt = cfg.eval.get("teacher_ckpt") or teacher_ckpt
    teacher = load_teacher(teacher_ckpt, dm) if teacher_ckpt else None
    metrics = evaluate_result(cfg, dm, result, "eval", teacher=teacher)
    for b in cfg.eval.baselines:
        if b == "init" and init is not None:
            metrics.update(evaluate_result(cfg, dm, init, "baseline/init", teacher=teacher))
        elif b == "random":
            x, y = dm.random_subset(result.ipc, int(cfg.eval.seed))
            rnd = DistilledSet(x, y, None, dm.classes, dm.preprocessing.state(), "random", result.ipc)
            metrics.update(evaluate_result(cfg, dm, rnd, "baseline/random", lr=cfg.eval.lr, teacher=teacher))
        elif b != "init":
            raise ValueError(f"eval.baselines: unknown baseline {b!r} (known: init, random)")
    full = cfg.eval.get("full_data_acc") or {}
    for name in cfg.eval.nets:
        acc = metrics[f"eval/{name}/acc_mean"]
        if f"baseline/random/{name}/acc_mean" in metrics:
            metrics[f"eval/{name}/improvement_over_random"] = acc - metrics[f"baseline/random/{name}/acc_mean"]
        if name in full:
            metrics[f"eval/{name}/gap_to_full"] = float(full[name]) - acc
    return metrics


def load_teacher(path: str, dm) -> torch.nn.Module:
    """A teacher saved as ``{"net_cfg": {"name": ..., ...}, "state_dict": ...}`` (``torch.save``).

    Raises:
        FileNotFoundError: no file. ValueError: not a teacher checkpoint, or one that does not
        fit ``dm`` (:func:`lightning_dd.nets.load_net_file`).
    """
    from lightning_dd.nets import load_net_file

    return load_net_file(path, dm.image_shape[0], dm.num_classes, dm.image_shape[1:],
                         "teacher checkpoint (eval.teacher_ckpt)")[0]


def build_datamodule(data_cfg: DictConfig) -> L.LightningDataModule:
    """The DataModule named by ``data._target_`` (a dotted class path), built with the group's other
    keys (``name`` included).

    Raises:
        ValueError: ``_target_`` missing or not a LightningDataModule class.
    """
    from hydra.utils import get_class

    kwargs = OmegaConf.to_container(data_cfg, resolve=True)
    target = kwargs.pop("_target_", None)
    cls = get_class(target) if target else None
    if cls is None or not (isinstance(cls, type) and issubclass(cls, L.LightningDataModule)):
        raise ValueError(f"data._target_ must name a LightningDataModule class, got {target!r}")
    return cls(**kwargs)


def run(cfg: DictConfig) -> dict:
    """Run one experiment; returns the flat metrics also written to ``<output_dir>/metrics.json``."""
    t_start = time.perf_counter()
    quiet_lightning()
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(int(cfg.seed), verbose=False)
    if cfg.method.family not in METHODS:
        raise ValueError(f"method.family {cfg.method.family!r} unknown; known: {sorted(METHODS)}")

    t0 = time.perf_counter()
    dm = build_datamodule(cfg.data)
    dm.setup()
    timings = {"data_s": time.perf_counter() - t0}
    loggers = build_loggers(cfg, out_dir)
    callbacks = [SyntheticImageLogger(dm.preprocessing, out_dir / "images", cfg.logger.image_every,
                                      nrow=int(cfg.method.get("ipc", 10)))]
    if cfg.logger.get("eval_every"):
        callbacks.append(PeriodicEvaluation(lambda x, y, lr: _quick_eval(cfg, dm, x, y, lr), cfg.logger.eval_every))

    out = METHODS[cfg.method.family](cfg, dm, out_dir, loggers, callbacks)
    timings.update(out.get("timings", {}))
    metrics = dict(out.get("metrics", {}))
    result: DistilledSet | None = out.get("result")
    if result is not None:
        result.meta["data"] = OmegaConf.to_container(cfg.data, resolve=True)  # evaluate.py rebuilds the test set
        result.meta["net"] = OmegaConf.to_container(cfg.net, resolve=True)  # ... and evaluates on the same net
        result.save(out_dir / "distilled.pt")
        save_grid(result.images, dm.preprocessing, out_dir / "distilled.png", nrow=max(1, result.ipc))
        if cfg.stage == "all":
            t0 = time.perf_counter()
            metrics.update(evaluate_with_baselines(cfg, dm, result, out.get("init"), out.get("teacher_ckpt")))
            timings["eval_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start
    metrics.update({f"timings/{k}": v for k, v in timings.items()})
    metrics = {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()}
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
    for lg in loggers:
        lg.log_metrics({k: v for k, v in metrics.items() if isinstance(v, float) and math.isfinite(v)})
        if hasattr(lg, "experiment") and hasattr(lg.experiment, "summary"):
            lg.experiment.summary.update(metrics)
        lg.finalize("success")
    finish_wandb()
    print_table(metrics, title=f"{cfg.method.name} on {cfg.data.name} -> {out_dir}")
    return metrics


def finish_wandb() -> None:
    """Close the active W&B run so that the next job of a multirun starts its own."""
    import sys

    if "wandb" in sys.modules and sys.modules["wandb"].run is not None:
        sys.modules["wandb"].finish()


def print_table(metrics: dict, title: str = "") -> None:
    """Print the accuracy rows (eval and baselines) and the timings of a metrics dict."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for col in ("set", "net", "accuracy (%)", "runs"):
        t.add_column(col)
    for k in sorted(metrics):
        if k.endswith("/acc_mean"):
            base, net = k[: -len("/acc_mean")].rsplit("/", 1)
            std = metrics.get(f"{base}/{net}/acc_std", float("nan"))
            n = metrics.get(f"{base}/{net}/n_runs", 0)
            t.add_row(base, net, f"{100 * metrics[k]:.2f} ± {100 * std:.2f}", str(int(n)))
    Console().print(t)
    tim = ", ".join(f"{k.split('/', 1)[1]}={v:.0f}s" for k, v in sorted(metrics.items()) if k.startswith("timings/"))
    Console().print(f"timings: {tim}")
