"""The run walk every method shares: config -> (validated, built from ``_target_``) method, Trainer
factory and DataModule -> ``method.run`` -> result artifact -> ``method.evaluate`` ->
``metrics.json``, logs and a printed table. The runner knows no method by name
(:mod:`lightning_dd.methods.base` is the contract)."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from lightning_dd.augment.dsa import AugmentSettings
from lightning_dd.core.config import ConfigError, LoggerSettings, RunConfig, instantiate_node, validated
from lightning_dd.core.trainer import release_process_group
from lightning_dd.evaluate.table import print_table
from lightning_dd.loggers import build_loggers, finish_wandb, resume_hint
from lightning_dd.methods.base import Method, RunContext
from lightning_dd.quiet import quiet_lightning

log = logging.getLogger(__name__)


def _experiment_name() -> str | None:
    """The ``experiment`` group choice of the running Hydra app, if any."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().runtime.choices.get("experiment")
    except (ImportError, ValueError):
        return None


def _check_net(net: dict, data: dict) -> None:
    """Build the run's net (the resolved ``net`` node) once for a placeholder 3-channel, 10-class
    input of the data's ``image_size`` when the data config names it (ImageNet), else 32x32: a bad
    ``net.*`` value fails here, before any data is read.

    Raises:
        ConfigError: naming the ``net`` node.
    """
    from hydra.errors import InstantiationException

    from lightning_dd.nets import build_net_cfg

    try:
        size = int(data.get("image_size") or 32)
        build_net_cfg(net, 3, 10, (size, size))
    except (ValueError, TypeError, InstantiationException) as e:
        raise ConfigError(f"invalid config:\nnet: {e.__cause__ or e}") from None


def check_config(cfg: DictConfig) -> tuple[RunConfig, Method, RunContext]:
    """Validate and build everything a run needs from ``cfg`` before any data is read: the run's
    own keys (:class:`RunConfig`), the CPU preset of ``scale=cpu``, the method (its typed fields,
    its stages), the ``eval`` node against the method's evaluator schema, the ``augment`` and
    ``logger`` nodes, the net and the Trainer factory, then the method's cross-key checks on the
    resulting typed :class:`RunContext` (``dm`` still ``None``, ``out_dir`` still unset). Returns
    ``(run_cfg, method, ctx)``.

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
    ev = validated(method.eval_schema, cfg.eval, "eval") if method.eval_schema is not None else None
    data = OmegaConf.to_container(cfg.data, resolve=True) if "data" in cfg else {}
    net = OmegaConf.to_container(cfg.net, resolve=True)
    _check_net(net, data)
    make_trainer = instantiate_node(cfg.trainer, "trainer")
    if run_cfg.ckpt_path and not Path(run_cfg.ckpt_path).is_file():
        raise ConfigError(f"ckpt_path: no checkpoint file at {run_cfg.ckpt_path}")
    logger = {k: cfg.logger.get(k) for k in LoggerSettings.model_fields}  # wandb resolves at log time
    ctx = RunContext(dm=None, data=data, net=net, eval=ev, augment=validated(AugmentSettings, cfg.augment, "augment"),
                     logger=validated(LoggerSettings, logger, "logger"), make_trainer=make_trainer, out_dir=Path(),
                     cache_dir=Path(cfg.paths.cache_dir), seed=run_cfg.seed, stage=run_cfg.stage,
                     resume=run_cfg.resume, ckpt_path=run_cfg.ckpt_path)
    method.check(ctx)
    return run_cfg, method, ctx


def run(cfg: DictConfig) -> dict:
    """Run one experiment; returns the flat metrics also written to ``<output_dir>/metrics.json``.
    A process group a DDP run opened is destroyed at the end (:func:`release_process_group`).

    Raises:
        ConfigError: a bad value (before any data is read; see :func:`check_config`).
    """
    try:
        return _run(cfg)
    finally:
        release_process_group()


def _run(cfg: DictConfig) -> dict:
    t_start = time.perf_counter()
    quiet_lightning()
    run_cfg, method, ctx = check_config(cfg)
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(run_cfg.seed, verbose=False)

    t0 = time.perf_counter()
    dm = instantiate_node(cfg.data, "data")
    dm.setup()
    if method.data_protocol is not None and not isinstance(dm, method.data_protocol):
        raise ConfigError(f"data: {type(method).__name__} reads a {method.data_protocol.__name__} DataModule, "
                          f"but data._target_ built a {type(dm).__name__}")
    timings = {"data_s": time.perf_counter() - t0}
    loggers = build_loggers(cfg, out_dir, resume=run_cfg.resume)
    ctx = dataclasses.replace(ctx, dm=dm, out_dir=out_dir, loggers=loggers)

    try:
        out = method.run(ctx)
    except (KeyboardInterrupt, SystemExit) as e:  # Lightning turns Ctrl-C into SystemExit(1)
        if not (isinstance(e, SystemExit) and e.code in (0, None)):
            print(f"\n{resume_hint(out_dir)}", file=sys.stderr, flush=True)
        raise
    timings.update(out.timings)
    metrics = dict(out.metrics)
    # under DDP (trainer.devices > 1) every rank runs the method and its evaluation (collective fits);
    # rank 0 alone writes the run's files and logs
    writer = rank_zero_only.rank == 0
    if writer:
        method.save(ctx, out)  # the family's artifacts and pictures
    if run_cfg.stage == "all":
        t0 = time.perf_counter()
        metrics.update(method.evaluate(ctx, out))
        timings["eval_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start
    metrics.update({f"timings/{k}": v for k, v in timings.items()})
    metrics = {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()}
    if not writer:
        return metrics
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
    for lg in loggers:
        lg.log_metrics({k: v for k, v in metrics.items() if isinstance(v, float) and math.isfinite(v)})
        if hasattr(lg, "experiment") and hasattr(lg.experiment, "summary"):
            lg.experiment.summary.update(metrics)
        lg.finalize("success")
    finish_wandb()
    print_table(metrics, title=f"{method.name} on {ctx.data.get('name')} -> {out_dir}")
    return metrics
