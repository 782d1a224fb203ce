"""Selection baselines: a random real subset of IPC images per class with hard labels."""
from __future__ import annotations

from lightning_dd.results import DistilledSet


def run_random_selection(cfg, dm, out_dir, loggers, callbacks) -> dict:
    """``method.ipc`` random real training images per class (seed ``seed``), hard labels, the
    evaluator's default lr."""
    x, y = dm.random_subset(int(cfg.method.ipc), int(cfg.seed))
    res = DistilledSet(x, y, None, dm.classes, dm.preprocessing.state(), method="random", ipc=int(cfg.method.ipc))
    return {"result": res, "timings": {}, "metrics": {}}
