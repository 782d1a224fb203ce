"""Compare two outputs of ``experiments/structure/proof.sh``: every metric of every run, except wall
clock and memory (``timings/*``, ``*/seconds``, ``memory/*``), must be equal (bitwise: floats compared with ``==``), and so
must the tensors of the artifacts both runs wrote (``distilled.pt``, ``condensed.pt``, ``quantized.pt``).

Usage: ``python experiments/structure/compare_proof.py BEFORE_DIR AFTER_DIR`` (exit 1 on a difference).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def is_clock(key: str) -> bool:
    """Measurements of the machine, not results: wall clock and peak memory."""
    return key.startswith(("timings/", "memory/")) or key.endswith("/seconds")


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
        for art in ("distilled.pt", "condensed.pt", "quantized.pt"):
            if (m.parent / art).is_file() and (other.parent / art).is_file():
                ta, tb = tensors(m.parent / art), tensors(other.parent / art)
                differ = sorted(k for k in set(ta) | set(tb) if k not in ta or k not in tb or not torch.equal(ta[k], tb[k]))
                print(f"    {art}: {len(ta)} tensors, {len(differ)} differ {differ or ''}")
                bad += bool(differ)
    return int(bad > 0)


def tensors(path: Path) -> dict:
    """The tensors of a saved artifact (read with ``weights_only=True``), by dotted key."""
    out = {}

    def walk(prefix: str, v) -> None:
        if isinstance(v, torch.Tensor):
            out[prefix] = v
        elif isinstance(v, dict):
            for k, w in v.items():
                walk(f"{prefix}.{k}" if prefix else str(k), w)
    walk("", torch.load(path, weights_only=True, map_location="cpu"))
    return out


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
