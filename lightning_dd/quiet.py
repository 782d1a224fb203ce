"""Silence Lightning's per-Trainer chatter (device banners, tips, worker hints) for the many short
inner trainings (experts, evaluation runs), and torch's "No CUDA runtime is found" notice when
``torch.compile`` runs on a CPU-only machine; warnings that matter stay visible."""
from __future__ import annotations

import logging
import warnings


def _drop_no_cuda_runtime(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("No CUDA runtime is found")


def quiet_lightning() -> None:
    """Lower Lightning's info loggers to WARNING and filter its known-benign warnings about
    in-memory batch loaders (no workers, ``IterableDataset`` with ``__len__``). Cheap; call it
    before each inner training (test runners reset warning filters between tests)."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda",
                 "lightning.fabric.utilities.rank_zero", "lightning.pytorch.trainer.connectors.signal_connector"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # torch.compile imports torch.utils.cpp_extension, which warns "No CUDA runtime is found, using
    # CUDA_HOME=..." on a CPU-only machine that has a CUDA toolkit directory: harmless, no CUDA is used.
    cpp_ext = logging.getLogger("torch.utils.cpp_extension")
    if _drop_no_cuda_runtime not in cpp_ext.filters:
        cpp_ext.addFilter(_drop_no_cuda_runtime)
    for msg in (r".*does not have many workers.*", r".*IterableDataset.*__len__.*",
                r".*Total length of .* across ranks is zero.*", r".*LeafSpec.*is deprecated.*",
                r".*no pre-optimization state was saved.*", r".*module\(s\) in eval mode at the start of training.*",
                r".*The number of training batches .* is smaller than the logging interval.*"):
        warnings.filterwarnings("ignore", message=msg)
