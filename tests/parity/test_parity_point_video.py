"""Parity of the point-video family with the authors' code (fixtures from ``gen_point_video.py``):
P4Transformer's P4DConv (Fan et al., CVPR 2021) and MaST-Pre's targets and losses (Shen et al.,
ICCV 2023). Both sides use the same FPS / ball query (:mod:`lightning_dd.nets.point_ops`; the
reference's CUDA ops were replaced by them), so the anchors are the same by construction and the
tests pin what is built on them."""
import pytest
import torch
from hydra.utils import instantiate

from configs import compose_train
from fixture_io import load_fixture
from lightning_dd.methods.point_video.mast_pre import MaSTPreModule, mast_pre_losses
from lightning_dd.nets.p4transformer import P4DConv, P4Encoder

pytestmark = pytest.mark.parity


def _tube(case: dict, dim: int) -> P4DConv:
    conv = P4DConv(dim, case["radius"], case["k"], case["spatial_stride"], tk=3, ts=2, padding=(1, 0))
    with torch.no_grad():
        conv.conv_d.weight.copy_(case["weight"])
    return conv


@pytest.mark.parametrize("family", ["point_video_p4transformer", "point_video"])
def test_p4dconv_forward_equals_the_reference(family):
    """P4DConv's forward (P4Transformer Sec. 3.1) on fixed points and weights: the anchor frames
    (replicate padding 1 at the start, kernel 3, stride 2), the anchors, and the tube features
    (the bias-free linear map of (dx, dy, dz, dt), max over the neighbours then over the kernel
    frames) equal the reference's ``P4DConv`` (P4Transformer's and MaST-Pre's copy), to 1e-5.
    With MaST-Pre's: also the neighbours' absolute coordinates (``xyzs_neighbors``), exactly.
    Mutation checked: the dt term dropped from the features -> fails."""
    case = load_fixture(family)["cases"]["p4dconv"]
    out = _tube(case, case["weight"].shape[0])(case["clip"], return_neighbours=True)
    assert torch.equal(out[0], case["anchors"])
    torch.testing.assert_close(out[1], case["features"], atol=1e-5, rtol=0)
    if "neighbours" in case:
        assert torch.equal(out[2], case["neighbours"])


def _mast_pre(case: dict, **kw) -> tuple[MaSTPreModule, P4Encoder]:
    hp = instantiate(compose_train("experiment=mast_pre_msr").method, _convert_="all",   # conf/method/mast_pre.yaml
                     encoder=dict(dim=32, depth=1, heads=2, mlp_dim=64, radius=case["radius"], k=case["k"],
                                  spatial_stride=case["spatial_stride"], dropout=0.0),
                     decoder_dim=32, decoder_depth=1, decoder_heads=2, **kw)
    enc = hp.encoder.build()
    with torch.no_grad():
        enc.tube.conv_d.weight.copy_(case["tube_weight"])
    return hp.pretext(enc, 10), enc


def test_mast_pre_targets_equal_the_reference():
    """MaST-Pre's targets with the default settings (``target=absolute``,
    ``cardinality=reference``): the token positions (x, y, z, t = anchor frame + 1), the masked
    tubes' point targets (the neighbours' absolute coordinates, ``CLR_Model.forward_encoder``'s
    ``xyzs_neighbors``) and the temporal cardinality descriptors (``SHOT.getDescribe`` with
    interpolation, unnormalized; distinct ball-query hits, empty balls zero) equal the
    reference's for every tube, to 1e-5 (float32 angles). Mutations checked: the point targets as
    displacements from the anchor (``target=displacement``); the elevation interpolation toward
    the equator dropped; every ball-query slot counted (padding included) -> each fails."""
    case = load_fixture("point_video")["cases"]["mast_pre"]
    module, enc = _mast_pre(case)
    xyzt, _, neigh, index = enc.tokens(case["clip"], return_neighbours=True)
    assert torch.equal(xyzt, case["xyzts"])
    points, card = module.targets(neigh, index, xyzt)
    assert torch.equal(points, case["neighbours"])
    torch.testing.assert_close(card, case["descriptors"], atol=1e-5, rtol=0)
    per_neighbour = card.sum(-1)[card.sum(-1) > 0] / (index != index[..., :1]).sum(-1).add(1)[card.sum(-1) > 0]
    assert per_neighbour.min() >= 0.75 and per_neighbour.max() <= 2 + 1e-5  # 1.5..2 per hit, 1 for the anchor alone


def test_mast_pre_losses_equal_the_reference():
    """MaST-Pre's losses on the reference decoder's own predictions for the masked tubes: the
    Chamfer-L2 term (per tube and kernel frame, averaged), the SmoothL1 on the descriptors'
    frame-to-frame differences, and their sum equal ``CLR_Model.forward_decoder``'s, to 1e-5
    relative. Mutations checked: SmoothL1 -> MSE; the descriptor difference reversed
    (``card[t] - card[t + 1]``); Chamfer with the square root (L1 form) -> each fails."""
    case = load_fixture("point_video")["cases"]["mast_pre"]
    mask = case["mask"]
    b = mask.shape[0]
    points = case["neighbours"][mask].view(b, -1, *case["neighbours"].shape[2:])
    card = case["descriptors"][mask].view(b, -1, *case["descriptors"].shape[2:])
    out = mast_pre_losses(case["pred_points"], case["pred_card"], points, card)
    for ours, ref in (("points", "points_loss"), ("cardinality", "cardinality_loss"), ("loss", "loss")):
        torch.testing.assert_close(out[ours], case[ref].float(), rtol=1e-5, atol=1e-7)
