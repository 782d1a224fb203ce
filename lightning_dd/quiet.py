"""Silence Lightning's per-Trainer chatter (device banners, tips, worker hints) for the many short
inner trainings (experts, evaluation runs); warnings that matter stay visible."""
from __future__ import annotations

import logging
import warnings


def quiet_lightning() -> None:
    """Lower Lightning's info loggers to WARNING and filter its known-benign warnings about
    in-memory batch loaders (no workers, ``IterableDataset`` with ``__len__``). Cheap; call it
    before each inner training (test runners reset warning filters between tests)."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda",
                 "lightning.fabric.utilities.rank_zero", "lightning.pytorch.trainer.connectors.signal_connector"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for msg in (r".*does not have many workers.*", r".*IterableDataset.*__len__.*",
                r".*Total length of .* across ranks is zero.*", r".*LeafSpec.*is deprecated.*",
                r".*no pre-optimization state was saved.*", r".*module\(s\) in eval mode at the start of training.*",
                r".*The number of training batches .* is smaller than the logging interval.*"):
        warnings.filterwarnings("ignore", message=msg)
