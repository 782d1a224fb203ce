"""Hydra plugin entry of the resumable Optuna sweeper (``conf/hydra/sweeper/optuna_resumable.yaml``).

Hydra instantiates sweepers only from the ``hydra_plugins`` namespace package, and imports every
module in it at start-up; this one therefore stays light (no optuna import) and the implementation
lives in :mod:`lightning_dd.sweeps`.
"""
from __future__ import annotations

from typing import Any

from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper


class ResumableOptunaSweeper(OptunaSweeper):
    """Hydra's Optuna sweeper (hydra-optuna-sweeper 1.2; same config fields) that resumes a killed
    sweep from its persistent ``storage``: ``n_trials`` counts the study's finished trials, the
    interrupted trial runs again with ``resume=true``, job numbers continue after the existing
    trials (:mod:`lightning_dd.sweeps`).

    Raises (at ``sweep``):
        ValueError, RuntimeError: a storage without a study name, or one this optuna cannot use
            (:func:`lightning_dd.sweeps.check_storage`), before any trial runs.
    """

    def __init__(self, **kwargs: Any) -> None:
        from lightning_dd.sweeps import ResumableSweeperImpl

        self.sweeper = ResumableSweeperImpl(**kwargs)
