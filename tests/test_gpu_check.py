"""``benchmarks/gpu_check.py --dry-run``: every section of the GPU check runs at toy size on the CPU
(real CIFAR-10 images and Cora from the shared data, DDP as 2 gloo processes) and reports finite
figures in its JSON."""
import json
import math
import os
import subprocess
import sys

import pytest

from conftest import ROOT, load_script


def _numbers(x):
    if isinstance(x, bool):
        return
    if isinstance(x, (int, float)):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _numbers(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _numbers(v)


@pytest.mark.slow  # ~70 s on 2 idle cores (5 section processes, CIFAR-10 decoded once), ~140 s under load
def test_dry_run_reports_every_section_with_finite_figures(tmp_path, shared_data, cache_dir):
    sections = load_script("benchmarks/gpu_check.py").SECTIONS
    out = tmp_path / "check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LDD_DATA_DIR": str(shared_data), "WANDB_MODE": "offline"}
    p = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--out", str(out),
                        "--cache-dir", str(cache_dir)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["dry_run"] is True and report["failed"] == []
    assert set(report["sections"]) == set(sections)
    for name, r in report["sections"].items():
        assert r["ok"], (name, r.get("error"), r.get("log_tail"))
        assert math.isfinite(r["sec_per_step"]) and r["sec_per_step"] > 0, name
        assert math.isfinite(r["peak_memory_bytes"]) and r["peak_memory_bytes"] > 0, name
        assert r["step"] and r["peak_memory"], name
        assert all(math.isfinite(v) for v in _numbers(r["figures"])), name
        assert r["env"]["device"] == "cpu" and r["env"]["torch"] and r["env"]["torch_threads"] >= 1, name
        assert "cpu_model" in r["env"] and r["wall_s"] <= r["budget_s"], name
    assert report["sections"]["ddp"]["figures"]["world_size"] == 2
    assert report["sections"]["datm_cifar10"]["figures"]["iterations"] == 3
    assert "reference-style" in report["sections"]["distill_iteration"]["figures"]["rows"]
    for name in sections:  # the summary line of every section is printed
        assert f"== {name}" in p.stdout
    assert "5/5 sections ok" in p.stdout
