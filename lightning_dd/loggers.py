"""The run's loggers (CSV always, W&B when enabled) kept across a resume, and what an interrupted run
prints: where its last checkpoint is and the command that resumes it."""
from __future__ import annotations

import csv
import os
import sys
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf


class ResumableCSVLogger(CSVLogger):
    """Lightning's CSVLogger (``<save_dir>/<name>/metrics.csv``) that, when ``keep_previous``, keeps
    the rows an earlier run in the same directory logged before the step this run starts logging
    at (a resumed run replaces only what it logs again); plain ``CSVLogger`` deletes them."""

    def __init__(self, *args, keep_previous: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        path = Path(self.log_dir) / "metrics.csv"
        self._previous = None
        if keep_previous and path.is_file():
            with open(path, newline="") as fh:
                self._previous = [{k: _number(v) for k, v in row.items() if v not in ("", None)}
                                  for row in csv.DictReader(fh)]

    def log_metrics(self, metrics, step=None) -> None:
        if self._previous is not None:
            first = step if step is not None else 0
            kept = [r for r in self._previous if "step" in r and r["step"] < first]
            self._previous = None
            self.experiment.metrics[:0] = kept  # the writer deleted the file; its next save rewrites these
        super().log_metrics(metrics, step)


def _number(v: str):
    try:
        f = float(v)
    except ValueError:
        return v
    return int(f) if f.is_integer() and "." not in v and "e" not in v.lower() else f


def _wandb_id(out_dir: Path, resume: bool) -> str:
    """The W&B run id of this run directory (``wandb/run_id``): reused by a resumed run, so its
    logs continue the same W&B run; new otherwise."""
    import secrets

    path = out_dir / "wandb" / "run_id"
    if resume and path.is_file():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)  # W&B ids: lower-case letters and digits
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id)
    return run_id


def build_loggers(cfg: DictConfig, out_dir: Path, resume: bool = False) -> list:
    """CSV always; W&B when ``logger.wandb.enabled`` (offline unless ``WANDB_MODE``/``logger.wandb.mode``
    say online). With ``resume``, the CSV log keeps its earlier rows and W&B continues the run
    directory's run (same id)."""
    loggers = [ResumableCSVLogger(save_dir=str(out_dir), name="csv", version="", keep_previous=resume)]
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
                                   config=OmegaConf.to_container(cfg, resolve=True), job_type=cfg.stage,
                                   id=_wandb_id(out_dir, resume), resume="allow"))
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


def finish_wandb() -> None:
    """Close the active W&B run so that the next job of a multirun starts its own."""
    import sys

    if "wandb" in sys.modules and sys.modules["wandb"].run is not None:
        sys.modules["wandb"].finish()


def resume_hint(out_dir: Path) -> str:
    """What an interrupted run prints: its newest checkpoint under ``out_dir`` and the command that
    resumes it (the run's own overrides, its directory, ``resume=true``)."""
    ckpts = sorted(Path(out_dir).rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not ckpts:
        return f"Interrupted before the first checkpoint: nothing to resume in {out_dir}."
    args = []
    try:
        from hydra.core.hydra_config import HydraConfig

        args = [o for o in HydraConfig.get().overrides.task
                if not o.startswith(("hydra.run.dir=", "resume=", "ckpt_path="))]
    except (ImportError, ValueError):
        pass
    cmd = " ".join(["python", Path(sys.argv[0]).name or "train.py", *args, f"hydra.run.dir={out_dir}", "resume=true"])
    return f"Interrupted. Last checkpoint: {ckpts[-1]}\nResume with:\n  {cmd}"
