"""The run's loggers (CSV always, W&B when enabled) kept across a resume, and what an interrupted run
prints: where its last checkpoint is and the command that resumes it."""
from __future__ import annotations

import csv
import io
import os
import sys
from pathlib import Path

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from lightning_dd.io import atomic_write_text


class _KeepingWriter(ExperimentWriter):
    """Lightning's CSV writer that, with ``keep``, neither warns about nor deletes an existing
    ``metrics.csv``: the first :meth:`log_metrics` rewrites it (atomically) with the rows an earlier
    run logged at steps before that call's step, and later rows are appended. Header rewrites (new
    metric keys) are atomic too, so a kill never leaves half a file."""

    def __init__(self, log_dir: str, keep: bool = False):
        self._keep, self._previous, self._max_step = keep, None, -1
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        if not self._keep:
            return super()._check_log_dir_exists()
        path = Path(self.metrics_file_path)
        if path.is_file():
            with open(path, newline="") as fh:
                reader = csv.DictReader(fh)
                self._previous = (list(reader.fieldnames or []), list(reader))

    def next_step(self) -> int:
        """One after the largest step logged so far (by this run, or kept from the earlier one)."""
        pending = self._previous[1] if self._previous is not None else []
        return max([self._max_step, *(s for r in pending if (s := _step_of(r)) is not None)]) + 1

    def log_metrics(self, metrics_dict: dict, step: int | None = None) -> None:
        if step is None:
            step = self.next_step()
        if self._previous is not None:  # the resumed run's first row: keep what came before it
            header, rows = self._previous
            self._previous = None
            kept = [r for r in rows if (s := _step_of(r)) is None or s < step]
            self._max_step = max([-1, *(s for r in kept if (s := _step_of(r)) is not None)])
            self.metrics_keys = [k for k in header if k]
            self._write_all(self.metrics_keys, kept)
        self._max_step = max(self._max_step, int(step))
        super().log_metrics(metrics_dict, step)

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        with open(self.metrics_file_path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        self._write_all(fieldnames, rows)

    def _write_all(self, fieldnames: list[str], rows: list[dict]) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=fieldnames, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(buf.getvalue(), self.metrics_file_path)


def _step_of(row: dict) -> int | None:
    try:
        return int(float(row.get("step") or ""))
    except ValueError:
        return None


class ResumableCSVLogger(CSVLogger):
    """Lightning's CSVLogger (``<save_dir>/<name>/metrics.csv``) that writes every row as it is
    logged (``flush_logs_every_n_steps=1``: a SIGKILL loses no logged row; Lightning's default
    buffers 100) and, with ``keep_previous`` (a resumed run), keeps the rows the earlier run in the
    same directory logged before the step this run starts logging at: the resumed run replaces only
    what it logs again. Plain ``CSVLogger`` warns "Previous log files in this directory will be
    deleted" and deletes them."""

    def __init__(self, *args, keep_previous: bool = False, **kwargs):
        kwargs.setdefault("flush_logs_every_n_steps", 1)
        super().__init__(*args, **kwargs)
        self._keep_previous = keep_previous

    @property
    @rank_zero_experiment
    def experiment(self) -> _KeepingWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingWriter(self.log_dir, keep=self._keep_previous)
        return self._experiment

    @rank_zero_only
    def log_metrics(self, metrics, step=None) -> None:
        """Lightning's, but a row without a step (the runner's final metrics) comes after every
        step logged so far (Lightning numbers it by the rows not yet flushed)."""
        super().log_metrics(metrics, self.experiment.next_step() if step is None else step)


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
        return (f"Interrupted before the first checkpoint of {out_dir}. Expert and teacher training continue from "
                f"their own checkpoints in the cache when the same command runs again.")
    args = []
    try:
        from hydra.core.hydra_config import HydraConfig

        args = [o for o in HydraConfig.get().overrides.task
                if not o.startswith(("hydra.run.dir=", "resume=", "ckpt_path="))]
    except (ImportError, ValueError):
        pass
    cmd = " ".join(["python", Path(sys.argv[0]).name or "train.py", *args, f"hydra.run.dir={out_dir}", "resume=true"])
    return f"Interrupted. Last checkpoint: {ckpts[-1]}\nResume with:\n  {cmd}"
