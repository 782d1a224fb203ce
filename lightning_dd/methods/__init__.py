"""Methods, one module per paper, grouped by family. ``METHODS`` maps ``method.family`` to the
function that runs it: ``fn(cfg, datamodule, out_dir, loggers, callbacks) -> dict`` with keys
``result`` (a :class:`lightning_dd.results.DistilledSet`), optionally ``init`` (the set before
optimization, evaluated as ``baseline/init``), ``teacher_ckpt`` (a teacher checkpoint the
evaluator uses for KD when ``eval.teacher_ckpt`` is unset), ``timings`` and ``metrics``."""
from lightning_dd.methods.selection import run_selection
from lightning_dd.methods.statistics_matching import run_statistics_matching
from lightning_dd.methods.trajectory_matching import run_trajectory_matching

METHODS = {"trajectory_matching": run_trajectory_matching, "selection": run_selection,
           "statistics_matching": run_statistics_matching}

from lightning_dd.methods.graph_run import run_graph  # noqa: E402  (GCond / SGDD / node coresets)

METHODS["graph"] = run_graph
