"""notebooks/inspect_run.ipynb runs top to bottom on a fresh embedded-default run and sweep."""
import subprocess
import sys

import pytest

import nbformat
from nbclient import NotebookClient

from conftest import ROOT
from test_compare_and_sweeps import QUICK, _env


@pytest.mark.slow
def test_inspect_run_notebook_executes(tmp_path, monkeypatch):
    env = _env(tmp_path)
    run, sweep = tmp_path / "run", tmp_path / "sweep"
    for args in ([f"hydra.run.dir={run}"], ["-m", "seed=0,1", f"hydra.sweep.dir={sweep}"]):
        r = subprocess.run([sys.executable, "train.py", *args, *QUICK, "logger.wandb.enabled=false"], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    monkeypatch.setenv("LDD_RUN_DIR", str(run))
    monkeypatch.setenv("LDD_SWEEP_DIR", str(sweep))
    nb = nbformat.read(ROOT / "notebooks" / "inspect_run.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "| run | seed |" in outputs  # the per-run table of the sweep
    assert "eval/ConvNet" in outputs
    assert (sweep / "comparison.png").is_file()
