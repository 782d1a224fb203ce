"""Sweeps beyond one process: the joblib launcher (local parallel jobs), the SLURM launcher config
(``conf/hydra/launcher/slurm.yaml``) and the resumable Optuna sweeper (``lightning_dd/sweeps.py``,
``conf/hydra/sweeper/optuna_resumable.yaml``) whose study survives a killed sweep."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from conftest import ROOT

# a train.py job of the default experiment (DATM on digits) cut to a few seconds of work
TINY = ["method.iterations=2", "method.num_experts=1", "method.expert_train_epochs=3",
        "method.current_max_start_epoch=1", "method.max_start_epoch=1", "eval.epochs=5", "eval.num_eval=1",
        "eval.baselines=[]", "logger.wandb.enabled=false", "trainer.enable_progress_bar=false"]
# each job's log line carries its process id: [time][pid][logger][level] - message
LOG_FORMAT = "hydra.job_logging.formatters.simple.format='[%(asctime)s][%(process)d][%(name)s][%(levelname)s] - %(message)s'"


def _env(tmp_path: Path, **extra) -> dict:
    return {**os.environ, "LDD_CACHE_DIR": str(tmp_path / "cache"), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1",
            **extra}


def _app_env(tmp_path: Path, **extra) -> dict:
    """For an app outside the checkout: lightning_dd and hydra_plugins/lightning_dd_sweeps from the
    checkout, installed or not."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return _env(tmp_path, PYTHONPATH=path, **extra)


def _compose(overrides: list[str]):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


# ----------------------------------------------------------------------------------------------------
# joblib: `python train.py -m hydra/launcher=joblib seed=0,1`


def _job_span(job_dir: Path) -> tuple[int, float, float]:
    """(process id, start, end) of a finished job: the pid and time of its first log line, and the time
    ``metrics.json`` was written."""
    first = (job_dir / "train.log").read_text().splitlines()[0]
    m = re.match(r"\[(.+?)\]\[(\d+)\]", first)
    assert m, first
    start = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return int(m.group(2)), start, (job_dir / "metrics.json").stat().st_mtime


def test_joblib_launcher_composes():
    cfg = _compose(["hydra/launcher=joblib", "seed=0"])
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher")
    assert cfg.hydra.launcher.n_jobs == -1  # one job per core (the plugin's default; the backend is loky)


@pytest.mark.slow
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one job per core: needs 2 cores to overlap")
def test_joblib_launcher_runs_two_jobs_in_parallel(tmp_path):
    # each job evaluates for a few seconds after its first log line: longer than the skew between the
    # two workers' start-ups on a loaded 2-core machine, so the spans must overlap if they run in parallel
    r = subprocess.run([sys.executable, "train.py", "-m", "hydra/launcher=joblib", "seed=0,1", *TINY, "eval.epochs=1500",
                        LOG_FORMAT, f"paths.log_dir={tmp_path / 'outputs'}"],
                       cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=-1,backend=loky" in r.stdout + r.stderr
    (sweep,) = (tmp_path / "outputs" / "multirun").iterdir()
    jobs = [sweep / "datm_digits" / str(i) for i in range(2)]
    for j in jobs:
        metrics = json.loads((j / "metrics.json").read_text())
        assert 0 <= metrics["eval/ConvNet/acc_mean"] <= 1
    (pid0, start0, end0), (pid1, start1, end1) = map(_job_span, jobs)
    assert pid0 != pid1 and os.getpid() not in (pid0, pid1)  # two worker processes
    assert start0 < end1 and start1 < end0, (start0, end0, start1, end1)  # running at the same time


# ----------------------------------------------------------------------------------------------------
# SLURM (submitit)


def test_slurm_launcher_config_composes(monkeypatch, tmp_path):
    from hydra.utils import instantiate

    monkeypatch.setenv("SBATCH_PARTITION", "gpu-test")
    monkeypatch.delenv("SBATCH_ACCOUNT", raising=False)
    cfg = _compose(["hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path}", "hydra.launcher.timeout_min=30"])
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.partition, launcher.account, launcher.timeout_min) == ("gpu-test", None, 30)
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.nodes) == (1, 1, 1)
    assert launcher.submitit_folder == f"{tmp_path}/.submitit/%j"
    built = instantiate(launcher)
    assert type(built).__name__ == "SlurmLauncher" and built.params["partition"] == "gpu-test"
    local = _compose(["hydra/launcher=submitit_local"]).hydra.launcher
    assert local._target_.endswith("submitit_launcher.LocalLauncher")


