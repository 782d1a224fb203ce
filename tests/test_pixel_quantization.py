"""DQ's pixel step (arXiv 2308.10524, Sec. 3.4): GradCAM++ patch importance, patch dropping, MAE
reconstruction, and the storage budget."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from lightning_dd.methods.images.pixel_quantization import (drop_mask, gradcam_pp, patch_importance, quantize_pixels,
                                                            trained_mae)
from lightning_dd.nets.mae import MAE, patchify, random_mask, unpatchify
from configs import CountingTrainerFactory, method


class _PoolNet(nn.Module):
    """A positive 1x1 conv + ReLU, global average pooling, a linear classifier with positive weights."""

    def __init__(self):
        super().__init__()
        self.conv, self.act = nn.Conv2d(3, 2, 1, bias=False), nn.ReLU()
        self.classifier = nn.Linear(2, 2)
        with torch.no_grad():
            self.conv.weight.abs_()
            self.classifier.weight.abs_()

    def forward(self, x):
        return self.classifier(self.act(self.conv(x)).mean((2, 3)))


def test_gradcam_pp_finds_the_object_and_its_patch_is_never_dropped():
    """Images black except one 4x4 object in a random quadrant: the map is positive on the object
    and zero elsewhere, so dropping 3 of the 4 patches keeps the object's."""
    torch.manual_seed(0)
    n = 6
    x = torch.zeros(n, 3, 8, 8)
    quadrant = torch.randint(4, (n,))
    for i, q in enumerate(quadrant.tolist()):
        r, c = 4 * (q // 2), 4 * (q % 2)
        x[i, :, r:r + 4, c:c + 4] = torch.rand(3, 4, 4) + 0.5
    cam = gradcam_pp(_PoolNet(), x, torch.randint(2, (n,)))
    assert cam.shape == (n, 8, 8) and (cam >= 0).all()
    imp = patch_importance(cam, 4)  # 2x2 patches of 4x4 pixels, row-major = quadrant order
    assert torch.equal(imp.argmax(1), quadrant) and (imp.gt(0).sum(1) >= 1).all()
    mask = drop_mask(imp, 0.75)
    assert mask.sum(1).eq(3).all() and not mask[torch.arange(n), quadrant].any()


def test_gradcam_pp_weights_follow_the_closed_form_on_a_linear_map():
    """For logits linear in the activations (y = sum_k c_k sum_ab A_kab), g = c_k everywhere and
    GradCAM++'s alpha = 1 / (2 + sum_ab(A_k) c_k), so w_k = relu(c_k) * HW / (2 + sum(A_k) c_k)."""
    torch.manual_seed(1)

    class Lin(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = nn.ReLU()
            self.classifier = nn.Linear(2, 1, bias=False)
            self.classifier.weight.data = torch.tensor([[0.5, 2.0]])

        def forward(self, x):
            return self.classifier(self.act(x).sum((2, 3)))

    x = torch.rand(1, 2, 4, 4)
    cam = gradcam_pp(Lin(), x, torch.tensor([0]))
    c = torch.tensor([0.5, 2.0])
    w = c * 16 / (2 + x[0].sum((1, 2)) * c)
    torch.testing.assert_close(cam[0], torch.relu((w[:, None, None] * x[0]).sum(0)))


def test_patchify_roundtrip_and_mae_keeps_the_visible_patches_bit_for_bit():
    torch.manual_seed(0)
    x = torch.randn(3, 3, 16, 16)
    assert torch.equal(unpatchify(patchify(x, 4), 4, 3, 16, 16), x)
    mae = MAE(3, (16, 16), 4, dim=32, depth=1, heads=2, decoder_dim=16, decoder_depth=1, decoder_heads=2).eval()
    mask = random_mask(3, 16, 0.25, torch.Generator().manual_seed(0))
    assert mask.sum(1).eq(4).all()
    out = mae.reconstruct(x, mask)
    keep = ~mask[..., None]
    assert torch.equal(patchify(out, 4) * keep, patchify(x, 4) * keep)
    assert not torch.equal(patchify(out, 4)[mask], patchify(x, 4)[mask])
    with pytest.raises(ValueError, match="same number"):
        mae(x, torch.eye(3, 16, dtype=torch.bool) | torch.tensor([[True] + [False] * 15] * 2 + [[True, True] + [False] * 14]))


def test_the_trained_mae_reconstructs_better_than_its_init_and_is_cached(tmp_path):
    """On real-like structured images (smooth ramps), a few epochs lower the masked-patch error, and a
    second request with the same data and settings trains nothing."""
    g = torch.Generator().manual_seed(0)
    ramp = torch.linspace(-1, 1, 16)
    x = (ramp.view(1, 1, 1, 16) * torch.rand(256, 3, 1, 1, generator=g)
         + ramp.view(1, 1, 16, 1) * torch.rand(256, 3, 1, 1, generator=g))
    small = {"enabled": True, "patch": 4, "drop_ratio": 0.25, "mae_dim": 32, "mae_depth": 1, "mae_heads": 2,
             "decoder_dim": 32, "decoder_depth": 1, "mae_epochs": 8, "mae_batch": 64, "mae_lr": 3e-3}
    hp = method("dq", **{f"pixel.{k}": v for k, v in small.items()}).pixel
    make = CountingTrainerFactory(accelerator="cpu", enable_progress_bar=False)
    mask = random_mask(256, 16, 0.25, torch.Generator().manual_seed(5))
    from lightning_dd.methods.images.pixel_quantization import build_mae
    from lightning_dd.nets.mae import mae_loss
    torch.manual_seed(0)
    init_err = mae_loss(build_mae(hp, 3, (16, 16)).eval()(x, mask), x, mask, 4).item()
    mae, info = trained_mae(hp, x, {"name": "ramps"}, tmp_path, make)
    with torch.no_grad():
        err = mae_loss(mae(x, mask), x, mask, 4).item()
    assert err < 0.5 * init_err and info["mae/train_s"] > 0
    again, info2 = trained_mae(hp, x, {"name": "ramps"}, tmp_path, make)
    assert info2["mae/train_s"] == 0 and make.stages == ["mae"]
    assert all(torch.equal(a, b) for a, b in zip(mae.state_dict().values(), again.state_dict().values()))
    # the whole step: shapes, drop count and visible pixels unchanged
    out, dropped = quantize_pixels(x[:10], torch.zeros(10, dtype=torch.long), _PoolNet(), mae, hp)
    assert out.shape == x[:10].shape and dropped.sum(1).eq(4).all()
    keep = ~dropped[..., None]
    assert torch.equal(patchify(out, 4) * keep, patchify(x[:10], 4) * keep)


@pytest.mark.parametrize("fraction,drop,want", [(0.1, 0.25, 133), (0.1, 0.0, 100), (0.3, 0.5, 600), (0.8, 0.5, 1000)])
def test_the_budget_counts_stored_pixels(fraction, drop, want):
    dq = method("dq", fraction=fraction, **{"pixel.enabled": True, "pixel.drop_ratio": drop})
    dm = SimpleNamespace(class_indices=lambda: list(torch.arange(10_000).view(10, 1000)))
    assert dq.per_class(dm) == want
    off = method("dq", fraction=fraction, **{"pixel.enabled": False})
    assert off.per_class(dm) == round(1000 * fraction)


def test_the_pixel_step_is_on_by_default_as_the_reference_cifar_pipeline():
    """README: --mask_ratio 0.2 --cam_mask; mae_models.py get_cam_map explains the argmax class;
    cam_masking keeps int(L * (1 - ratio)) patches."""
    hp = method("dq").pixel  # conf/method/dq.yaml
    assert hp.enabled and hp.drop_ratio == 0.2 and hp.cam_class == "argmax"
    assert drop_mask(torch.rand(3, 64), 0.2).sum(1).eq(64 - 51).all()  # int(51.2) kept
    assert drop_mask(torch.rand(3, 64), 0.1).sum(1).eq(7).all()  # int(57.6) = 57 kept, round(6.4) would drop 6


def test_gradcam_pp_explains_the_predicted_class_unless_told_the_label():
    """labels=None: the CAM of each image's argmax class (the reference's get_cam_map), equal to the
    CAM computed with the predicted labels given; different from the CAM of another class."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(4, 3))
    x = torch.randn(6, 3, 8, 8)
    pred = net(x).argmax(1)
    assert torch.equal(gradcam_pp(net, x, None), gradcam_pp(net, x, pred))
    assert not torch.allclose(gradcam_pp(net, x, None), gradcam_pp(net, x, (pred + 1) % 3))
