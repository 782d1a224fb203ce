"""How much of MaST-Pre's pretext needs the encoder? (the MaST-Pre probe bar of experiments/point_video)

MaST-Pre (Shen et al., ICCV 2023, arXiv 2308.09245) gives its MAE-style decoder the (x, y, z, t)
position of every visible and masked point tube. If the masked patches can be predicted from those
positions alone, the encoder's features are not needed to lower the loss and the pretext teaches the
encoder little. This script pretrains three variants of ``experiment=mast_pre_msr`` with the same
seed and compares their loss curves (``csv/metrics.csv`` epoch means):

* ``trained``: MaST-Pre as configured (the encoder learns);
* ``frozen``: the encoder stays at its random initialization (:class:`FrozenEncoderModule`); the
  decoder still gets its random features of the visible tubes;
* ``positions``: frozen encoder and a zero, frozen ``decoder_embed`` (:class:`PositionsOnlyModule`),
  so the decoder sees the tubes' positions and the mask token, nothing of the points.

Equal curves mean the pretext is solved from the positions. The variants run through ``train.py``
with ``stage=pretrain`` (no probes) and ``method._target_`` set to the classes below, with this
directory on ``PYTHONPATH``.

Usage, from the repository root (``scale=cpu``: about 9 min per variant on one idle core)::

    LDD_DATA_DIR=../shared/data OMP_NUM_THREADS=1 python experiments/point_video/encoder_dependence.py \
        [--seed 0] [--jobs 2] [--variant trained --variant positions] [--out outputs/encoder_dependence] \
        [extra train.py overrides, e.g. method.cardinality=reference ...]
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from lightning_dd.methods.point_video.mast_pre import MaSTPre, MaSTPreModule

ROOT = Path(__file__).resolve().parents[2]


class FrozenEncoderModule(MaSTPreModule):
    """MaST-Pre with the encoder (tube embedding, position embedding, transformer) frozen at init."""

    def __init__(self, encoder, hp, steps):
        super().__init__(encoder, hp, steps)
        self.encoder.requires_grad_(False)


class PositionsOnlyModule(FrozenEncoderModule):
    """Frozen encoder and ``decoder_embed`` fixed at zero: the decoder's inputs are the positions of
    the visible and masked tubes (plus the mask token on the masked ones), nothing of the points."""

    def __init__(self, encoder, hp, steps):
        super().__init__(encoder, hp, steps)
        with torch.no_grad():
            self.decoder_embed.weight.zero_()
            self.decoder_embed.bias.zero_()
        self.decoder_embed.requires_grad_(False)


class FrozenEncoderMaSTPre(MaSTPre):
    """``method._target_`` of the ``frozen`` variant: :class:`MaSTPre` training :class:`FrozenEncoderModule`."""

    def pretext(self, encoder, steps):
        return FrozenEncoderModule(encoder, self, steps)


class PositionsOnlyMaSTPre(MaSTPre):
    """``method._target_`` of the ``positions`` variant: :class:`MaSTPre` training :class:`PositionsOnlyModule`."""

    def pretext(self, encoder, steps):
        return PositionsOnlyModule(encoder, self, steps)


VARIANTS = {"trained": None, "frozen": "encoder_dependence.FrozenEncoderMaSTPre",
            "positions": "encoder_dependence.PositionsOnlyMaSTPre"}
KEYS = ("loss", "points", "cardinality")


def run_variant(name: str, target: str | None, seed: int, out: Path, extra: list[str]) -> Path:
    """Pretrain one variant through ``train.py``; returns its run directory (raises on failure)."""
    run_dir = out / f"{name}_s{seed}"
    cmd = [sys.executable, "train.py", "experiment=mast_pre_msr", "scale=cpu", "stage=pretrain", f"seed={seed}",
           f"hydra.run.dir={run_dir}", *([f"method._target_={target}"] if target else []), *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir.parent / f"{name}_s{seed}.log", "w") as log:
        subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    return run_dir


def epoch_means(run_dir: Path) -> list[dict]:
    """Epoch-mean pretraining losses ``[{"epoch", "loss", "points", "cardinality"}, ...]`` (the
    runner's closing row of final metrics, which has no epoch, is skipped)."""
    with open(run_dir / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("pretrain/loss_epoch") and r.get("epoch")]
    return [{"epoch": int(r["epoch"]), **{k: float(r[f"pretrain/{k}_epoch"]) for k in KEYS}} for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=1, help="variants run side by side (one core each)")
    ap.add_argument("--variant", action="append", choices=list(VARIANTS), dest="variants",
                    help="run only this variant (repeatable; default: all three)")
    ap.add_argument("--out", type=Path, default=Path("outputs/encoder_dependence"))
    ap.add_argument("overrides", nargs="*", help="extra train.py overrides, e.g. method.epochs=10")
    args = ap.parse_args()
    args.variants = args.variants or list(VARIANTS)
    out = args.out if args.out.is_absolute() else ROOT / args.out
    with ThreadPoolExecutor(args.jobs) as pool:
        dirs = dict(zip(args.variants, pool.map(lambda kv: run_variant(*kv, args.seed, out, args.overrides),
                                           [(v, VARIANTS[v]) for v in args.variants])))
    curves = {name: epoch_means(d) for name, d in dirs.items()}
    n = min(len(c) for c in curves.values())
    shown = sorted({0, 1, 5, 10, 20, n - 1} & set(range(n)))
    print(f"MaST-Pre pretraining losses (epoch means), seed {args.seed}; runs in {out}")
    print("| variant | loss | " + " | ".join(f"epoch {e}" for e in shown) + " |")
    print("|---|---|" + "---|" * len(shown))
    for name, c in curves.items():
        for k in KEYS:
            print(f"| {name} | {k} | " + " | ".join(f"{c[e][k]:.4f}" for e in shown) + " |")


if __name__ == "__main__":
    main()
