"""Parity fixtures of the point-video family: P4Transformer's P4DConv (Fan et al., CVPR 2021) and
MaST-Pre's targets and losses (Shen et al., ICCV 2023, arXiv 2308.09245), from the authors' code.

Exercised reference code:

* MaST-Pre checkout (``--reference``): ``modules/point_4d_convolution.py`` ``P4DConv.forward``
  (anchors, tube features, the neighbours' coordinates ``xyzs_neighbors`` and the cardinality
  descriptors, ``modules/SHOT.py`` ``getDescribe``), and ``models/CLR_Model.py``
  ``ContrastiveLearningModel.forward_encoder`` (token positions, the targets, the random mask) and
  ``forward_decoder`` (the predicted points and descriptor differences, captured by forward hooks
  on ``points_predictor`` / ``shot_predictor``, and the Chamfer-L2 and SmoothL1 terms, captured on
  ``criterion_dist`` / ``criterion_shot``, and the returned loss). Written to
  ``fixtures/point_video.pt``.
* P4Transformer checkout (``--p4transformer``, optional): ``modules-pytorch-1.8.1/point_4d_convolution.py``
  ``P4DConv.forward`` as its ``models/msr.py`` builds it. Written to ``fixtures/point_video_p4transformer.pt``.

Replaced to run on a CPU (see ``replaced=``): the pointnet2 CUDA extension behind
``pointnet2_utils`` (``furthest_point_sample``, ``gather_operation``, ``ball_query``,
``grouping_operation``) by :mod:`lightning_dd.nets.point_ops` (so both sides get the same anchors);
MaST-Pre's CUDA ``chamfer`` extension by a dense pure-PyTorch nearest-neighbour forward; and,
while the reference runs, ``torch.Tensor.get_device`` returns the tensor's device (the reference
passes ``get_device()``, -1 on a CPU tensor, as a ``device=`` argument); ``einops`` (not
installed) by the two ``rearrange`` patterns MaST-Pre's ``modules/transformer.py`` uses.

    python tests/parity/gen_point_video.py --reference /tmp/ref/MaST-Pre --p4transformer /tmp/ref/P4Transformer
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import types
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))

from fixture_io import add_reference_to_path, save_fixture  # noqa: E402
from lightning_dd.nets.point_ops import ball_query, farthest_point_sample, gather_points  # noqa: E402

RADIUS, K, STRIDE, DIM = 0.45, 8, 8, 16
REPLACED_PN2 = ("pointnet2_utils' CUDA ops (furthest_point_sample, gather_operation, ball_query, grouping_operation) "
                "-> lightning_dd.nets.point_ops; torch.Tensor.get_device returns the device while the reference runs")


def pointnet2_stub() -> types.ModuleType:
    """A ``pointnet2_utils`` module with the four ops P4DConv calls, in pointnet2's layouts."""
    m = types.ModuleType("pointnet2_utils")
    m.furthest_point_sample = lambda xyz, n: farthest_point_sample(xyz, n).int()
    m.gather_operation = lambda f, idx: gather_points(f.transpose(1, 2), idx.long()).transpose(1, 2).contiguous()
    m.ball_query = lambda r, k, xyz, new_xyz: ball_query(r, k, xyz, new_xyz).int()
    m.grouping_operation = lambda f, idx: gather_points(f.transpose(1, 2), idx.long()).permute(0, 3, 1, 2).contiguous()
    return m


def chamfer_stub() -> types.ModuleType:
    """A ``chamfer`` module (MaST-Pre's CUDA extension): squared nearest-neighbour distances both ways."""
    m = types.ModuleType("chamfer")

    def forward(x, y):
        d = (x.unsqueeze(2) - y.unsqueeze(1)).pow(2).sum(-1)
        d1, i1 = d.min(2)
        d2, i2 = d.min(1)
        return d1, d2, i1.int(), i2.int()

    m.forward = forward
    return m


def einops_stub() -> types.ModuleType:
    """An ``einops`` module (not installed here) with the two ``rearrange`` patterns of MaST-Pre's
    ``modules/transformer.py`` ``Attention``."""
    m = types.ModuleType("einops")

    def rearrange(t, pattern, h=None):
        if pattern == "b n (h d) -> b h n d":
            return t.view(t.shape[0], t.shape[1], h, -1).transpose(1, 2)
        if pattern == "b h n d -> b n (h d)":
            return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1)
        raise NotImplementedError(pattern)

    m.rearrange, m.repeat = rearrange, None
    return m


@contextlib.contextmanager
def cpu_get_device():
    old = torch.Tensor.get_device
    torch.Tensor.get_device = lambda self: self.device
    try:
        yield
    finally:
        torch.Tensor.get_device = old


def clip_input(seed: int = 0) -> torch.Tensor:
    """``(2, 6, 64, 3)``: uniform points in a 2-unit cube drifting between frames, the last 16
    points of each frame copies of its first 16 (the reference datasets' repeat resampling), so
    the balls hold 0 to ``K`` distinct hits, padding, duplicates and some empty balls."""
    g = torch.Generator().manual_seed(seed)
    base = 2 * torch.rand(2, 1, 48, 3, generator=g)
    drift = 0.25 * torch.randn(2, 6, 48, 3, generator=g).cumsum(1)
    x = base + drift
    return torch.cat([x, x[:, :, :16]], 2).contiguous()


def import_fresh(name: str):
    for mod in ("point_4d_convolution", "pointnet2_utils", "SHOT", "transformer", "CLR_Model", "models.CLR_Model"):
        sys.modules.pop(mod, None)
    sys.modules["pointnet2_utils"] = pointnet2_stub()
    return __import__(name)