@pytest.mark.slow
def test_submitit_local_launcher_runs_a_job(tmp_path):
    """The submitit path without SLURM (``hydra/launcher=submitit_local``): the job is pickled, run in a
    subprocess by submitit and its result returned to the sweep."""
    sweep = tmp_path / "sweep"
    r = subprocess.run([sys.executable, "train.py", "-m", "hydra/launcher=submitit_local", "seed=0", *TINY,
                        f"hydra.sweep.dir={sweep}"], cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    metrics = json.loads((sweep / "datm_digits" / "0" / "metrics.json").read_text())
    assert 0 <= metrics["eval/ConvNet/acc_mean"] <= 1
    assert list((sweep / ".submitit").glob("*/*_result.pkl"))  # submitit ran it and kept its result


FAKE_SBATCH = """#!/bin/sh
# stands in for SLURM's sbatch: keeps the script and answers as sbatch does
cp "$1" "{record}"
echo "Submitted batch job 4242"
"""
FAKE_SRUN = """#!/bin/sh
# submitit checks that srun exists before it submits; the job itself never runs here
exit 1
"""


def _kill_group(proc: subprocess.Popen) -> str:
    """SIGKILL the process group of ``proc`` (started with ``start_new_session``); its output."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # already gone
        pass
    return proc.communicate()[0]


def test_slurm_launcher_submits_an_array_with_the_configured_resources(tmp_path):
    """The README's SLURM command as written, against a stand-in ``sbatch`` that records the script."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "submitted.sh"
    (bin_dir / "sbatch").write_text(FAKE_SBATCH.format(record=record))
    (bin_dir / "srun").write_text(FAKE_SRUN)
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    sweep = tmp_path / "sweep"
    env = _env(tmp_path, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SBATCH_PARTITION="gpu-test")
    proc = subprocess.Popen([sys.executable, "train.py", "-m", "hydra/launcher=slurm", "seed=0,1", "resume=true",
                             f"hydra.sweep.dir={sweep}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not record.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
    finally:  # it now waits for the (never running) array: stop it
        out = _kill_group(proc)
    assert record.exists(), out[-3000:]
    script = record.read_text()
    for line in ("#SBATCH --array=0-1%2", "#SBATCH --partition=gpu-test", "#SBATCH --gpus-per-node=1",
                 "#SBATCH --time=720", "#SBATCH --cpus-per-task=8", "#SBATCH --mem=64GB", "#SBATCH --nodes=1",
                 "#SBATCH --ntasks-per-node=1", "#SBATCH --job-name=train",
                 f"#SBATCH --output={sweep}/.submitit/%A_%a/%A_%a_0_log.out"):
        assert line in script.splitlines(), (line, script)
    assert re.search(r"^srun .* -m submitit\.core\._submit ", script, re.M), script
    assert len(list((sweep / ".submitit").rglob("*.pkl"))) == 2  # one pickled job per array task


# ----------------------------------------------------------------------------------------------------
# Optuna: a killed sweep resumes with its finished trials kept


APP = '''
import json, math, os, time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="app")
def main(cfg):
    """A fast objective over the searched DATM learning rates: the job records its pid and config."""
    num = HydraConfig.get().job.num
    out = Path(HydraConfig.get().runtime.output_dir)
    (out / "job.json").write_text(json.dumps({"pid": os.getpid(), "resume": cfg.resume,
                                              "lr_img": cfg.method.lr_img, "lr_y": cfg.method.lr_y}))
    if os.environ.get("BLOCK_AT_JOB") == str(num):
        time.sleep(600)  # the sweep is killed here
    return -(math.log10(cfg.method.lr_img) - 2) ** 2 - (cfg.method.lr_y - 2) ** 2 - math.log10(cfg.method.lr_lr) ** 2 / 100


if __name__ == "__main__":
    main()
'''

APP_CONF = '''
# the project's conf/ on the search path: hparams_search=datm_optuna and its sweeper config from there
defaults:
  - _self_
  - hparams_search: null
seed: 0
resume: false
optimized_metric: null
method: {{lr_img: 100.0, lr_y: 2.0, lr_lr: 1.0e-05}}
hydra:
  searchpath: [file://{conf}]
  sweep:
    subdir: ${{hydra:job.num}}
'''


def _app(tmp_path: Path) -> Path:
    app = tmp_path / "app"
    (app / "conf").mkdir(parents=True)
    (app / "app.py").write_text(textwrap.dedent(APP))
    (app / "conf" / "app.yaml").write_text(APP_CONF.format(conf=ROOT / "conf"))
    return app


def _trials(db: Path) -> list[dict]:
    import optuna

    study = optuna.load_study(study_name="datm", storage=f"sqlite:///{db}")
    return [{"number": t.number, "state": t.state.name, "params": t.params, "value": t.value,
             "complete": t.datetime_complete} for t in study.get_trials(deepcopy=False)]


@pytest.mark.slow  # three sweeper starts, each importing optuna (~4 s of CPU)
def test_killed_optuna_sweep_resumes_with_its_finished_trials(tmp_path):
    app, sweep = _app(tmp_path), tmp_path / "sweep"
    db = sweep / "optuna.db"
    cmd = [sys.executable, "app.py", "-m", "hparams_search=datm_optuna", "hydra.sweeper.n_trials=4",
           f"hydra.sweep.dir={sweep}"]
    # 1. the sweep runs trials 0 and 1, and is killed (SIGKILL) while trial 2 runs
    proc = subprocess.Popen(cmd, cwd=app, env=_app_env(tmp_path, BLOCK_AT_JOB="2"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (sweep / "2" / "job.json").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
    finally:
        out = _kill_group(proc)
    assert (sweep / "2" / "job.json").exists(), out[-3000:]
    before = _trials(db)
    assert [t["state"] for t in before] == ["COMPLETE", "COMPLETE", "RUNNING"], before
    killed_pid = json.loads((sweep / "2" / "job.json").read_text())["pid"]

    # 2. the same command again: trial 2 runs again (its parameters, its directory, resume=true), then trial 3
    r = subprocess.run(cmd, cwd=app, env=_app_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    after = _trials(db)
    assert [t["state"] for t in after] == ["COMPLETE"] * 4, after
    assert after[:2] == before[:2]  # kept: same parameters, values and completion times
    assert after[2]["params"] == before[2]["params"]
    rerun = json.loads((sweep / "2" / "job.json").read_text())
    assert rerun["resume"] is True and rerun["pid"] != killed_pid
    assert rerun["lr_img"] == pytest.approx(before[2]["params"]["method.lr_img"])
    assert json.loads((sweep / "3" / "job.json").read_text())["resume"] is False
    assert sorted(p.name for p in sweep.iterdir() if p.name.isdigit()) == ["0", "1", "2", "3"]
    # new trials are not the old ones drawn again (the seeded sampler would repeat them after a restart)
    assert after[3]["params"] not in [t["params"] for t in after[:3]]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == max(t["value"] for t in after)

    # 3. once more: n_trials counts the study's finished trials, so nothing is left to run
    r = subprocess.run(cmd, cwd=app, env=_app_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert _trials(db) == after
    assert "4 of 4 trials finished" in r.stdout + r.stderr


def test_storage_needs_a_study_name_and_sqlalchemy_1(monkeypatch, tmp_path):
    from lightning_dd.sweeps import check_storage  # first: it silences SQLAlchemy 1.4's warning about optuna 2.10

    import sqlalchemy

    check_storage(None, None)  # in memory: nothing to check
    with pytest.raises(ValueError, match="hydra.sweeper.study_name"):
        check_storage(f"sqlite:///{tmp_path}/x.db", None)
    check_storage(f"sqlite:///{tmp_path}/sub/dir/x.db", "s")
    assert (tmp_path / "sub" / "dir").is_dir()  # SQLite does not create the directory itself
    monkeypatch.setattr(sqlalchemy, "__version__", "2.0.30")
    with pytest.raises(RuntimeError, match=r"SQLAlchemy 2\.0\.30.*sqlalchemy>=1\.4,<2"):
        check_storage(f"sqlite:///{tmp_path}/x.db", "s")


def test_search_config_stores_the_study_in_the_sweep_dir(tmp_path):
    from hydra.utils import instantiate

    cfg = _compose(["hparams_search=datm_optuna", f"hydra.sweep.dir={tmp_path}/sweep"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_ == "hydra_plugins.lightning_dd_sweeps.resumable_optuna_sweeper.ResumableOptunaSweeper"
    assert sweeper.storage == f"sqlite:///{tmp_path}/sweep/optuna.db" and sweeper.study_name == "datm"
    built = instantiate(sweeper)
    assert type(built.sweeper).__name__ == "ResumableSweeperImpl" and built.sweeper.n_trials == 8


def test_sweeper_plugin_is_packaged():
    """Hydra finds sweepers only in the ``hydra_plugins`` namespace: the package ships it."""
    import tomllib

    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    assert "hydra_plugins*" in include, include
    assert (ROOT / "hydra_plugins" / "lightning_dd_sweeps" / "resumable_optuna_sweeper.py").is_file()
    assert not (ROOT / "hydra_plugins" / "__init__.py").exists()  # a namespace package, shared with other plugins
