"""Coreset selectors do what their definitions say; every evaluation architecture builds and runs."""
import pytest
import torch

from lightning_dd.methods.images.selection import embed
from lightning_dd.training.coresets import herding, k_center
from lightning_dd.nets import ARCHITECTURES, build_net


def _clusters(n=300, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * torch.linspace(0.2, 3, d)


def test_herding_mean_is_closer_to_the_data_mean_than_random_subsets():
    f = _clusters()
    mu = f.mean(0)
    sel = herding(f, 10)
    assert len(set(sel.tolist())) == 10
    err = (f[sel].mean(0) - mu).norm()
    g = torch.Generator().manual_seed(1)
    rand = [(f[torch.randperm(len(f), generator=g)[:10]].mean(0) - mu).norm() for _ in range(200)]
    assert err < min(rand)


def test_k_center_covers_better_than_random_subsets():
    f = _clusters()
    sel = k_center(f, 10)
    assert len(set(sel.tolist())) == 10

    def radius(idx):
        return torch.cdist(f, f[idx]).min(1).values.max()

    g = torch.Generator().manual_seed(2)
    rand = [radius(torch.randperm(len(f), generator=g)[:10]) for _ in range(200)]
    assert radius(sel) < min(rand)


def test_selectors_reject_asking_for_too_many():
    with pytest.raises(ValueError, match="asked for 5 of 3"):
        herding(torch.randn(3, 2), 5)
    with pytest.raises(ValueError, match="asked for 5 of 3"):
        k_center(torch.randn(3, 2), 5)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_every_architecture_maps_cifar_images_to_logits(name):
    net = build_net(name, 3, 10, (32, 32))
    out = net(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.sum().backward()  # trainable end to end
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", ["ResNet18BN", "ResNet50"])
def test_resnets_at_imagenet_resolution_use_the_strided_stem(name):
    net = build_net(name, 3, 5, (224, 224))
    assert net.conv1.stride == (2, 2) and not isinstance(net.maxpool, torch.nn.Identity)
    assert net(torch.randn(1, 3, 224, 224)).shape == (1, 5)


def test_embed_returns_the_classifier_input():
    net = build_net("ConvNet", 3, 10, (32, 32), width=16, depth=3)
    x = torch.randn(5, 3, 32, 32)
    f = embed(net, x, chunk=2)
    assert f.shape == (5, 16 * 4 * 4)
    assert torch.allclose(net.classifier(f), net(x), atol=1e-5)


def test_unknown_net_lists_the_known_ones():
    with pytest.raises(ValueError, match="known:.*AlexNet"):
        build_net("LeNet7", 3, 10, (32, 32))
