"""Resumable Optuna sweeps: Hydra's Optuna sweeper with a persistent study that a killed sweep continues.

``hydra-optuna-sweeper`` 1.2 (``hydra_plugins.hydra_optuna_sweeper``, optuna 2.10) already opens its
study with ``optuna.create_study(study_name=..., storage=..., load_if_exists=True)``, so a storage
keeps the finished trials. Restarted as it is, though, it

* runs ``n_trials`` *new* trials on every start (its loop counts from ``n_trials`` down), so a
  restart after two of eight trials would run eight more;
* numbers its jobs from 0 again, so the new trials write into the job directories
  (``<sweep dir>/<experiment>/<job number>``) of the first ones;
* leaves the trial that was running when the sweep was killed in state ``RUNNING`` for ever;
* restarts a seeded sampler's random stream, so the first new trials repeat the parameters of
  the first old ones.

:class:`ResumableSweeperImpl` (the sweeper of ``conf/hydra/sweeper/optuna_resumable.yaml``, through
the Hydra plugin ``hydra_plugins/lightning_dd_sweeps``) fixes these and changes nothing else: ``n_trials`` counts all finished (complete or pruned) trials of the study;
a trial left ``RUNNING`` by the killed sweep is run again with its own parameters, in its own job
directory, with ``resume=true`` added (so a run that checkpoints continues where it stopped; see
the README's "Resume"), and its value is told to the study; new trials are numbered after the
existing ones, job number = trial number; the sampler is reseeded once on a restart
(``sampler.reseed_rng()``, so the trials after a restart are not reproducible from the seed).
One sweeper at a time per storage: a ``RUNNING`` trial found at start is taken to be the killed
sweep's.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence

# optuna 2.10's SQL models use SQLAlchemy 1.4 APIs that 2.0 removed (hence the pin); 1.4 would warn
# about them on every sweep
os.environ.setdefault("SQLALCHEMY_SILENCE_UBER_WARNING", "1")

import optuna  # noqa: E402
from hydra.core.utils import JobReturn  # noqa: E402
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl, create_params_from_overrides  # noqa: E402
from optuna.trial import FrozenTrial, TrialState  # noqa: E402

log = logging.getLogger(__name__)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
RESUME_OVERRIDE = ("resume", "true")  # conf/train.yaml's key: continue from the job's last checkpoint


def check_storage(storage: object, study_name: str | None) -> None:
    """Check a persistent Optuna storage before any trial runs and create the directory of an
    SQLite file (``sqlite:///<path>``; SQLite does not create it).

    Raises:
        ValueError: ``study_name`` is missing (a restart finds its trials by the name; optuna
            would make up a new one each time).
        RuntimeError: an SQL storage with SQLAlchemy 2 under optuna < 3: optuna 2.10 stamps its
            schema version on a connection that SQLAlchemy 2 never commits, and the first
            ``create_study`` fails with a bare ``AssertionError``.
    """
    if storage is None:
        return
    if not study_name:
        raise ValueError(f"hydra.sweeper.study_name: a persistent storage ({storage}) needs a study name; "
                         "a restarted sweep finds its trials by it")
    if not isinstance(storage, str) or storage.startswith("redis"):
        return
    import sqlalchemy
    from sqlalchemy.engine import make_url

    if int(sqlalchemy.__version__.split(".")[0]) >= 2 and int(optuna.__version__.split(".")[0]) < 3:
        raise RuntimeError(f"hydra.sweeper.storage={storage}: optuna {optuna.__version__}'s SQL storage does not "
                           f"work with SQLAlchemy {sqlalchemy.__version__}; install SQLAlchemy 1.4 "
                           "(pip install 'sqlalchemy>=1.4,<2', as pyproject.toml pins it)")
    url = make_url(storage)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        from pathlib import Path

        Path(url.database).parent.mkdir(parents=True, exist_ok=True)


def _consecutive(trials: Sequence[FrozenTrial]) -> list[list[FrozenTrial]]:
    """Split trials sorted by number into runs of consecutive numbers (one launch each: a launcher
    numbers the jobs of one launch consecutively from its first index)."""
    groups: list[list[FrozenTrial]] = []
    for t in sorted(trials, key=lambda t: t.number):
        if groups and groups[-1][-1].number + 1 == t.number:
            groups[-1].append(t)
        else:
            groups.append([t])
    return groups


class ResumableSweeperImpl(OptunaSweeperImpl):
    """The plugin's implementation (``OptunaSweeperImpl``, same constructor arguments) with the
    restart behaviour described in the module docstring; used by the Hydra plugin class
    ``hydra_plugins.lightning_dd_sweeps.resumable_optuna_sweeper.ResumableOptunaSweeper`` (Hydra
    instantiates sweepers only from the ``hydra_plugins`` namespace).

    Raises (at ``sweep``):
        ValueError, RuntimeError: a storage without a study name, or one this optuna cannot use
            (:func:`check_storage`), before any trial runs.
    """

    def sweep(self, arguments: list[str]) -> None:
        if self.storage is None:  # nothing persists: the plugin's behaviour
            return super().sweep(arguments)
        check_storage(self.storage, self.study_name)
        study = optuna.create_study(study_name=self.study_name, storage=self.storage,
                                    directions=self._get_directions(), load_if_exists=True)
        self._rerun_interrupted(study, arguments)
        trials = study.get_trials(deepcopy=False)
        finished = sum(t.state in FINISHED for t in trials)
        total = self.n_trials
        if trials:
            log.info(f"Resuming study {self.study_name!r} in {self.storage}: {finished} of {total} trials finished, "
                     f"{len(trials) - finished} failed; running {max(0, total - finished)} more")
            if hasattr(self.sampler, "reseed_rng"):  # not a GridSampler partial: see the module docstring
                self.sampler.reseed_rng()
        self.job_idx = len(trials)  # job number = trial number
        self.n_trials = max(0, total - finished)
        try:
            super().sweep(arguments)
        finally:
            self.n_trials = total

    def _rerun_interrupted(self, study: optuna.Study, arguments: list[str]) -> None:
        """Run the trials the killed sweep left ``RUNNING`` again (their parameters, their job numbers,
        ``resume=true``) and tell the study their values.

        Raises:
            Exception: a job's own error, after its trial is marked ``FAIL`` (as the plugin does).
        """
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if not running:
            return
        self._process_searchspace_config()
        _, fixed = create_params_from_overrides([*self._parse_sweeper_params_config(), *arguments])
        for group in _consecutive(running):
            log.info(f"Re-running interrupted trial(s) {[t.number for t in group]} with resume=true")
            overrides = [tuple(f"{k}={v}" for k, v in {**t.params, **fixed, RESUME_OVERRIDE[0]: RESUME_OVERRIDE[1]}.items())
                         for t in group]
            returns = self.launcher.launch(overrides, initial_job_idx=group[0].number)
            for t, ret in zip(group, returns):
                self._tell(study, t.number, ret)

    def _tell(self, study: optuna.Study, number: int, ret: JobReturn) -> None:
        """Tell trial ``number`` the job's return value (one float per direction).

        Raises:
            Exception: the job's own error (re-raised by ``ret.return_value``) or a return value
                that is not one float per direction, after the trial is marked ``FAIL``.
        """
        try:
            value = ret.return_value
            values = [float(v) for v in (value if len(self._get_directions()) > 1 else [value])]
            study.tell(number, values=values)
        except Exception:
            study.tell(number, state=TrialState.FAIL)
            raise