def mast_pre_cases(checkout: Path) -> dict:
    add_reference_to_path(checkout, "modules")
    sys.modules["chamfer"] = chamfer_stub()
    if "einops" not in sys.modules:
        sys.modules["einops"] = einops_stub()
        for sub in ("einops.layers", "einops.layers.torch"):   # imported (Rearrange), never used
            sys.modules[sub] = types.ModuleType(sub)
        sys.modules["einops.layers.torch"].Rearrange = None
    p4d = import_fresh("point_4d_convolution")
    from models.CLR_Model import ContrastiveLearningModel

    clip = clip_input(0)
    cases = {}
    torch.manual_seed(0)
    conv = p4d.P4DConv(in_planes=0, mlp_planes=[DIM], mlp_batch_norm=[False], mlp_activation=[False],
                       spatial_kernel_size=[RADIUS, K], spatial_stride=STRIDE, temporal_kernel_size=3,
                       temporal_stride=2, temporal_padding=[1, 0], operator="+", spatial_pooling="max",
                       temporal_pooling="max")
    with cpu_get_device(), torch.no_grad():
        xyzs, feats, neigh, desc = conv(clip)
    cases["p4dconv"] = {"clip": clip, "weight": conv.conv_d[0].weight.view(DIM, 4), "anchors": xyzs,
                        "features": feats.permute(0, 1, 3, 2), "neighbours": neigh, "descriptors": desc,
                        "radius": RADIUS, "k": K, "spatial_stride": STRIDE}

    torch.manual_seed(1)
    model = ContrastiveLearningModel(radius=RADIUS, nsamples=K, spatial_stride=STRIDE, temporal_kernel_size=3,
                                     temporal_stride=2, en_emb_dim=32, en_depth=1, en_heads=2, en_head_dim=16,
                                     en_mlp_dim=64, de_emb_dim=32, de_depth=1, de_heads=2, de_head_dim=16,
                                     de_mlp_dim=64, mask_ratio=0.75, pretraining=True).eval()
    seen = {"points": [], "shot": [], "dist": [], "smoothl1": []}
    model.points_predictor.register_forward_hook(lambda m, i, o: seen["points"].append(o.transpose(1, 2)))
    model.shot_predictor.register_forward_hook(lambda m, i, o: seen["shot"].append(o.transpose(1, 2)))
    model.criterion_dist.register_forward_hook(lambda m, i, o: seen["dist"].append(o))
    model.criterion_shot.register_forward_hook(lambda m, i, o: seen["smoothl1"].append(o))
    np.random.seed(0)
    clip2 = clip_input(1)
    with cpu_get_device(), torch.no_grad():
        emb, mask, xyzts, neighbours, shots = model.forward_encoder(clip2)
        loss = model.forward_decoder(emb, mask, xyzts, neighbours, shots)
    b, m = clip2.shape[0], int(mask[0].sum())
    cases["mast_pre"] = {
        "clip": clip2, "tube_weight": model.tube_embedding.conv_d[0].weight.view(32, 4), "xyzts": xyzts,
        "neighbours": neighbours, "descriptors": shots, "mask": mask,
        "pred_points": seen["points"][0].reshape(b, m, 3, K, 3), "pred_card": seen["shot"][0].reshape(b, m, 2, 8),
        "points_loss": sum(seen["dist"]) / 3, "cardinality_loss": sum(seen["smoothl1"]) / 2, "loss": loss,
        "radius": RADIUS, "k": K, "spatial_stride": STRIDE}
    return cases


def p4transformer_cases(checkout: Path) -> dict:
    add_reference_to_path(checkout, "modules-pytorch-1.8.1")
    p4d = import_fresh("point_4d_convolution")
    clip = clip_input(2)
    torch.manual_seed(2)
    conv = p4d.P4DConv(in_planes=0, mlp_planes=[DIM], mlp_batch_norm=[False], mlp_activation=[False],
                       spatial_kernel_size=[RADIUS, K], spatial_stride=STRIDE, temporal_kernel_size=3,
                       temporal_stride=2, temporal_padding=[1, 0], operator="+", spatial_pooling="max",
                       temporal_pooling="max")
    with cpu_get_device(), torch.no_grad():
        xyzs, feats = conv(clip)
    return {"p4dconv": {"clip": clip, "weight": conv.conv_d[0].weight.view(DIM, 4), "anchors": xyzs,
                        "features": feats.permute(0, 1, 3, 2), "radius": RADIUS, "k": K, "spatial_stride": STRIDE}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", required=True, type=Path, help="checkout of JohnsonSign/MaST-Pre")
    ap.add_argument("--p4transformer", type=Path, help="checkout of hehefan/P4Transformer")
    args = ap.parse_args()
    save_fixture("point_video", mast_pre_cases(args.reference), reference=args.reference, repo="JohnsonSign/MaST-Pre",
                 replaced=REPLACED_PN2 + "; extensions/chamfer_dist's CUDA chamfer.forward -> a dense "
                          "pure-PyTorch nearest-neighbour forward; einops (not installed) -> the two rearrange patterns "
                          "modules/transformer.py uses (b n (h d) <-> b h n d)")
    if args.p4transformer:
        sys.path.remove(str(args.reference.resolve()))
        sys.path.remove(str((args.reference / "modules").resolve()))
        save_fixture("point_video_p4transformer", p4transformer_cases(args.p4transformer),
                     reference=args.p4transformer, repo="hehefan/P4Transformer", replaced=REPLACED_PN2)


if __name__ == "__main__":
    main()
