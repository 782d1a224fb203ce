"""Point-cloud videos: point ops vs brute force, the npz reader and clips, the skeleton renderer on a
real MSR-Action3D file, the P4Transformer tube embedding, MaST-Pre's losses, the contrastive
pretext, the family's shared pretraining run, and a whole MaST-Pre -> fine-tune run on tiny files
in the real layout. Methods are built from their config files (the one home of their defaults)."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from hydra.utils import instantiate

from configs import compose_train, run_context
from conftest import ROOT, SHARED_DATA, load_script
from lightning_dd.nets.point_ops import ball_query, chamfer_l2, farthest_point_sample, gather_points
from lightning_dd.data.point_video import (ClipDataset, PointVideoDataModule, parse_video_name, read_point_video,
                                           video_accuracy)
from lightning_dd.data.skeleton_render import BONES, fill_untracked, read_skeleton, render_video
from lightning_dd.nets.p4transformer import P4Encoder

SKELETON = SHARED_DATA / "msr_action3d" / "skeleton3D"
EXPERIMENT = {"mast_pre": "mast_pre_msr", "point_contrast": "point_contrast_msr", "msr_finetune": "msr_finetune",
              "skeleton_msr": "skeleton_msr"}
SMALL_ENCODER = dict(dim=32, depth=1, heads=4, mlp_dim=64, k=8, spatial_stride=8, radius=0.7, dropout=0.0)


def pv_method(name: str, **overrides):
    """``conf/method/<name>.yaml`` built as the runner builds it (composed under its paper-size
    experiment, which overrides no method key), with ``overrides`` merged in."""
    return instantiate(compose_train(f"experiment={EXPERIMENT[name]}").method, _convert_="all", **overrides)


# ---------------------------------------------------------------- point ops vs brute force
def _fps_ref(x, m):
    chosen, mind = [0], np.full(len(x), np.inf)
    for _ in range(m - 1):
        mind = np.minimum(mind, ((x - x[chosen[-1]]) ** 2).sum(1))
        chosen.append(int(np.argmax(mind)))
    return chosen


def _ball_ref(r, k, x, c):
    out = []
    for ci in c:
        hits = [j for j in range(len(x)) if ((x[j] - ci) ** 2).sum() < r * r][:k]
        out.append(hits + [hits[0]] * (k - len(hits)) if hits else [0] * k)
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_fps_ball_query_and_chamfer_match_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(3, 200, 3, generator=g, dtype=torch.float64)
    idx = farthest_point_sample(x, 17)
    for b in range(3):
        assert idx[b].tolist() == _fps_ref(x[b].numpy(), 17)
    centres = torch.cat([gather_points(x, idx), torch.full((3, 2, 3), 5.0, dtype=x.dtype)], 1)  # 2 with no hit
    for r, k in [(0.15, 8), (0.3, 40), (2.0, 5)]:
        got = ball_query(r, k, x, centres, chunk=7)
        for b in range(3):
            assert got[b].tolist() == _ball_ref(r, k, x[b].numpy(), centres[b].numpy()), (r, k)
    y = torch.rand(3, 50, 3, generator=g, dtype=torch.float64)
    ref = [np.mean([min(((p - q) ** 2).sum() for q in y[b].numpy()) for p in x[b].numpy()])
           + np.mean([min(((p - q) ** 2).sum() for p in x[b].numpy()) for q in y[b].numpy()]) for b in range(3)]
    assert torch.allclose(chamfer_l2(x, y, "none"), torch.tensor(ref, dtype=x.dtype))
    assert float(chamfer_l2(x, x)) == 0.0
    with pytest.raises(ValueError):
        farthest_point_sample(x, 201)


# ---------------------------------------------------------------- the npz reader and clips
def _write(folder, name, frames, as_object=True):
    folder.mkdir(parents=True, exist_ok=True)
    if as_object:
        arr = np.empty(len(frames), dtype=object)
        arr[:] = frames
    else:
        arr = np.stack(frames)
    np.savez_compressed(folder / name, point_clouds=arr)


def test_reader_reads_the_real_layout_and_names_bad_files(tmp_path):
    rng = np.random.default_rng(0)
    frames = [rng.normal(size=(n, 3)) * 300 for n in (40, 55, 31)]  # variable counts: an object array
    _write(tmp_path, "a03_s07_e02_sdepth.npz", frames)
    assert parse_video_name(tmp_path / "a03_s07_e02_sdepth.npz") == (2, 7, 2)
    with pytest.raises(ValueError, match="a03_s07_e02_sdepth.npz.*allow_pickle"):
        read_point_video(tmp_path / "a03_s07_e02_sdepth.npz")
    got = read_point_video(tmp_path / "a03_s07_e02_sdepth.npz", allow_pickle=True)
    assert [f.shape for f in got] == [(40, 3), (55, 3), (31, 3)] and np.allclose(got[1].numpy(), frames[1])
    (tmp_path / "a01_s01_e01_sdepth.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match="a01_s01_e01_sdepth.npz"):
        read_point_video(tmp_path / "a01_s01_e01_sdepth.npz")
    np.savez(tmp_path / "a01_s01_e02_sdepth.npz", points=np.zeros((2, 4, 3)))
    with pytest.raises(ValueError, match="a01_s01_e02_sdepth.npz.*point_clouds"):
        read_point_video(tmp_path / "a01_s01_e02_sdepth.npz")
    np.savez(tmp_path / "a01_s01_e03_sdepth.npz", point_clouds=np.zeros((2, 4, 2)))
    with pytest.raises(ValueError, match="a01_s01_e03_sdepth.npz.*frame 0"):
        read_point_video(tmp_path / "a01_s01_e03_sdepth.npz")
    with pytest.raises(FileNotFoundError, match="a09"):
        read_point_video(tmp_path / "a09_s01_e01_sdepth.npz")
    dm = PointVideoDataModule(format="npz", root=str(tmp_path), allow_pickle=True)
    with pytest.raises(ValueError, match="a01_s01_e01_sdepth.npz"):
        dm.setup()  # the corrupt file stops the setup, named


def test_clips_resample_scale_pad_and_score_videos(tmp_path):
    rng = np.random.default_rng(0)
    for s in (1, 6):
        _write(tmp_path, f"a02_s{s:02d}_e01_sdepth.npz", [rng.normal(size=(100, 3)) * 300 for _ in range(12)], False)
    _write(tmp_path, "a05_s02_e01_sdepth.npz", [rng.normal(size=(7, 3)) + t for t in range(3)], False)  # short, few points
    dm = PointVideoDataModule(format="npz", root=str(tmp_path), clip_len=5, frame_stride=2, num_points=16, batch_size=4)
    dm.setup()
    assert dm.train_labels.tolist() == [1, 4] and dm.test_labels.tolist() == [1]
    train = dm.clips("train")
    assert sorted(train.index) == [(0, t) for t in range(4)]  # 12 - 2*4 starts; the short video none (the reference's)
    clip, y, v = train[len(train) - 1]
    assert clip.shape == (5, 16, 3) and int(y) == 1 and v == 0
    assert dm.clips("train", train=False).index == train.index       # a split's clips, whatever the augmentation
    assert ClipDataset(dm.train_videos, dm.train_labels, 5, 2, 1, 16, train=True).index[-1] == (1, 0)  # pad_short
    # the 3-frame video: frames 0, 2, then the last frame repeated; 7 points -> each twice + 2 more
    short = dm.train_videos[1]
    test_view = ClipDataset([short], torch.tensor([4]), 5, 2, 1, 16, train=False)
    c = test_view[0][0] * 300
    for i, f in enumerate([0, 2, 2, 2, 2]):
        rows = {tuple(np.round(p, 4)) for p in c[i].numpy()}
        assert rows == {tuple(np.round(p, 4)) for p in short[f].numpy()}  # every point kept
        counts = np.unique(c[i].numpy(), axis=0, return_counts=True)[1]
        assert sorted(counts.tolist()) == [2] * 5 + [3] * 2
    # enough points: without replacement; units mm / 300; train jitter within U(0.9, 1.1) per axis
    tclip = dm.clips("test")[0][0]
    assert len(np.unique(tclip[0].numpy(), axis=0)) == 16 and torch.equal(tclip, dm.clips("test")[0][0])
    src = dm.test_videos[0][0] / 300
    assert all(any(torch.allclose(p, q) for q in src) for p in tclip[0])
    ratio = torch.stack([ClipDataset(dm.test_videos, dm.test_labels, 1, 1, 1, 100, train=True)[0][0][0].sort(0).values
                         for _ in range(20)]) / src.sort(0).values
    assert ratio.min() >= 0.9 - 1e-5 and ratio.max() <= 1.1 + 1e-5 and ratio.std() > 0.01
    scores = torch.tensor([[0.9, 0.1], [0.4, 0.6], [0.45, 0.55], [0.2, 0.8]])  # video 0: summed -> 0, votes -> 1
    assert video_accuracy(scores, torch.tensor([0, 0, 0, 1]), torch.tensor([0, 1])) == 1.0
    assert video_accuracy(scores, torch.tensor([0, 0, 0, 1]), torch.tensor([1, 0])) == 0.0


# ---------------------------------------------------------------- the renderer on a real file
def test_renderer_keeps_the_camera_facing_body_surface():
    j = read_skeleton(SKELETON / "a01_s01_e01_skeleton3D.txt")
    assert j.shape[1:] == (20, 4)
    joints = fill_untracked(j)[:6, :, :3]
    video = render_video(joints, points_per_frame=400, samples_per_frame=6000, seed=0, noise=False)
    assert video.shape == (6, 400, 3)
    a = torch.tensor(joints[:, [b[0] for b in BONES]])
    b = torch.tensor(joints[:, [b[1] for b in BONES]])
    rad = torch.tensor([x[2] for x in BONES])
    p = torch.tensor(video, dtype=torch.float64).float() / 1000.0  # mm -> m
    d = b - a
    t = ((p.unsqueeze(2) - a.unsqueeze(1)) * d.unsqueeze(1)).sum(-1) / d.pow(2).sum(-1).clamp_min(1e-12).unsqueeze(1)
    q = a.unsqueeze(1) + t.clamp(0, 1).unsqueeze(-1) * d.unsqueeze(1)
    dist = (p.unsqueeze(2) - q).norm(dim=-1)                      # (F, P, bones)
    gap = (dist - rad).abs().min(-1)
    # on the body surface (pixel-centre back-projection moves a point < 1 cm)
    assert float(gap.values.max()) < 0.015, float(gap.values.max())
    # near the joints: every point within 15 cm of a joint
    near = (p.unsqueeze(2) - torch.tensor(joints).unsqueeze(1)).norm(dim=-1).min(-1).values
    assert float(near.max()) < 0.6 and float(near.median()) < 0.15
    # camera-facing: the outward normal of the nearest capsule points back to the camera
    bone = gap.indices.unsqueeze(-1).unsqueeze(-1).expand(-1, -1, 1, 3)
    normal = p - torch.gather(q, 2, bone).squeeze(2)
    facing = (normal * p).sum(-1) / (normal.norm(dim=-1) * p.norm(dim=-1)).clamp_min(1e-9)
    assert float((facing < 0.15).float().mean()) > 0.97
    # the noisy render differs by about a centimetre in depth, not more
    noisy = render_video(joints[:1], 400, 6000, seed=0)
    assert 0.003 < np.abs(noisy[0, :, 2].mean() - video[0, :, 2].mean()) / 1000 + 0.005 < 0.03


def test_untracked_frames_take_the_nearest_tracked_skeleton():
    j = np.random.default_rng(0).normal(size=(5, 20, 3)).astype(np.float32)
    j[[0, 3]] = 0
    f = fill_untracked(j)
    assert np.array_equal(f[0], j[1]) and np.array_equal(f[3], j[2]) and fill_untracked(j * 0) is None


# ---------------------------------------------------------------- the tube embedding and MaST-Pre
_SMALL_MAST_PRE = dict(encoder=SMALL_ENCODER, decoder_dim=32, decoder_depth=1, decoder_heads=4)


def test_linear_probe_is_paired_across_encoders_and_averages_its_repeats():
    """Two encoders probed with one seed see the same augmented training clips (a paired gain);
    each repeat draws new clips; the reported accuracy is the mean of the repeats."""
    from lightning_dd.methods.point_video.common import linear_probe

    g = torch.Generator().manual_seed(0)
    vids = [[torch.randn(48, 3, generator=g) * (1 + c) for _ in range(6)] for c in (0, 1, 2, 0, 1, 2)]
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    train = ClipDataset(vids, labels, 4, 1, 2, 32, train=True)
    test = ClipDataset(vids[:3], labels[:3], 4, 1, 2, 32, train=False)

    def recording(seed):
        torch.manual_seed(seed)
        enc = P4Encoder(dim=16, depth=1, heads=2, mlp_dim=32, radius=0.8, k=8, spatial_stride=8)
        seen, tokens = [], enc.tokens
        enc.tokens = lambda clip, **kw: (seen.append(clip.clone()), tokens(clip, **kw))[1]
        return enc, seen

    cfg = pv_method("mast_pre", probe=dict(steps=20, repeats=2)).probe
    (a, seen_a), (b, seen_b) = recording(0), recording(1)
    ra, rb = (linear_probe(e, train, test, labels[:3], 3, cfg, seed=5) for e in (a, b))
    assert len(seen_a) == 3  # one batch each: the test clips, then the training clips of each repeat
    assert all(torch.equal(x, y) for x, y in zip(seen_a, seen_b))
    assert not torch.equal(seen_a[1], seen_a[2])  # each repeat draws new training clips
    one = [linear_probe(a, train, test, labels[:3], 3, cfg.model_copy(update={"repeats": 1}), seed=s) for s in (5, 6)]
    assert ra["video_acc"] == pytest.approx(sum(r["video_acc"] for r in one) / 2)
    assert ra["video_acc_std"] == pytest.approx(float(torch.tensor([r["video_acc"] for r in one],
                                                                   dtype=torch.float64).std()))
    assert rb != ra  # another encoder, another result on the same clips


def test_tube_embedding_shapes_and_translation_invariance():
    enc = P4Encoder(dim=32, depth=1, heads=4, mlp_dim=64, radius=0.5, k=8, spatial_stride=8)
    x = torch.randn(2, 6, 64, 3)
    xyzt, f, neigh, index = enc.tokens(x, return_neighbours=True)
    assert xyzt.shape == (2, 3 * 8, 4) and f.shape == (2, 24, 32) and neigh.shape == (2, 24, 3, 8, 3)
    assert index.shape == (2, 24, 3, 8) and index.dtype == torch.long
    assert xyzt[0, :, 3].tolist() == [1.0] * 8 + [2.0] * 8 + [3.0] * 8
    shift = torch.tensor([3.0, -1.0, 2.0])
    _, f2, neigh2, index2 = enc.tokens(x + shift, return_neighbours=True)
    assert torch.allclose(f, f2, atol=1e-4)  # features see displacements only
    assert torch.equal(index, index2) and torch.allclose(neigh2, neigh + shift, atol=1e-5)  # absolute coordinates
    disp = neigh - xyzt[:, :, None, None, :3]
    assert (disp[:, :, 1].norm(dim=-1) < 0.5 + 1e-5).all()  # the anchor's own frame always has hits


def test_max_of_linear_equals_autograd_of_linear_then_amax():
    """The tube embedding's max over neighbours: value and gradients equal ``(x @ w.T).amax(1)``'s,
    with neighbour slots repeating the first hit (the ball query's padding) as ties."""
    from lightning_dd.nets.p4transformer import P4DConv, max_of_linear

    torch.manual_seed(0)
    x = torch.randn(40, 8, 3, dtype=torch.float64)
    x[:, 5:] = x[:, :1]
    x.requires_grad_(True)
    w = torch.randn(16, 3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(40, 16, dtype=torch.float64)
    ours = max_of_linear(x, w)
    ref = (x @ w.t()).amax(1)
    assert torch.equal(ours, ref)
    gx, gw = torch.autograd.grad((ours * g).sum(), (x, w))
    rx, rw = torch.autograd.grad((ref * g).sum(), (x, w))
    assert torch.allclose(gw, rw, atol=1e-12)
    assert torch.allclose(gx.sum(1), rx.sum(1), atol=1e-12)  # tied slots share the gradient differently
    assert torch.allclose(gx[:, 1:5], rx[:, 1:5], atol=1e-12)
    # the whole P4DConv against its plain form: bias-free linear map of (dx, dy, dz, dt), then amax
    conv = P4DConv(dim=16, radius=0.8, k=8, spatial_stride=8).double()
    clip = torch.randn(2, 6, 64, 3, dtype=torch.float64)
    anchors, feats, neigh, _ = conv(clip, return_neighbours=True)
    disp = neigh - anchors[:, :, :, None, None]
    dt = torch.arange(-1, 2, dtype=torch.float64).view(1, 1, 1, 3, 1, 1).expand(*neigh.shape[:-1], 1)
    plain = conv.conv_d(torch.cat([disp, dt], -1)).amax(4).amax(3)
    assert torch.allclose(feats, plain, atol=1e-12)


def test_mast_pre_losses_fall_on_a_fixed_batch():
    """The cardinality targets (the reference's descriptor, and the CPU preset's ``fraction``
    shares) on a hand-made ball, then 25 Adam steps lower both losses on a fixed batch, with
    either target (``absolute``, the reference's, and ``displacement``). The reference's own
    values are pinned in tests/parity/test_parity_point_video.py."""
    from lightning_dd.methods.point_video.mast_pre import (MaSTPreModule, cardinality_descriptor, random_mask,
                                                           soft_cardinality)

    above = [[0.1 + 0.01 * i, 0.3, 0.05] for i in range(4)]      # z > 0, near the equator: interpolated
    below = [[-0.1 - 0.01 * i, -0.3, -0.05] for i in range(2)]
    disp = torch.tensor([above + below + [above[0]] * 2])       # 6 distinct hits, 2 padding slots
    index = torch.tensor([[3, 4, 5, 6, 7, 8, 3, 3]])
    desc = cardinality_descriptor(disp, index)
    assert 6 * 1.5 <= float(desc.sum()) <= 6 * 2                # 1.5..2 per neighbour (the reference's ~11.5-11.9)
    assert float(desc.sum()) == pytest.approx(float(cardinality_descriptor(disp[:, :6], index[:, :6]).sum()))
    assert desc.argmax() == 5                                   # +x +y, z > 0: sector 2, front half
    assert cardinality_descriptor(disp, torch.zeros_like(index)).sum() == 0  # empty ball: all indices 0
    shares = soft_cardinality(disp, radius=0.7)
    assert torch.allclose(shares.sum(-1), torch.ones(1))        # cardinality=fraction: every one of the k slots
    vis, msk = random_mask(3, 10, 0.75)                         # int(0.75 * 10) = 7 masked per sample
    assert vis.shape == (3, 3) and msk.shape == (3, 7)
    assert torch.equal(torch.cat([vis, msk], 1).sort(1).values, torch.arange(10).expand(3, 10))
    torch.manual_seed(0)
    hp = pv_method("mast_pre", **_SMALL_MAST_PRE)
    m = hp.pretext(hp.encoder.build(), 10)
    x = torch.randn(4, 6, 64, 3)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    first = None
    for _ in range(25):
        out = m.losses(x)
        first = first or {k: v.item() for k, v in out.items()}
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert float(out["loss"]) < 0.7 * first["loss"] and float(out["points"]) < first["points"]
    torch.manual_seed(0)
    m = MaSTPreModule(hp.encoder.build(), hp.model_copy(update={"target": "displacement"}), 10)
    xyzt, _, neigh, index = m.encoder.tokens(x, return_neighbours=True)
    assert torch.allclose(m.targets(neigh, index, xyzt)[0], neigh - xyzt[:, :, None, None, :3])


def test_encoder_dependence_variants_train_and_see_what_they_say():
    """experiments/point_video/encoder_dependence.py (the MaST-Pre diagnostic): ``frozen`` trains
    everything but the encoder; ``positions`` also leaves ``decoder_embed`` at zero, so its losses
    do not change when the encoder's weights do (the frozen variant's do: the check can fail)."""
    ed = load_script("experiments/point_video/encoder_dependence.py")
    x = torch.randn(4, 6, 64, 3)
    for cls, feeds_points in ((ed.FrozenEncoderMaSTPre, True), (ed.PositionsOnlyMaSTPre, False)):
        torch.manual_seed(0)
        hp = cls(**pv_method("mast_pre", **_SMALL_MAST_PRE).model_dump())
        m = hp.pretext(hp.encoder.build(), 10)
        before = {n: p.detach().clone() for n, p in m.named_parameters()}
        opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(3):
            opt.zero_grad()
            m.losses(x)["loss"].backward()
            opt.step()
        changed = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
        assert changed and not any(n.startswith("encoder.") for n in changed), changed
        assert ("decoder_embed.weight" in changed) == feeds_points
        losses = []
        for scale in (0.0, 1.0):
            with torch.no_grad():
                for p in m.encoder.parameters():
                    p.add_(scale * torch.randn_like(p))
            torch.manual_seed(1)                                   # the same masks
            with torch.no_grad():
                losses.append(float(m.losses(x)["loss"]))
        assert (abs(losses[0] - losses[1]) > 1e-4) == feeds_points, (cls.__name__, losses)


def test_pretraining_run_trains_its_pretext_and_saves_and_probes_that_encoder(tmp_path):
    """The family's shared pretraining run fits the module the method's ``pretext`` names (here
    one whose encoder stays frozen), returns that module's encoder, which ``save`` writes to
    ``encoder.pt`` as it was built and ``evaluate`` probes against a random encoder."""
    from lightning_dd.methods.point_video.mast_pre import MaSTPre, MaSTPreModule

    built = []

    class Recording(MaSTPreModule):
        def __init__(self, *args):
            super().__init__(*args)
            self.encoder.requires_grad_(False)
            built.append((self, {n: p.detach().clone() for n, p in self.named_parameters()}))

    class RecordingMaSTPre(MaSTPre):
        def pretext(self, encoder, steps):
            return Recording(encoder, self, steps)

    rng = np.random.default_rng(0)
    for a, s in ((1, 1), (2, 1), (1, 6), (2, 6)):
        _write(tmp_path / "npz", f"a{a:02d}_s{s:02d}_e01_sdepth.npz", [rng.normal(size=(80, 3)) * 300] * 8, False)
    dm = PointVideoDataModule(format="npz", root=str(tmp_path / "npz"), num_classes=2, clip_len=6, frame_stride=1,
                              num_points=64, batch_size=2)
    dm.setup()
    hp = RecordingMaSTPre(**pv_method("mast_pre", **_SMALL_MAST_PRE, epochs=2, probe=dict(steps=5, repeats=1)).model_dump())
    assert isinstance(dm, hp.data_protocol)
    ctx = run_context(dm=dm, out_dir=tmp_path / "run")
    out = hp.run(ctx)
    (module, init), = built
    assert out.result is module.encoder and set(out.metrics) >= {"pretrain/loss_epoch", "pretrain/points_epoch"}
    changed = {n for n, p in module.named_parameters() if not torch.equal(p, init[n])}
    assert changed and not any(n.startswith("encoder.") for n in changed), changed
    hp.save(ctx, out)
    saved = torch.load(ctx.out_dir / "encoder.pt", weights_only=True)
    assert {f"encoder.{k}" for k in saved["encoder"]} == {n for n in init if n.startswith("encoder.")}
    assert all(torch.equal(v, init[f"encoder.{k}"]) for k, v in saved["encoder"].items())
    assert saved["final_losses"] == out.metrics and saved["encoder_config"] == hp.encoder.model_dump()
    res = hp.evaluate(ctx, out)
    assert 0 <= res["eval/linear_probe/video_acc"] <= 1 and "eval/linear_probe_random/video_acc" in res


@pytest.mark.slow
def test_mast_pre_then_finetune_runs_on_tiny_npz_files(tmp_path):
    """`train.py experiment=mast_pre_msr scale=cpu` on a tiny folder in the real layout, then
    `experiment=msr_finetune method.pretrained=<encoder.pt>` (weights_only load)."""
    rng = np.random.default_rng(0)
    data = tmp_path / "npz"
    for a in (1, 2):
        for s in (1, 2, 6, 7):
            centre = np.array([0.0, 0.0, 2700.0]) + (200.0 if a == 2 else 0.0)
            _write(data, f"a{a:02d}_s{s:02d}_e01_sdepth.npz",
                   [centre + rng.normal(size=(300, 3)) * (300 + 100 * a) for _ in range(18)], False)
    common = ["scale=cpu", "data.format=npz", f"data.root={data}", "data.num_classes=2", "logger.wandb.enabled=false",
              "trainer.enable_progress_bar=false", "data.clip_step=2", "data.test_clip_step=2"]
    env = {"LDD_CACHE_DIR": str(tmp_path / "cache"), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    import os

    def train(*args):
        p = subprocess.run([sys.executable, "train.py", *common, *args], cwd=ROOT, env={**os.environ, **env},
                           capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    train("experiment=mast_pre_msr", "method.epochs=2", f"hydra.run.dir={tmp_path / 'pre'}")
    m = json.loads((tmp_path / "pre" / "metrics.json").read_text())
    assert 0 <= m["eval/linear_probe/video_acc"] <= 1 and "eval/linear_probe_random/video_acc" in m
    enc = tmp_path / "pre" / "encoder.pt"
    assert set(torch.load(enc, weights_only=True)) >= {"encoder", "encoder_config"}
    train("experiment=msr_finetune", f"method.pretrained={enc}", "method.epochs=1", f"hydra.run.dir={tmp_path / 'ft'}")
    m = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    assert 0 <= m["eval/video_acc"] <= 1 and m["train/labelled_videos"] == 4


def test_point_contrast_matches_tokens_and_its_losses_fall():
    from lightning_dd.methods.point_video.point_contrast import PointContrastModule, kmeans, match_tokens

    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(2, 10, 3, generator=g), torch.arange(1.0, 3.0).repeat_interleave(5).view(1, 10, 1).expand(2, 10, 1)], -1)
    perm = torch.randperm(10, generator=g)
    scaled = x[:, perm] * torch.tensor([1.1, 0.9, 1.05, 1.0])  # view 2: shuffled, scaled per axis
    assert torch.equal(perm[match_tokens(x, scaled)], torch.arange(10).expand(2, 10))
    blobs = torch.cat([torch.randn(2, 6, 2, generator=g) * 0.01, torch.randn(2, 6, 2, generator=g) * 0.01 + 5], 1)
    ids = kmeans(blobs, 2, 3)
    assert (ids[:, :6] == ids[:, :1]).all() and (ids[:, 6:] != ids[:, :1]).all()
    torch.manual_seed(0)
    hp = pv_method("point_contrast", encoder=SMALL_ENCODER, proj_dim=16, superpoints=4)
    m = hp.pretext(hp.encoder.build(), 10)
    assert isinstance(m, PointContrastModule)
    clip = torch.randn(4, 1, 6, 64, 3)
    views = torch.cat([clip, clip * torch.tensor([1.05, 0.95, 1.0])], 1)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    first = None
    for _ in range(15):
        out = m.losses(views)
        first = first or out["loss"].item()
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert out["loss"].item() < 0.6 * first


def test_rigid_view_augmentation_is_undone_for_the_correspondence(monkeypatch):
    """A rotation about the vertical axis and a shift per clip: distances and motion kept, the
    vertical coordinate only shifted; the anchors of the augmented clip, brought back, are the
    original clip's anchors (so the views' tokens still match), which they are not before."""
    from lightning_dd.augment.point_cloud import undo_rigid, vertical_rigid
    from lightning_dd.methods.point_video.point_contrast import match_tokens

    torch.manual_seed(0)
    clip = torch.randn(3, 6, 64, 3)
    aug, rot, off = vertical_rigid(clip, 90.0, 2.0)
    def dist(x):
        return torch.cdist(x.flatten(1, 2), x.flatten(1, 2), compute_mode="donot_use_mm_for_euclid_dist")

    assert torch.allclose(dist(aug), dist(clip), atol=1e-4)
    dy = aug[..., 1] - clip[..., 1]
    assert torch.allclose(dy, dy[:, :1, :1].expand_as(dy), atol=1e-5) and not torch.allclose(aug, clip, atol=0.1)
    assert torch.allclose(undo_rigid(aug, rot, off), clip, atol=1e-5)
    enc = P4Encoder(dim=16, depth=1, heads=2, mlp_dim=32, radius=0.8, k=8, spatial_stride=8)
    xo, xa = enc.tokens(clip)[0], enc.tokens(aug)[0]
    back = torch.cat([undo_rigid(xa[..., :3], rot, off), xa[..., 3:]], -1)
    assert torch.allclose(back, xo, atol=1e-4)
    ident = torch.arange(xo.shape[1]).expand(3, -1)
    assert torch.equal(match_tokens(xo, back), ident) and not torch.equal(match_tokens(xo, xa), ident)
    hp = pv_method("point_contrast", encoder=SMALL_ENCODER, proj_dim=16, superpoints=4, rotation=30.0,
                   translation=0.5)
    m = hp.pretext(hp.encoder.build(), 10)
    views = torch.randn(4, 1, 6, 64, 3).expand(4, 2, 6, 64, 3)  # the same points, rotated and shifted apart
    import lightning_dd.methods.point_video.point_contrast as pc

    matches = []
    monkeypatch.setattr(pc, "match_tokens", lambda a, b: matches.append(match_tokens(a, b)) or matches[-1])
    m.losses(views)
    assert torch.equal(matches[0], torch.arange(matches[0].shape[1]).expand(4, -1))
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        out = m.losses(views)
        losses.append(out["loss"].item())
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert losses[-1] < 0.7 * losses[0]


def test_paper_and_cpu_sizes_of_the_point_video_experiments():
    from hydra import compose, initialize_config_dir

    from lightning_dd.nets.p4transformer import P4DConv

    for exp in ("mast_pre_msr", "msr_finetune", "point_contrast_msr"):
        with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
            paper = compose("train", overrides=[f"experiment={exp}"])
            cpu = compose("train", overrides=[f"experiment={exp}", "scale=cpu"])
        e = paper.method.encoder
        assert (paper.data.clip_len, paper.data.num_points, e.radius, e.dim, e.depth) == (24, 2048, 0.7, 1024, 5)
        assert (cpu.data.clip_len, cpu.data.num_points, cpu.method.encoder.dim, cpu.method.encoder.depth) == (16, 256, 128, 4)
        tube = P4DConv(8, 0.7, 4, cpu.method.encoder.spatial_stride, cpu.method.encoder.tk, cpu.method.encoder.ts)
        assert len(tube.anchor_frames(cpu.data.clip_len)) * cpu.data.num_points // cpu.method.encoder.spatial_stride == 128
    assert paper.data.train_subjects == [1, 2, 3, 4, 5]
    # the contrast's CPU preset rotates and shifts its views; the paper-size config does not (as the paper)
    assert (cpu.method.rotation, cpu.method.translation) == (30.0, 1.0)
    assert (paper.method.rotation, paper.method.translation) == (0.0, 0.0)
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        mast = compose("train", overrides=["experiment=mast_pre_msr"]).method
    assert (mast.mask_ratio, mast.decoder_dim, mast.decoder_depth, mast.epochs) == (0.75, 512, 4, 200)


def test_each_stage_trains_with_the_optimizer_and_schedule_of_its_config():
    """``method.optimizer`` / ``method.scheduler`` (Hydra partials) give each stage its AdamW and
    per-step warmup-cosine: MaST-Pre decays only its weight matrices (the optimizer's own weight
    decay), the others every parameter; the probe's optimizer is full-batch Adam."""
    import torch.nn as nn

    from lightning_dd.methods.point_video.finetune import ClassifierModule
    from lightning_dd.methods.point_video.skeleton import SkeletonModule, SkeletonNet
    from lightning_dd.nets.p4transformer import P4Classifier
    from lightning_dd.training.schedules import warmup_cosine_factor

    enc = dict(encoder=SMALL_ENCODER)
    mast = pv_method("mast_pre", **enc, decoder_dim=32, decoder_heads=4, decoder_depth=1)
    ft = pv_method("msr_finetune", **enc)
    skel = pv_method("skeleton_msr")
    modules = {"mast_pre": (mast.pretext(mast.encoder.build(), 40), 0.001, 0.05, mast.warmup_steps(40)),
               "point_contrast": (pv_method("point_contrast", **enc).pretext(P4Encoder(**SMALL_ENCODER), 40), 0.001, 0.05, 2),
               "msr_finetune": (ClassifierModule(P4Classifier(ft.encoder.build(), 5, 16, 0.5), ft.optimizer, ft.scheduler,
                                                 40, 3, 0.1), 0.0005, 0.05, 3),
               "skeleton_msr": (SkeletonModule(SkeletonNet(5, 8, 0.3), skel, 40), 0.003, 0.01, 2)}
    for name, (module, lr, wd, warmup) in modules.items():
        conf = module.configure_optimizers()
        opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
        assert type(opt) is torch.optim.AdamW and conf["lr_scheduler"]["interval"] == "step", name
        groups = [(g["initial_lr"], g["weight_decay"], len(g["params"])) for g in opt.param_groups]
        if name == "mast_pre":
            decay = [p for n, p in module.named_parameters() if p.ndim > 1 and "token" not in n]
            assert groups == [(lr, wd, len(decay)), (lr, 0.0, len(list(module.parameters())) - len(decay))]
        else:
            assert groups == [(lr, wd, len(list(module.parameters())))], name
        rates = []
        for _ in range(40):
            rates.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        assert rates == [lr * warmup_cosine_factor(s, 40, warmup) for s in range(40)], name
    probe = mast.probe.optimizer(nn.Linear(3, 2).parameters())
    assert type(probe) is torch.optim.Adam and (probe.defaults["lr"], probe.defaults["weight_decay"]) == (0.01, 0.0001)


@pytest.mark.parametrize("experiment,override,key", [
    ("skeleton_msr", "method.optimizer.lr=-1", "method.optimizer"),
    ("mast_pre_msr", "method.optimizer.lr=-1", "method.optimizer"),
    ("msr_finetune", "method.probe.optimizer.lr=-1", "method.probe.optimizer"),
    ("point_contrast_msr", "+method.scheduler.gamma=0.5", "method.scheduler"),
])
def test_an_optimizer_or_schedule_that_does_not_build_fails_at_check_time_naming_its_key(experiment, override, key):
    from lightning_dd.core.config import ConfigError
    from lightning_dd.runner import check_config

    with pytest.raises(ConfigError, match=rf"{key}: Value error, does not build"):
        check_config(compose_train(f"experiment={experiment}", override))


def test_mast_pre_paper_config_trains_as_long_as_the_reference():
    """The composed ``experiment=mast_pre_msr`` pretrains exactly as long as the reference's loop
    (``0-pretraining-dp.py``: ``DataLoader(batch_size=128, drop_last=True)``, one AdamW step per
    batch, 200 epochs) over P4Transformer's MSR-Action3D clips (``datasets/msr.py``: a clip at
    every start ``t in range(0, T - (24 - 1))`` of each training video, subjects 1-5): 4478 clips,
    34 steps per epoch, 6800 optimizer steps, 870,400 clips seen. Ours: the DataModule's training
    loader (whose length the pretraining run multiplies by ``epochs`` for the schedule and the
    Trainer's ``max_epochs``) on videos of the real frame counts (the skeleton files: 20 lines a frame)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=mast_pre_msr"])
    files = sorted(SKELETON.glob("a*_s*_e*_skeleton3D.txt"))
    frames = {f.name: sum(1 for _ in open(f)) // 20 for f in files}
    train = [n for n, f in zip(frames.values(), files) if parse_video_name(f)[1] in cfg.data.train_subjects]
    assert len(train) == 270
    ref_clips = sum(len(range(0, t - 1 * (24 - 1))) for t in train)              # the reference's index map
    ref_steps = 200 * (ref_clips // 128)                                           # drop_last
    assert (ref_clips, ref_steps, ref_steps * 128) == (4478, 6800, 870_400)
    dm = instantiate(cfg.data, load_videos=False)
    dm.train_videos, dm.train_labels = [[None] * t for t in train], torch.zeros(len(train), dtype=torch.long)
    hp = instantiate(cfg.method, _convert_="all")
    loader = dm.loader(hp.train_clips(dm), shuffle=True, drop_last=True)   # as the pretraining run builds it
    assert len(loader.dataset) == ref_clips and loader.batch_size == 128 and loader.drop_last
    assert hp.epochs * len(loader) == ref_steps and hp.epochs * len(loader) * loader.batch_size == 870_400


def test_an_encoder_saved_with_a_tube_bias_loads_as_the_same_function(tmp_path):
    """Encoders saved before P4DConv became bias-free (the reference's ``bias=False``) load through
    ``load_encoder`` with that bias moved into the position embedding's: the same outputs."""
    from lightning_dd.methods.point_video.common import load_encoder

    torch.manual_seed(0)
    cfg = pv_method("msr_finetune", encoder=dict(dim=16, depth=1, heads=2, mlp_dim=32, k=8, spatial_stride=8)).encoder
    enc = cfg.build().eval()
    bias = torch.randn(16)
    x = torch.randn(2, 6, 64, 3)
    with torch.no_grad():
        xyzt, f = enc.tokens(x)
        before = enc.encode(f + bias, xyzt)                     # the old embedding: features + its bias
    torch.save({"encoder": {**enc.state_dict(), "tube.conv_d.bias": bias}, "encoder_config": cfg.model_dump(),
                "method": "mast_pre"}, tmp_path / "encoder.pt")
    loaded = load_encoder(tmp_path / "encoder.pt")[0].eval()
    with torch.no_grad():
        xyzt2, f2 = loaded.tokens(x)
        assert torch.allclose(loaded.encode(f2, xyzt2), before, atol=1e-5)
