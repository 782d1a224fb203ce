"""DSA: each family pinned to an independent computation (kornia / torchvision functional ops or the
formula) with fixed parameters, siamese (one parameter object, the same transform on real and
synthetic batches), differentiable."""
import math

import pytest
import torch

from lightning_dd.augment.dsa import DSA, FAMILIES, DSAParams


def _pair():
    g = torch.Generator().manual_seed(0)
    return torch.rand(3, 3, 16, 16, generator=g), torch.randn(3, 3, 16, 16, generator=g)  # "real", "synthetic"


def _geometric_references():
    """Each geometric family with fixed parameters, and the same transform through kornia / torchvision
    functional ops (independent code). Conventions: DSA's angle a is kornia's a degrees (the
    reference's ``[[cos, -sin], [sin, cos]]`` grid map, output to input), its scale s is kornia's zoom 1/s, its shift (dy, dx) moves the
    content by (-dy, -dx)."""
    import kornia.geometry.transform as KT
    import torchvision.transforms.v2.functional as TF

    ang = torch.tensor([10.0, -7.0, 3.0])
    sc = torch.tensor([[1.1, 0.9], [0.85, 1.15], [1.0, 1.2]])
    sh = torch.tensor([[1, -2], [0, 3], [-2, 0]])
    fl = torch.tensor([True, False, True])
    kw = dict(align_corners=True, padding_mode="zeros")
    return [
        ("rotate", {"angle": ang / 180 * math.pi}, lambda x: KT.rotate(x, ang, mode="bilinear", **kw)),
        ("scale", {"scale": sc}, lambda x: KT.scale(x, 1 / sc, mode="bilinear", **kw)),
        ("crop", {"shift": sh}, lambda x: KT.translate(x, -sh.flip(1).float(), mode="nearest", **kw)),
        ("flip", {"flip": fl}, lambda x: torch.where(fl.view(3, 1, 1, 1), TF.horizontal_flip(x), x)),
    ]


@pytest.mark.parametrize("op, values, reference", _geometric_references(), ids=lambda v: v if isinstance(v, str) else "")
def test_geometric_families_equal_library_ops_on_real_and_synthetic_alike(op, values, reference):
    """Siamese: one parameter object applies the same transform to two different batches, and
    that transform is the library's."""
    real, syn = _pair()
    dsa, p = DSA(strategy=op), DSAParams((op,), values)
    for x in (real, syn):
        assert torch.allclose(dsa(x, p), reference(x), atol=1e-5)


def test_color_is_brightness_then_saturation_then_contrast():
    """Per image: x + b; then (x - channel mean) * s + channel mean; then (x - image mean) * c + image mean."""
    real, syn = _pair()
    b, s, c = torch.tensor([0.2, -0.1, 0.0]), torch.tensor([0.5, 1.5, 1.0]), torch.tensor([1.2, 0.7, 1.0])
    p = DSAParams(("color",), {"brightness": b, "saturation": s, "contrast": c})
    for x in (real, syn):
        out = DSA(strategy="color")(x, p)
        for i in range(3):
            y = x[i].double() + float(b[i])
            gray = y.mean(0, keepdim=True)
            y = (y - gray) * float(s[i]) + gray
            y = (y - y.mean()) * float(c[i]) + y.mean()
            assert torch.allclose(out[i].double(), y, atol=1e-5)


def test_cutout_zeroes_the_square_at_the_sampled_centre():
    real, syn = _pair()
    centre = torch.tensor([[8, 8], [0, 15], [15, 3]])
    p = DSAParams(("cutout",), {"cutout": centre})
    for x in (real, syn):
        out = DSA(strategy="cutout")(x, p)
        for i, (cy, cx) in enumerate(centre.tolist()):
            keep = torch.ones(16, 16)
            keep[max(cy - 4, 0):cy + 4, max(cx - 4, 0):cx + 4] = 0  # side 16 * 0.5 = 8, centred
            assert torch.equal(out[i], x[i] * keep)


@pytest.mark.parametrize("family", FAMILIES)
def test_sub_batches_use_their_rows_and_gradients_flow(family):
    dsa = DSA(strategy=family)
    real, syn = _pair()
    syn.requires_grad_(True)
    p = dsa.sample(3, (16, 16), generator=torch.Generator().manual_seed(0))
    idx = torch.tensor([2, 0])
    assert torch.allclose(dsa(real[idx], p.index(idx)), dsa(real, p)[idx], atol=1e-6)
    dsa(syn, p).square().sum().backward()
    assert syn.grad is not None and torch.isfinite(syn.grad).all() and syn.grad.abs().sum() > 0


def test_different_params_differ_and_change_images():
    dsa = DSA(mode="M")
    x = torch.randn(8, 3, 16, 16)
    a = dsa(x, dsa.sample(8, (16, 16), generator=torch.Generator().manual_seed(0)))
    b = dsa(x, dsa.sample(8, (16, 16), generator=torch.Generator().manual_seed(1)))
    assert not torch.allclose(a, b) and not torch.allclose(a, x)


def test_crop_translates_by_sampled_shift_and_flip_mirrors():
    dsa = DSA(strategy="crop")
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).view(2, 1, 8, 8)
    p = dsa.sample(2, (8, 8))
    p.values["shift"] = torch.tensor([[1, 0], [0, -1]])
    y = dsa(x, p)
    assert torch.equal(y[0, 0, :7], x[0, 0, 1:]) and torch.equal(y[0, 0, 7], torch.zeros(8))
    assert torch.equal(y[1, 0, :, 1:], x[1, 0, :, :7]) and torch.equal(y[1, 0, :, 0], torch.zeros(8))
    f = DSA(strategy="flip")
    q = f.sample(2, (8, 8))
    q.values["flip"] = torch.tensor([True, False])
    z = f(x, q)
    assert torch.equal(z[0], x[0].flip(-1)) and torch.equal(z[1], x[1])


def test_cutout_zeroes_a_square_of_half_the_side():
    dsa = DSA(strategy="cutout")
    p = dsa.sample(3, (16, 16), generator=torch.Generator().manual_seed(3))
    y = dsa(torch.ones(3, 2, 16, 16), p)
    zeros = (y[:, 0] == 0).sum((1, 2))
    assert (zeros > 0).all() and (zeros <= 64).all()
    assert torch.equal(y[:, 0] == 0, y[:, 1] == 0)  # same mask on every channel


def test_unknown_family_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown DSA families"):
        DSA(strategy="color_blur")
