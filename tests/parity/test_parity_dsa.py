"""DSA (arXiv 2102.08259) against the authors' ``DiffAugment`` (fixtures of ``gen_dsa.py``): the same
random draws give the same augmented images, per family, in modes S and M, with their gradient, and
siamese (one seed, the same transform on a real and a synthetic batch).

``dsa``: DSA's own code (``VICO-UoE/DatasetCondensation``, warps with ``align_corners=False``);
``dsa_mtt``: MTT's copy (also DATM's; ``align_corners=True``, as ours: for the centred linear warps
of scale and rotate both sample the same points, which the pair of fixtures shows). Tolerance: 1e-5 absolute
(float32 warps and means; the discrete parts -- family, shifts, cutout squares, flips -- are exact
or the difference would be O(1)).

Mutations checked (each made these tests fail, then restored): rotation in the opposite direction
(``-a.sin()`` and ``a.sin()`` swapped in ``DSA.apply``); scale drawn as one ``rand(n, 2)`` instead of
``rand(n)`` twice; saturation drawn before brightness; ``sample_siamese`` keeping per-image parameters instead of the first image's.
"""
import pytest
import torch

from fixture_io import load_fixture

from lightning_dd.augment.dsa import DSA

pytestmark = pytest.mark.parity
TOL = dict(atol=1e-5, rtol=0)
FIXTURES = ("dsa", "dsa_mtt")


def _fixture(name):
    f = load_fixture(name)["cases"]
    return f["inputs"], {k: v for k, v in f.items() if k != "inputs"}


def _ours(case, x):
    dsa = DSA(strategy=case["strategy"], mode=case["mode"])
    p = dsa.sample(x.shape[0], x.shape[-2:], generator=torch.Generator().manual_seed(case["rng"]))
    return dsa(x, p), p


@pytest.mark.parametrize("name", FIXTURES)
def test_each_family_and_mode_s_equal_the_reference_for_the_same_seed(name):
    """Each family alone (mode M), and the whole strategy in mode S over 10 seeds (the family drawn
    first, as the reference): our ``sample`` from a generator seeded as the reference's global RNG,
    then ``apply``, gives the reference's images."""
    inputs, cases = _fixture(name)
    drawn = set()
    for key, case in cases.items():
        if key.startswith(("family_", "single_")):
            out, p = _ours(case, inputs["x"])
            drawn.update(p.ops)
            torch.testing.assert_close(out, case["out"], **TOL, msg=lambda m: f"{name}/{key}: {m}")
    assert drawn == {"color", "crop", "cutout", "flip", "scale", "rotate"}


@pytest.mark.parametrize("name", FIXTURES)
def test_mode_m_output_and_gradient_equal_the_reference(name):
    """All families in order (mode M): the images and the gradient of ``sum(out * w)`` w.r.t. the
    input (differentiable augmentation)."""
    inputs, cases = _fixture(name)
    case = cases["multiple"]
    x = inputs["x"].clone().requires_grad_(True)
    out, _ = _ours(case, x)
    (out * inputs["weight"]).sum().backward()
    torch.testing.assert_close(out, case["out"], **TOL)
    torch.testing.assert_close(x.grad, case["grad"], **TOL)


@pytest.mark.parametrize("name", FIXTURES)
def test_siamese_draw_gives_the_reference_transform_to_real_and_synthetic_batches(name):
    """``DSA.sample_siamese(n, size, seed)`` = ``DiffAugment(x, strategy, seed=seed)``: one transform
    per batch from the reference's re-seeded draws, the same on a real batch of 5 and a synthetic
    batch of 2."""
    inputs, cases = _fixture(name)
    for key, case in cases.items():
        if not key.startswith("siamese_"):
            continue
        dsa = DSA(strategy=case["strategy"], mode=case["mode"])
        for which in ("real", "syn"):
            x = inputs[which]
            out = dsa(x, dsa.sample_siamese(x.shape[0], x.shape[-2:], seed=case["seed"]))
            torch.testing.assert_close(out, case[which], **TOL, msg=lambda m: f"{name}/{key}/{which}: {m}")
