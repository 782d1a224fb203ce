"""DSA: siamese (same parameters -> same transform on real and synthetic batches), differentiable."""
import pytest
import torch

from lightning_dd.augment.dsa import DSA, FAMILIES


@pytest.mark.parametrize("family", FAMILIES)
def test_same_params_same_transform_on_real_and_synthetic(family):
    dsa = DSA(strategy=family)
    g = torch.Generator().manual_seed(0)
    real = torch.randn(6, 3, 16, 16)
    syn = real.clone().requires_grad_(True)
    p = dsa.sample(6, (16, 16), generator=g)
    out_real, out_syn = dsa(real, p), dsa(syn, p)
    assert torch.equal(out_real, out_syn.detach())  # siamese: identical inputs -> identical outputs
    # a sub-batch uses its own rows of the parameters
    idx = torch.tensor([4, 1])
    assert torch.allclose(dsa(real[idx], p.index(idx)), out_real[idx], atol=1e-6)
    # differentiable w.r.t. the synthetic pixels
    out_syn.sum().backward()
    assert syn.grad is not None and torch.isfinite(syn.grad).all()


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
