"""Generate the DSA parity fixtures from the authors' ``DiffAugment``.

Exercised: ``utils.py`` ``DiffAugment`` / ``ParamDiffAug`` and the transforms it calls
(``rand_brightness``, ``rand_saturation``, ``rand_contrast``, ``rand_crop``, ``rand_cutout``,
``rand_flip``, ``rand_scale``, ``rand_rotate``) of two repositories:

* ``fixtures/dsa.pt`` from DSA's own code (Zhao & Bilen, arXiv 2102.08259,
  ``VICO-UoE/DatasetCondensation``), whose warps use PyTorch's default ``align_corners=False``;
* ``fixtures/dsa_mtt.pt`` from MTT's copy (``GeorgeCazenavette/mtt-distillation``, identical in
  DATM), whose warps use ``align_corners=True``.

Cases, on fixed images: each family alone (mode ``M``) after ``torch.manual_seed(seed)``; the full
strategy in mode ``S`` (one family drawn per batch) for several seeds, and in mode ``M`` with the
gradient of a fixed weighting of the output w.r.t. the images; the siamese call
(``DiffAugment(x, strategy, seed=s)``) on a real and a synthetic batch of different sizes. The
reference draws from the global RNG, so the test seeds a ``torch.Generator`` identically.

    python tests/parity/gen_dsa.py --reference /tmp/ref/DatasetCondensation --mtt /tmp/ref/mtt-distillation
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixture_io import add_reference_to_path, save_fixture  # noqa: E402

FAMILIES = ("color", "crop", "cutout", "flip", "scale", "rotate")
STRATEGY = "color_crop_cutout_flip_scale_rotate"


def _import_utils(checkout: str):
    """The checkout's ``utils`` module, imported fresh (both repositories name it ``utils``)."""
    for name in ("utils", "networks"):
        sys.modules.pop(name, None)
    root = add_reference_to_path(checkout)
    import utils  # noqa: PLC0415  (the reference's)
    sys.path.remove(str(root))
    return utils


def _cases(utils) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 10, 10, generator=g)
    real, syn = torch.randn(5, 3, 10, 10, generator=g), torch.randn(2, 3, 10, 10, generator=g)
    weight = torch.randn(4, 3, 10, 10, generator=g)
    cases = {"inputs": {"x": x, "real": real, "syn": syn, "weight": weight}}

    def run(inp, strategy, mode, seed=-1, rng=None):
        param = utils.ParamDiffAug()
        param.aug_mode = mode
        if rng is not None:
            torch.manual_seed(rng)
        return utils.DiffAugment(inp, strategy, seed=seed, param=param)

    for f in FAMILIES:
        cases[f"family_{f}"] = {"strategy": f, "mode": "M", "rng": 11, "out": run(x, f, "M", rng=11)}
    for s in range(10):
        cases[f"single_{s}"] = {"strategy": STRATEGY, "mode": "S", "rng": s, "out": run(x, STRATEGY, "S", rng=s)}
    xg = x.clone().requires_grad_(True)
    out = run(xg, STRATEGY, "M", rng=5)
    (out * weight).sum().backward()
    cases["multiple"] = {"strategy": STRATEGY, "mode": "M", "rng": 5, "out": out, "grad": xg.grad}
    for i, strategy in enumerate((*FAMILIES, STRATEGY, STRATEGY, STRATEGY)):
        seed = 1000 + 37 * i
        cases[f"siamese_{i}"] = {"strategy": strategy, "mode": "S", "seed": seed,
                                 "real": run(real, strategy, "S", seed=seed), "syn": run(syn, strategy, "S", seed=seed)}
    return cases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", required=True, help="checkout of VICO-UoE/DatasetCondensation")
    ap.add_argument("--mtt", required=True, help="checkout of GeorgeCazenavette/mtt-distillation")
    a = ap.parse_args()
    save_fixture("dsa", _cases(_import_utils(a.reference)), reference=a.reference,
                 repo="VICO-UoE/DatasetCondensation")
    save_fixture("dsa_mtt", _cases(_import_utils(a.mtt)), reference=a.mtt, repo="GeorgeCazenavette/mtt-distillation")


if __name__ == "__main__":
    main()
