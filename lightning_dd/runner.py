"""The run walk every method shares: config -> (validated, built from ``_target_``) method, Trainer
factory and DataModule -> ``method.run`` -> result artifact -> ``method.evaluate`` ->
``metrics.json``, logs and a printed table. The runner knows no method by name
(:mod:`lightning_dd.methods.base` is the contract)."""
from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import lightning as L
from omegaconf import DictConfig, OmegaConf

from lightning_dd.core.config import ConfigError, RunConfig, instantiate_node, validated
from lightning_dd.evaluate.images import quick_eval
from lightning_dd.evaluate.table import print_table
from lightning_dd.methods.base import RunContext
from lightning_dd.quiet import quiet_lightning
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


def _experiment_name() -> str | None:
    """The ``experiment`` group choice of the running Hydra app, if any."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().runtime.choices.get("experiment")
    except (ImportError, ValueError):
        return None


def check_config(cfg: DictConfig):
    """Validate and build everything a run needs from ``cfg`` before any data is read: the run's
    own keys (:class:`RunConfig`), the CPU preset of ``scale=cpu``, the method (its typed fields,
    its stages, its cross-key checks), the ``eval`` node against the method's evaluator schema and
    the Trainer factory. Returns ``(run_cfg, method, trainer_factory)``.

    Raises:
        ConfigError: naming the offending key and what was expected.
    """
    run_cfg = validated(RunConfig, {k: cfg.get(k) for k in RunConfig.model_fields if k in cfg}, "")
    if run_cfg.scale_name == "cpu" and run_cfg.scale_preset is None:
        exp = _experiment_name() or "this experiment"
        raise ConfigError(f"scale=cpu: {exp} has no CPU preset (conf/scale_preset/{exp}/cpu.yaml, which sets "
                          f"scale_preset: {exp}); without one the run would silently be paper-sized")
    method = instantiate_node(cfg.method, "method")
    if run_cfg.stage not in method.stages:
        raise ConfigError(f"stage: {run_cfg.stage!r} is not a stage of {type(method).__name__}; "
                          f"allowed: {', '.join(method.stages)}")
    if method.eval_schema is not None:
        validated(method.eval_schema, cfg.eval, "eval")
    method.check(cfg)
    make_trainer = instantiate_node(cfg.trainer, "trainer")
    if run_cfg.ckpt_path and not Path(run_cfg.ckpt_path).is_file():
        raise ConfigError(f"ckpt_path: no checkpoint file at {run_cfg.ckpt_path}")
    return run_cfg, method, make_trainer


def run(cfg: DictConfig) -> dict:
    """Run one experiment; returns the flat metrics also written to ``<output_dir>/metrics.json``.

    Raises:
        ConfigError: a bad value (before any data is read; see :func:`check_config`).
    """
    t_start = time.perf_counter()
    quiet_lightning()
    run_cfg, method, make_trainer = check_config(cfg)
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(run_cfg.seed, verbose=False)

    t0 = time.perf_counter()
    dm = instantiate_node(cfg.data, "data")
    dm.setup()
    timings = {"data_s": time.perf_counter() - t0}
    loggers = build_loggers(cfg, out_dir)
    callbacks = []
    if getattr(dm, "preprocessing", None) is not None:
        callbacks.append(SyntheticImageLogger(dm.preprocessing, out_dir / "images", cfg.logger.image_every,
                                              nrow=int(getattr(method, "ipc", 10))))
        if cfg.logger.get("eval_every"):
            callbacks.append(PeriodicEvaluation(lambda x, y, lr: quick_eval(cfg, dm, make_trainer, x, y, lr),
                                                cfg.logger.eval_every))
    ctx = RunContext(cfg=cfg, dm=dm, out_dir=out_dir, loggers=loggers, callbacks=callbacks, trainer=make_trainer,
                     seed=run_cfg.seed, stage=run_cfg.stage, resume=run_cfg.resume, ckpt_path=run_cfg.ckpt_path)

    out = method.run(ctx)
    timings.update(out.timings)
    metrics = dict(out.metrics)
    result = out.result
    if result is not None:
        result.meta["data"] = OmegaConf.to_container(cfg.data, resolve=True)  # evaluate.py rebuilds the test set
        result.meta["net"] = OmegaConf.to_container(cfg.net, resolve=True)  # ... and evaluates on the same net
        result.save(out_dir / "distilled.pt")
        save_grid(result.images, dm.preprocessing, out_dir / "distilled.png", nrow=max(1, result.ipc))
    if run_cfg.stage == "all":
        t0 = time.perf_counter()
        metrics.update(method.evaluate(ctx, out))
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
    print_table(metrics, title=f"{method.name} on {cfg.data.name} -> {out_dir}")
    return metrics


def finish_wandb() -> None:
    """Close the active W&B run so that the next job of a multirun starts its own."""
    import sys

    if "wandb" in sys.modules and sys.modules["wandb"].run is not None:
        sys.modules["wandb"].finish()
