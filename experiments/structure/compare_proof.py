"""Compare two outputs of ``experiments/structure/proof.sh``: every metric of every run, except wall
clock (``timings/*`` and ``*/seconds``), must be equal (bitwise: floats compared with ``==``).

Usage: ``python experiments/structure/compare_proof.py BEFORE_DIR AFTER_DIR`` (exit 1 on a difference).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def is_clock(key: str) -> bool:
    return key.startswith("timings/") or key.endswith("/seconds")


def main(before: Path, after: Path) -> int:
    bad = 0
    for m in sorted(before.glob("*/metrics.json")):
        name = m.parent.name
        other = after / name / "metrics.json"
        if not other.is_file():
            print(f"{name}: no metrics.json in {after}")
            bad += 1
            continue
        a, b = json.loads(m.read_text()), json.loads(other.read_text())
        keys = sorted(k for k in set(a) | set(b) if not is_clock(k))
        diff = [k for k in keys if a.get(k) != b.get(k)]
        shown = {k: a[k] for k in keys if k.endswith("acc_mean") or k.endswith("/acc")}
        print(f"{name}: {len(keys)} metrics, {len(diff)} differ; "
              + ", ".join(f"{k}={v:.4f}" for k, v in list(shown.items())[:4]))
        for k in diff:
            print(f"    {k}: {a.get(k)!r} -> {b.get(k)!r}")
        bad += bool(diff)
    return int(bad > 0)


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
