"""Statistics matching (SRe2L / CDA / G-VBSM): BN hooks, convolution statistics, the crop pipeline,
the CDA curriculum, resumable recovery, multi-backbone sampling, the typed config, and the method
end to end through the runner's typed RunContext."""
import dataclasses
import json
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf

from configs import compose_train, method, node
from lightning_dd.augment.crops import crop_resize, sample_crops
from lightning_dd.core.config import ConfigError, instantiate_node
from lightning_dd.core.trainer import TrainerFactory
from lightning_dd.methods.images.statistics_matching import (Backbone, RecoverConfig, RecoverModule, StatisticsMatching,
                                                             StatsHooks, TeacherConfig, backbone_weights,
                                                             batch_crop_flip, bn_loss_of, bn_loss_views, channel_stats,
                                                             conv_statistics, crop_scale_min, jitter_crop_flip,
                                                             recover_batch)
from lightning_dd.nets import build_net
from lightning_dd.runner import check_config
from lightning_dd.training.devices import run_device


def _teacher(width=8, size=16, classes=4, seed=0) -> nn.Module:
    """A small BN ConvNet with non-trivial running statistics (a few train-mode forwards)."""
    torch.manual_seed(seed)
    net = build_net("ConvNet", 3, classes, (size, size), width=width, depth=2, norm="batchnorm")
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.rand(32, 3, size, size) * 2 + 0.5)
    return net.eval()


SRE2L = node("method", "sre2l")  # the one home of the defaults of TeacherConfig / RecoverConfig
HP = {**SRE2L["recover"], "iterations": 10, "lr": 0.1, "r_bn": 1.0, "first_bn_multiplier": 10.0, "jitter": 2, "flip": True,
      "crop_scale": [0.08, 1.0], "crop_schedule": "none", "milestone": 1.0, "backbones_per_iter": 1,
      "r_conv": 0.0, "r_logit": 0.0, "ckpt_every": 5}


def rc(**kw) -> RecoverConfig:
    """The test recovery settings :data:`HP` with ``kw`` changed."""
    return RecoverConfig(**{**HP, **kw})


LO, HI = torch.full((3,), -3.0), torch.full((3,), 3.0)
CPU = TrainerFactory(accelerator="cpu", enable_progress_bar=False)


def checked(cfg):
    """:func:`check_config` of a config composed outside a Hydra run (``logger.wandb``, whose group
    names the run's ``${hydra:...}`` choices, dropped): ``(run_cfg, method, ctx)``."""
    from omegaconf import open_dict

    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.logger.pop("wandb", None)
    return check_config(cfg)


class Recording:
    """The Trainer factory ``factory``, recording every ``(stage, Trainer)`` it builds in ``built``."""

    def __init__(self, factory: TrainerFactory):
        self.factory, self.built = factory, []

    def __getattr__(self, key):
        return getattr(self.factory, key)

    def __call__(self, stage: str, **kwargs):
        trainer = self.factory(stage, **kwargs)
        self.built.append((stage, trainer))
        return trainer


def test_bn_hooks_collect_the_statistics_of_each_bn_input():
    net = _teacher()
    x = torch.randn(6, 3, 16, 16)
    with StatsHooks(net, "bn") as hooks:
        net(x)
        # direct computation: run the feature stack by hand, take each BatchNorm's input
        h, expected = x, []
        for m in net.features:
            if isinstance(m, nn.BatchNorm2d):
                expected.append((h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=False)))
            h = m(h)
        assert len(hooks.stats) == len(expected) == 2
        for (m, v), (em, ev) in zip(hooks.stats, expected):
            assert torch.allclose(m, em, atol=1e-5) and torch.allclose(v, ev, atol=1e-5)
        bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
        manual = sum(w * (torch.norm(em - b.running_mean) + torch.norm(ev - b.running_var))
                     for w, (em, ev), b in zip((10.0, 1.0), expected, bns))
        assert torch.allclose(hooks.loss(first_multiplier=10.0), manual, atol=1e-4)
    assert not hooks._handles  # removed on exit


def test_conv_statistics_average_the_batches_weighted_by_their_size():
    """G-VBSM's real-data statistics: per conv input the channel and patch statistics of each batch,
    averaged with weights |b| / N (one batch: the statistics of all the images)."""
    net = _teacher()
    x = torch.randn(50, 3, 16, 16)
    got = conv_statistics(net, x, batch_size=7)
    with StatsHooks(net, "conv") as hooks, torch.no_grad():
        net(x)
        whole = [tuple(t.clone() for t in st) for st in hooks.stats]
        per_batch = []
        for part in x.split(7):
            net(part)
            per_batch.append([[t * len(part) / 50 for t in st] for st in hooks.stats])
    for ours, all_images in zip(conv_statistics(net, x, batch_size=64), whole):
        assert len(ours) == 4 and all(torch.allclose(a, b, atol=1e-4) for a, b in zip(ours, all_images))
    for i, ours in enumerate(got):
        expected = [sum(pb[i][k] for pb in per_batch) for k in range(4)]
        assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(ours, expected))
    assert not torch.allclose(got[1][1], whole[1][1], atol=1e-4)  # a mean of batch variances, not the variance
    with pytest.raises(ValueError, match="BatchNorm"):
        StatsHooks(build_net("ConvNet", 3, 4, (16, 16), width=8, depth=2), "bn")


def test_crops_lie_inside_the_image_and_follow_the_scale():
    g = torch.Generator().manual_seed(0)
    b = sample_crops(2000, 32, 32, (0.5, 0.6), g)
    assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= 31).all() and (b[:, 3] <= 31).all()
    area = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1) / 1024
    assert 0.45 < float(area.min()) and float(area.max()) < 0.66  # rounding of w, h
    x = torch.rand(3, 3, 32, 32)
    full = torch.tensor([[0.0, 0.0, 31.0, 31.0]] * 3)
    assert torch.allclose(crop_resize(x, full), x, atol=1e-5)
    assert torch.allclose(crop_resize(x, full, torch.tensor([True, False, True]))[0], x[0].flip(-1), atol=1e-5)
    with pytest.raises(ValueError, match="crop scale"):
        sample_crops(1, 8, 8, (0.0, 1.0), g)


def test_crop_resize_matches_kornias_crop_and_resize():
    kornia = pytest.importorskip("kornia")
    x = torch.rand(4, 3, 20, 20)
    boxes = sample_crops(4, 20, 20, (0.2, 0.9), torch.Generator().manual_seed(1))
    x0, y0, x1, y1 = boxes.unbind(1)
    corners = torch.stack([torch.stack([x0, y0], 1), torch.stack([x1, y0], 1), torch.stack([x1, y1], 1),
                           torch.stack([x0, y1], 1)], 1)
    ref = kornia.geometry.transform.crop_and_resize(x, corners, (20, 20), mode="bilinear", align_corners=True)
    assert torch.allclose(crop_resize(x, boxes), ref, atol=1e-5)


def test_jitter_crop_flip_draws_in_the_documented_order():
    """Crop (per image: boxes, then flips only when flip or draw_unused_flips; per batch: one seed
    for torchvision's transforms), then the roll offsets ``U{0..jitter}``: the pipeline recovery and
    the BN views share, reproduced by hand from the same seed."""
    x = torch.rand(5, 3, 16, 16, requires_grad=True)
    for flip, draw in ((True, False), (False, False), (False, True)):
        view = jitter_crop_flip(x, torch.Generator().manual_seed(7), jitter=3, scale=(0.3, 1.0), flip=flip,
                                per_image=True, draw_unused_flips=draw)
        g = torch.Generator().manual_seed(7)
        boxes = sample_crops(5, 16, 16, (0.3, 1.0), g)
        flips = torch.rand(5, generator=g) < 0.5 if flip or draw else None
        oh, ow = torch.randint(0, 4, (2,), generator=g).tolist()
        expected = torch.roll(crop_resize(x, boxes, flips if flip else None), (oh, ow), (2, 3))
        assert torch.equal(view, expected)
        # what is left in the stream: the flips were consumed exactly when documented
        g2 = torch.Generator().manual_seed(7)
        jitter_crop_flip(x, g2, jitter=3, scale=(0.3, 1.0), flip=flip, per_image=True, draw_unused_flips=draw)
        assert torch.equal(torch.rand(3, generator=g2), torch.rand(3, generator=g))
    for pad in (0, 2):  # per batch (the reference's): one seed, then the offsets
        view = jitter_crop_flip(x, torch.Generator().manual_seed(7), jitter=3, scale=(0.3, 1.0), flip=True, pad=pad)
        g = torch.Generator().manual_seed(7)
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=g))
        oh, ow = torch.randint(0, 4, (2,), generator=g).tolist()
        expected = torch.roll(batch_crop_flip(x, seed, scale=(0.3, 1.0), flip=True, pad=pad), (oh, ow), (2, 3))
        assert torch.equal(view, expected)
    assert torch.equal(jitter_crop_flip(x, torch.Generator(), jitter=0, scale=(1.0, 1.0), flip=False), x)
    view.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # differentiable in the images


def test_batch_crop_flip_crops_every_image_alike_and_leaves_the_global_rng():
    """One box and one flip for the whole batch (SRe2L/CDA apply torchvision's transforms to the
    batch tensor); the caller's global RNG state is unchanged."""
    x = torch.rand(1, 3, 16, 16).expand(4, 3, 16, 16).contiguous()
    state = torch.get_rng_state()
    view = batch_crop_flip(x, 3, scale=(0.1, 0.3), flip=True)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(view[0], v) for v in view[1:]) and not torch.allclose(view[0], x[0])
    padded = batch_crop_flip(x, 5, scale=(1.0, 1.0), flip=False, pad=4)
    assert padded.shape == x.shape and all(torch.equal(padded[0], v) for v in padded[1:])


@pytest.mark.parametrize("schedule", ["cosine", "linear", "step"])
@pytest.mark.parametrize("milestone", [1.0, 0.5, 0.33])
def test_cda_schedule_follows_cdas_code(schedule, milestone):
    import math

    iters = 40
    m = milestone * iters
    s = [crop_scale_min(i, iters, schedule, 1.0, 0.08, milestone) for i in range(iters)]

    def cda(i):  # CDA's recover_cda_in1k.py: progress i / (milestone * iterations) while below it
        if i >= m:
            return 0.08
        return {"step": 1.0, "linear": 0.08 + 0.92 * (1 - i / m),
                "cosine": 0.08 + 0.92 * (1 + math.cos(math.pi * i / m)) / 2}[schedule]

    assert s == pytest.approx([cda(i) for i in range(iters)])
    assert s[0] == pytest.approx(1.0)
    first_end = math.ceil(m)  # the first iteration at or past the milestone
    assert all(v == 0.08 for v in s[first_end:]) and s[first_end - 1] > 0.08
    if schedule == "step":
        assert all(v == 1.0 for v in s[:first_end])  # whole images until the milestone
    assert all(a >= b - 1e-12 for a, b in zip(s, s[1:]))  # easy -> hard: never increases
    assert crop_scale_min(5, iters, "none") == 0.08  # SRe2L: no curriculum
    with pytest.raises(KeyError):
        crop_scale_min(0, iters, "exp")
    with pytest.raises(KeyError):
        crop_scale_min(39, iters, "exp")  # also past the milestone


class _Crash(Exception):
    pass


class _CrashAt(L.Callback):
    """Raises after ``step`` optimizer steps: an interrupted run."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= self.step:
            raise _Crash()


def test_recover_resumes_after_an_interruption(tmp_path):
    teacher = _teacher()
    x0 = torch.randn(8, 3, 16, 16)
    y = torch.arange(8) % 4
    args = dict(seed=3, batch_index=1, trainer=CPU)
    full, hist = recover_batch(x0, y, [Backbone(teacher)], rc(), LO, HI, ckpt_dir=tmp_path / "a", **args)
    assert len(hist) == HP["iterations"]
    with pytest.raises(_Crash):
        recover_batch(x0, y, [Backbone(teacher)], rc(), LO, HI, ckpt_dir=tmp_path / "b", callbacks=[_CrashAt(7)],
                      **args)
    assert (tmp_path / "b" / "last.ckpt").is_file()
    resumed, hist2 = recover_batch(x0, y, [Backbone(teacher)], rc(), LO, HI, ckpt_dir=tmp_path / "b", resume=True,
                                   **args)
    assert [h["step"] for h in hist2] == list(range(10))  # continued at the step-5 checkpoint, history restored
    assert [h["loss_bn"] for h in hist2] == pytest.approx([h["loss_bn"] for h in hist], rel=1e-5)
    assert torch.allclose(resumed, full, atol=1e-6)
    assert not torch.allclose(full, x0)
    for changed in (rc(iterations=12), rc(crop_scale=[0.5, 1.0])):
        with pytest.raises(ValueError, match=r"last\.ckpt.*recover\.(iterations|crop_scale)"):
            recover_batch(x0, y, [Backbone(teacher)], changed, LO, HI, ckpt_dir=tmp_path / "b", resume=True, **args)
    with pytest.raises(ValueError, match="labels"):  # another ipc / batch: other labels
        recover_batch(x0, y.flip(0), [Backbone(teacher)], rc(), LO, HI, ckpt_dir=tmp_path / "b", resume=True, **args)


def test_recover_builds_its_trainers_from_the_factory(tmp_path):
    """Every recover fit is ``trainer("recover", ...)``: the run-wide precision reaches it."""
    made = Recording(TrainerFactory(accelerator="cpu", precision="bf16-mixed", enable_progress_bar=False))
    x, hist = recover_batch(torch.randn(4, 3, 16, 16), torch.arange(4), [Backbone(_teacher())], rc(iterations=2),
                            LO, HI, seed=0, batch_index=0, ckpt_dir=None, trainer=made)
    assert [s for s, _ in made.built] == ["recover"]
    assert made.built[0][1].precision == "bf16-mixed" and len(hist) == 2 and x.dtype == torch.float32


def test_recovery_lowers_the_bn_loss_and_the_cda_curriculum_runs_to_its_end(tmp_path):
    teacher = _teacher()
    b = Backbone(teacher)
    x0 = torch.randn(16, 3, 16, 16)
    hp = rc(iterations=60, lr=0.1, crop_schedule="cosine", jitter=1, crop_scale=[0.5, 1.0], crop_per_image=True)
    start = bn_loss_views(b, x0, hp)  # on the same fixed augmented views before and after
    x, hist = recover_batch(x0, torch.arange(16) % 4, [b], hp, LO, HI, seed=0, batch_index=0, ckpt_dir=None,
                            trainer=CPU)
    # (a box per image: one crop box per step for the whole batch, the reference's, is a noisier
    # objective, 23.2 -> 9.1 here in 60 steps)
    assert bn_loss_views(b, x, hp) < start / 3
    assert hist[-1]["loss_bn"] < hist[0]["loss_bn"] / 2  # the logged per-step loss too
    assert hist[0]["crop_scale_min"] == pytest.approx(1.0)
    assert hist[-1]["crop_scale_min"] == pytest.approx(0.5, abs=1e-3)  # one step short of the end (CDA)
    assert x.min() >= -3.0 and x.max() <= 3.0  # clipped to the valid pixel range


def test_gvbsm_samples_several_backbones_with_conv_and_logit_terms():
    nets = [_teacher(seed=s) for s in range(3)]
    x = torch.randn(50, 3, 16, 16)
    bbs = [Backbone(n, conv_statistics(n, x), torch.randn(4, 4)) for n in nets]
    hp = rc(iterations=8, backbones_per_iter=2, r_conv=0.01, r_logit=1.0)
    _, hist = recover_batch(torch.randn(8, 3, 16, 16), torch.arange(8) % 4, bbs, hp, LO, HI, seed=0, batch_index=0,
                            ckpt_dir=None, trainer=CPU)
    assert all(len(h["backbones"]) == 2 for h in hist)
    assert len({i for h in hist for i in h["backbones"]}) == 3  # every backbone is used in the run


def test_backbone_norm_start_weights_every_backbone_to_the_first_ones_scale():
    nets = [_teacher(seed=0), _teacher(width=16, seed=1)]
    real = torch.randn(50, 3, 16, 16)
    bbs = [Backbone(n, conv_statistics(n, real), torch.randn(4, 4)) for n in nets]
    x0 = torch.randn(8, 3, 16, 16)
    assert backbone_weights(bbs, x0, rc(backbone_norm="none")) == ([1.0, 1.0], [1.0, 1.0])
    assert backbone_weights(bbs, x0, rc()) == ([1.0, 1.0], [1.0, 1.0])  # default: none (unweighted, as G-VBSM)
    wb, wc = backbone_weights(bbs, x0, rc(backbone_norm="start"))
    raw = []
    with torch.no_grad():
        for b in bbs:
            b.net(x0)
            raw.append(tuple(float(v) for v in b.stat_losses(10.0)))
    assert wb[0] == 1.0 and wc[0] == 1.0
    assert wb[1] * raw[1][0] == pytest.approx(raw[0][0], rel=1e-5)
    assert wc[1] * raw[1][1] == pytest.approx(raw[0][1], rel=1e-5)


def test_conv_statistics_returns_the_logits_of_the_same_pass():
    net = _teacher()
    x = torch.randn(20, 3, 16, 16)
    conv, logits = conv_statistics(net, x, batch_size=7, return_logits=True)
    with torch.no_grad():
        assert torch.allclose(logits, net(x), atol=1e-5)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(conv, conv_statistics(net, x, batch_size=7)))


def test_channel_stats_is_biased_per_channel():
    x = torch.randn(4, 3, 5, 5)
    m, v = channel_stats(x)
    assert torch.allclose(v, x.permute(1, 0, 2, 3).reshape(3, -1).var(1, unbiased=False))
    assert torch.allclose(m, x.mean((0, 2, 3)))


def test_real_statistics_are_cached_beside_the_teacher(tmp_path):
    from types import SimpleNamespace

    from lightning_dd.methods.images.statistics_matching import real_statistics

    net = _teacher()
    path = tmp_path / "teacher.pt"
    torch.save({"net_cfg": {}, "state_dict": net.state_dict()}, path)
    dm = SimpleNamespace(train_images=torch.randn(30, 3, 16, 16), train_labels=torch.arange(30) % 4, num_classes=4,
                         identity=lambda: {"name": "toy"})
    conv, logits = real_statistics({"net": net, "path": path}, dm)
    assert len(list(tmp_path.glob("real_stats-*.pt"))) == 1 and logits.shape == (4, 4)
    with torch.no_grad():
        expected = net(dm.train_images[dm.train_labels == 2]).mean(0)
    assert torch.allclose(logits[2], expected, atol=1e-5)
    conv2, _ = real_statistics({"net": None, "path": path}, dm)  # from the cache: the net is not needed
    assert all(torch.equal(a[0], b[0]) for a, b in zip(conv, conv2))


# ----------------------------------------------------------------------------------------------
# The method through a hand-built RunContext (what the runner does), on scikit-learn's digits
# ----------------------------------------------------------------------------------------------
def _digits_cfg(tmp_path, monkeypatch, *extra, experiment="sre2l_cifar10"):
    from hydra import compose, initialize_config_dir

    from conftest import ROOT

    monkeypatch.setenv("LDD_CACHE_DIR", str(tmp_path / "cache"))
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=[
            f"experiment={experiment}", "data=digits", "data.zca=false", "method.ipc=1",
            "method.teacher.nets=[{name:ConvNet,width:8,depth:2,norm:batchnorm}]", "method.teacher.epochs=1",
            "method.recover.iterations=3", "method.recover.batch=10", "method.recover.jitter=1",
            "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", *extra])


def _run(cfg, out_dir, dm=None, **ctx_kw):
    """``(method, ctx, output)``: the method and its typed context built and checked by the runner's
    :func:`checked`, run as the runner runs it (``ctx.make_trainer`` records its Trainers)."""
    _, method, ctx = checked(cfg)
    if dm is None:
        dm = instantiate_node(cfg.data, "data")
        dm.setup()
    ctx = dataclasses.replace(ctx, dm=dm, out_dir=Path(out_dir), make_trainer=Recording(ctx.make_trainer), **ctx_kw)
    out = method.run(ctx)
    method.save(ctx, out)
    return method, ctx, out


@pytest.mark.slow
def test_batched_run_resumes_from_finished_batches_and_checkpoints(tmp_path, monkeypatch):
    """The whole method (squeeze -> recover in 2 batches) on digits; a run that lost its second
    batch's result resumes (finished batch read back, the other from its checkpoint, or
    recomputed) to the same distilled set; changed settings refuse the finished batches."""
    cfg = _digits_cfg(tmp_path, monkeypatch, "method.ipc=2", "method.recover.iterations=6",
                      "method.recover.ckpt_every=3")
    out = tmp_path / "run"
    method, ctx, a = _run(cfg, out)
    assert isinstance(method, StatisticsMatching) and method.name == "sre2l"
    assert [s for s, _ in ctx.make_trainer.built] == ["squeeze", "recover", "recover"]  # every fit from the factory
    assert a.metrics["recover/n_batches"] == 2 and a.result.images.shape == (20, 1, 8, 8)
    assert Path(a.extras["teacher_ckpt"]).is_file() and not (out / "fkd_labels.pt").exists()
    hard = a.result.meta["hard_labels"]  # the recovered classes, class-major, not the teacher's argmax
    assert torch.equal(hard, torch.arange(10).repeat_interleave(2))
    agree = float((a.result.labels.argmax(1) == hard).float().mean())
    assert a.metrics["recover/teacher_acc_on_synthetic"] == pytest.approx(agree)
    from lightning_dd.results import DistilledSet

    a.result.save(tmp_path / "distilled.pt")
    assert torch.equal(DistilledSet.load(tmp_path / "distilled.pt").meta["hard_labels"], hard)
    assert torch.equal(a.result.hard_labels(), hard)
    dm = ctx.dm
    (out / "recover" / "batch_001.pt").unlink()  # killed before batch 1 was saved
    _, ctx_b, b = _run(cfg, out, dm, resume=True)
    assert [s for s, _ in ctx_b.make_trainer.built] == ["recover"]  # teacher cached, batch 0 read back
    assert torch.allclose(a.result.images, b.result.images, atol=1e-6)
    assert torch.equal(a.result.labels.argmax(1), b.result.labels.argmax(1))
    (out / "recover" / "batch_001.pt").unlink()
    shutil.rmtree(out / "checkpoints" / "recover_001")  # nothing left of batch 1: recomputed alike
    _, _, c = _run(cfg, out, dm, resume=True)
    assert torch.allclose(a.result.images, c.result.images, atol=1e-6)
    hist = json.loads((out / "recover_history.json").read_text())  # batch 0 read back: its history too
    assert [(h["batch"], h["step"]) for h in hist] == [(b, i) for b in range(2) for i in range(6)]
    cfg.method.recover.iterations = 8  # changed settings: the finished batches are not reused
    with pytest.raises(ValueError, match=r"batch_000\.pt.*recover\.iterations: 6 there, 8 now"):
        _run(cfg, out, dm, resume=True)
    cfg.method.recover.iterations = 6
    cfg.method.recover.crop_scale = [0.5, 1.0]
    with pytest.raises(ValueError, match=r"recover\.crop_scale"):
        _run(cfg, out, dm, resume=True)


@pytest.mark.slow
def test_gvbsm_run_reports_every_backbone_and_takes_per_net_teacher_epochs(tmp_path, monkeypatch):
    """G-VBSM end to end on digits with two backbones: a net's own ``epochs`` overrides
    ``teacher.epochs`` (and keys its cache), ``backbone_norm=start`` runs, and the metrics get
    every backbone's BN loss start -> end."""
    cfg = _digits_cfg(tmp_path, monkeypatch, "method.teacher.nets=[{name:ConvNet,width:8,depth:2,norm:batchnorm},"
                      "{name:ConvNet,width:4,depth:2,norm:batchnorm,epochs:2}]", "method.recover.iterations=4",
                      "method.recover.backbone_norm=start", experiment="gvbsm_cifar10")
    _, ctx, r = _run(cfg, tmp_path / "run")
    m = r.metrics
    for i in range(2):
        assert m[f"recover/{i}_ConvNet/loss_bn_start"] > 0 and m[f"recover/{i}_ConvNet/loss_bn_end"] > 0
    assert m["recover/0_ConvNet/loss_bn_start"] == m["recover/loss_bn_start"]
    assert m["recover/loss_bn_reduction_min_over_backbones"] == pytest.approx(
        min(m[f"recover/{i}_ConvNet/loss_bn_reduction"] for i in range(2)))
    specs = sorted(json.loads(p.read_text())["epochs"] for p in (tmp_path / "cache" / "teachers").glob("*/spec.json"))
    assert specs == [1, 2]
    assert all("epochs" not in json.loads(p.read_text())["net"]
               for p in (tmp_path / "cache" / "teachers").glob("*/spec.json"))
    squeezes = [t for s, t in ctx.make_trainer.built if s == "squeeze"]
    assert [t.max_epochs for t in squeezes] == [1, 2]


@pytest.mark.slow
def test_stage_squeeze_stops_after_the_teachers(tmp_path, monkeypatch):
    cfg = _digits_cfg(tmp_path, monkeypatch, "stage=squeeze")
    method, ctx, out = _run(cfg, tmp_path / "run", stage="squeeze")
    assert set(method.stages) == {"all", "squeeze", "recover"}
    assert out.result is None and Path(out.extras["teacher_ckpt"]).is_file()
    assert out.metrics["squeeze/n_backbones"] == 1 and [s for s, _ in ctx.make_trainer.built] == ["squeeze"]
    assert not (tmp_path / "run" / "recover").exists()


def test_given_teacher_checkpoint_and_bad_settings_fail_clearly(tmp_path):
    from types import SimpleNamespace

    from lightning_dd.data.images import Preprocessing
    from lightning_dd.methods.images.statistics_matching import load_teacher_file, pixel_bounds

    dm = SimpleNamespace(image_shape=(3, 16, 16), num_classes=4, test_images=torch.randn(8, 3, 16, 16),
                         test_labels=torch.arange(8) % 4)
    net = _teacher()
    good = tmp_path / "t.pt"
    torch.save({"net_cfg": {"name": "ConvNet", "width": 8, "depth": 2, "norm": "batchnorm"},
                "state_dict": net.state_dict(), "test_acc": 0.5}, good)
    t = load_teacher_file(good, dm)
    assert t["test_acc"] == 0.5 and torch.equal(t["net"](dm.test_images), net(dm.test_images))
    with pytest.raises(FileNotFoundError, match="teacher checkpoint"):
        load_teacher_file(tmp_path / "missing.pt", dm)
    bad = tmp_path / "bad.pt"
    torch.save({"net_cfg": {"name": "ConvNet", "width": 16, "depth": 2, "norm": "batchnorm"},
                "state_dict": net.state_dict()}, bad)
    with pytest.raises(ValueError, match="does not fit"):
        load_teacher_file(bad, dm)
    zca = Preprocessing(torch.zeros(3), torch.ones(3), zca=torch.eye(3))
    with pytest.raises(ValueError, match="zca=false"):
        pixel_bounds(zca)


def test_run_device_follows_the_accelerator_setting():
    assert run_device("cpu") == torch.device("cpu")
    assert run_device("gpu") == run_device("cuda") == torch.device("cuda")
    assert run_device("auto").type == "cuda" if torch.cuda.is_available() else run_device("auto").type in ("cpu", "mps")
    with pytest.raises(ValueError, match="trainer.accelerator"):
        run_device("tpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_teacher_passes_run_on_the_teachers_device():
    from lightning_dd.training.metrics import accuracy

    teacher = _teacher()
    images = torch.randn(10, 3, 16, 16)
    conv_cpu = conv_statistics(teacher, images, batch_size=4)
    views_cpu = bn_loss_views(Backbone(teacher), images, rc())
    gpu_teacher = teacher.cuda()
    conv_gpu = conv_statistics(gpu_teacher, images, batch_size=4)  # images stay on the CPU
    assert all(a[0].device.type == "cpu" and torch.allclose(a[0], b[0], atol=1e-4) for a, b in zip(conv_gpu, conv_cpu))
    assert bn_loss_views(Backbone(gpu_teacher), images, rc()) == pytest.approx(views_cpu, rel=1e-3)
    labels = torch.arange(10) % 4
    assert accuracy(gpu_teacher, images, labels) == accuracy(teacher.cpu(), images, labels)


def _hooks(net: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in net.modules())


@pytest.mark.slow
def test_backbone_hooks_are_removed_after_recovery_even_when_it_fails(tmp_path, monkeypatch):
    import lightning_dd.methods.images.statistics_matching.method as sm

    b = Backbone(_teacher(), conv_statistics(_teacher(), torch.randn(8, 3, 16, 16)))
    assert _hooks(b.net) > 0
    b.remove()
    b.remove()  # idempotent
    assert _hooks(b.net) == 0

    cfg = _digits_cfg(tmp_path, monkeypatch, "method.recover.r_conv=0.01", "method.recover.r_logit=1.0")
    seen, real_teachers = [], sm.load_teachers
    monkeypatch.setattr(sm, "load_teachers", lambda *a: seen.extend(real_teachers(*a)) or seen)
    _, ctx, r = _run(cfg, tmp_path / "run")
    assert r.result is not None and _hooks(seen[0]["net"]) == 0  # soft labels ran on a hook-free teacher

    def crash(*a, **k):
        assert _hooks(seen[0]["net"]) > 0  # hooked while recovering
        raise RuntimeError("killed")

    seen.clear()
    monkeypatch.setattr(sm, "recover_batches", crash)
    with pytest.raises(RuntimeError, match="killed"):
        _run(cfg, tmp_path / "run2", ctx.dm)
    assert _hooks(seen[0]["net"]) == 0


def test_sampled_backbones_losses_are_averaged():
    nets = [_teacher(seed=s) for s in range(2)]
    real = torch.randn(30, 3, 16, 16)
    bbs = [Backbone(n, conv_statistics(n, real), torch.randn(4, 4)) for n in nets]
    hp = rc(backbones_per_iter=2, r_conv=0.01, r_logit=1.0)
    x, y = torch.randn(8, 3, 16, 16), torch.arange(8) % 4
    m = RecoverModule(x, y, bbs, hp, LO, HI)
    with torch.no_grad():
        both = m.losses(x, [0, 1])
        single = [m.losses(x, [i]) for i in range(2)]
    for key in ("ce", "bn", "conv", "logit"):
        assert float(both[key]) == pytest.approx((float(single[0][key]) + float(single[1][key])) / 2, rel=1e-5)


def test_sre2l_cifar_recovery_is_jitter_only():
    from hydra import compose, initialize_config_dir

    from conftest import ROOT

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        r = instantiate_node(compose("train", overrides=["experiment=sre2l_cifar10"]).method, "method").recover
        cda = instantiate_node(compose("train", overrides=["experiment=cda_cifar10"]).method, "method").recover
    assert r.crop_scale == (1.0, 1.0) and not r.flip and r.jitter == 4  # SRe2L's recover_cifar.py
    assert cda.crop_scale == (0.08, 1.0) and cda.flip and cda.crop_schedule == "cosine"
    hp = rc(crop_scale=[1.0, 1.0], flip=False, jitter=3)
    x = torch.randn(6, 3, 16, 16)
    m = RecoverModule(x, torch.arange(6) % 4, [Backbone(_teacher())], hp, LO, HI)
    for step in range(5):
        view, smin, _ = m.augment(step)
        assert smin == 1.0
        assert any(torch.equal(view, torch.roll(x, (dy, dx), (2, 3))) for dy in range(-3, 4) for dx in range(-3, 4))


def test_bn_loss_views_flip_only_when_recovery_does():
    b = Backbone(_teacher())
    x = torch.randn(8, 3, 16, 16)
    plain = dict(jitter=0, crop_scale=[1.0, 1.0], flip=False)
    assert bn_loss_views(b, x, rc(**plain)) == pytest.approx(bn_loss_of(b, x, 10.0), rel=1e-6)  # the whole images
    flipped = bn_loss_views(b, x, rc(**{**plain, "flip": True}))
    assert flipped != pytest.approx(bn_loss_of(b, x, 10.0), rel=1e-4)
    assert bn_loss_views(b, x.flip(-1), rc(**plain)) == pytest.approx(bn_loss_of(b, x.flip(-1), 10.0))


# ----------------------------------------------------------------------------------------------
# The typed config: bad values fail when the method node is built, naming the key
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, key", [
    ("method.recover.crop_schedule=exp", "method.recover.crop_schedule"),
    ("method.recover.milestone=0", "method.recover.milestone"),
    ("method.recover.milestone=1.5", "method.recover.milestone"),
    ("method.recover.backbone_norm=max", "method.recover.backbone_norm"),
    ("method.recover.crop_scale=[0.0,1.0]", "method.recover.crop_scale"),
    ("method.recover.crop_scale=[0.8,0.5]", "method.recover.crop_scale"),
    ("method.recover.crop_scale=[0.5,1.5]", "method.recover.crop_scale"),
    ("method.recover.crop_scale=[0.5]", "method.recover.crop_scale"),
    ("method.recover.batch=0", "method.recover.batch"),
    ("method.recover.iterations=-1", "method.recover.iterations"),
    ("method.recover.lr=abc", "method.recover.lr"),
    ("method.recover.r_bn=-0.1", "method.recover.r_bn"),
    ("method.ipc=0", "method.ipc"),
    ("method.teacher.epochs=0", "method.teacher.epochs"),
    ("method.teacher.nets=[]", "method.teacher"),
    ("method.teacher.nets=[{width:8}]", "method.teacher.nets"),
    ("method.teacher.nets=[{name:ConvNet,epochs:0}]", "method.teacher.nets"),
    ("+method.relabel.epochs=1", "method.relabel"),  # the FKD store is gone: an unknown key
    ("+method.recover.bacbone_norm=start", "method.recover.bacbone_norm"),
    ("method.teacher.optimizer.lr=-1", r"method.teacher.optimizer: Value error, does not build"),
    ("method.teacher.optimizer.weight_decay=-0.1", r"method.teacher.optimizer: Value error, does not build"),
    ("+method.teacher.scheduler.gamma=0.5", r"method.teacher.scheduler: Value error, does not build"),
])
def test_bad_settings_fail_when_the_method_is_built(override, key):
    from hydra import compose, initialize_config_dir

    from conftest import ROOT

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=cda_cifar10", override])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        instantiate_node(cfg.method, "method")


def test_every_method_config_builds_the_same_class_with_its_settings():
    from hydra import compose, initialize_config_dir

    from conftest import ROOT

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        ms = {n: instantiate_node(compose(f"method/{n}").method, "method")
              for n in ("sre2l", "cda", "gvbsm")}
        zca = compose("train", overrides=["experiment=cda_cifar10", "data.zca=true"])
        tpu = compose("train", overrides=["experiment=cda_cifar10", "trainer.accelerator=tpu"])
        ddp_spawn = compose("train", overrides=["experiment=cda_cifar10", "trainer.strategy=ddp_spawn"])
    assert all(type(m) is StatisticsMatching for m in ms.values())
    assert ms["sre2l"].recover.crop_schedule == "none" and ms["cda"].recover.crop_schedule == "cosine"
    assert ms["cda"].recover.iterations == 4000 and len(ms["gvbsm"].teacher.nets) == 5
    g = ms["gvbsm"].recover  # G-VBSM's recover.sh and script defaults
    assert (g.r_conv, g.r_bn, g.backbones_per_iter, g.backbone_sampling) == (0.01, 0.01, 1, "cycle")
    assert (g.r_nuc, g.stat_momentum, g.conv_drop, g.crop_pad, g.r_logit) == (1.0, 0.8, 0.4, 4, 0.0)
    assert isinstance(ms["sre2l"].teacher, TeacherConfig) and isinstance(ms["sre2l"].recover, RecoverConfig)
    with pytest.raises(ConfigError, match=r"data\.zca"):
        checked(zca)
    with pytest.raises(ConfigError, match=r"trainer\.accelerator"):
        checked(tpu)
    with pytest.raises(ConfigError, match=r"trainer\.strategy"):
        checked(ddp_spawn)


def test_cpu_presets_compose_and_imagenet_ones_share_one_data_config():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from conftest import ROOT

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfgs = {e: compose("train", overrides=[f"experiment={e}", "scale=cpu"])
                for e in ("sre2l_cifar10", "cda_cifar10", "gvbsm_cifar10", "sre2l_imagenet", "cda_imagenet")}
    for e, c in cfgs.items():
        assert c.scale_preset == e
        checked(c)
    a, b = cfgs["sre2l_imagenet"], cfgs["cda_imagenet"]
    assert a.data.name == "imagenet_sample" and a.method.recover.iterations == 12 and a.method.ipc == 1
    for node in ("data", "net", "eval"):
        assert OmegaConf.to_container(a[node]) == OmegaConf.to_container(b[node])
    assert a.method.name == "sre2l" and b.method.name == "cda" and b.method.recover.crop_schedule == "cosine"
    presets = ROOT / "conf" / "scale_preset"
    assert "imagenet_sample" not in (presets / "cda_imagenet" / "cpu.yaml").read_text()  # included, not copied


def test_squeeze_cache_hit_loads_the_same_teacher(tmp_path, monkeypatch):
    from lightning_dd.methods.images.statistics_matching import squeeze

    cfg = _digits_cfg(tmp_path, monkeypatch)
    dm = instantiate_node(cfg.data, "data")
    dm.setup()
    tcfg = method("sre2l", **{"teacher.epochs": 1, "teacher.batch_size": 64, "teacher.optimizer.lr": 0.05,
                              "teacher.optimizer.weight_decay": 0.0}).teacher
    net_cfg = {"name": "ConvNet", "width": 8, "depth": 2, "norm": "batchnorm"}
    made = Recording(TrainerFactory(accelerator="cpu", enable_progress_bar=False))
    a = squeeze(net_cfg, dm, tcfg, tmp_path / "teachers", trainer=made)
    b = squeeze(net_cfg, dm, tcfg, tmp_path / "teachers", trainer=made)
    assert [s for s, _ in made.built] == ["squeeze"]  # trained once, through the factory
    assert not a["cached"] and b["cached"] and a["path"] == b["path"] and b["test_acc"] == a["test_acc"]
    assert not b["net"].training
    assert all(torch.equal(v, b["net"].state_dict()[k]) for k, v in a["net"].state_dict().items())
    torch.save({"net_cfg": {**net_cfg, "width": 16}, "state_dict": a["net"].state_dict()}, a["path"])
    c = squeeze(net_cfg, dm, tcfg, tmp_path / "teachers", trainer=made)  # a foreign / corrupted entry: retrained
    assert not c["cached"] and [s for s, _ in made.built] == ["squeeze", "squeeze"]
    assert all(torch.equal(v, c["net"].state_dict()[k]) for k, v in a["net"].state_dict().items())


def test_conv_hooks_have_no_builtin_targets():
    net = _teacher()
    targets = conv_statistics(net, torch.randn(8, 3, 16, 16))
    with StatsHooks(net, "conv") as hooks, torch.no_grad():
        net(torch.randn(4, 3, 16, 16))
        with pytest.raises(ValueError, match="conv_statistics"):
            hooks.targets()
        with pytest.raises(ValueError, match="conv_statistics"):
            hooks.loss()
        assert float(hooks.loss(targets)) > 0


@pytest.mark.parametrize("name, factor", [("MobileNetV2", 32), ("ShuffleNetV2", 32), ("WRN16_2", 16)])
def test_imagenet_stems_down_sample_as_documented(name, factor):
    net = build_net(name, 3, 10, (64, 64), stem="imagenet").eval()
    sizes = []
    hs = [m.register_forward_hook(lambda m, i, o: sizes.append(o.shape[-1])) for m in net.modules()
          if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        net(torch.randn(1, 3, 64, 64))
    for h in hs:
        h.remove()
    assert 64 // min(sizes) == factor  # lightning_dd/nets/small.py's module doc


def test_conv_drop_leaves_layers_out_and_their_averages_still():
    """G-VBSM's --drop-rate: a dropped conv layer adds nothing to the step's conv loss and its moving
    average does not advance; the draw is a function of (seed, batch, step)."""
    net = _teacher()
    b = Backbone(net, conv_statistics(net, torch.randn(30, 3, 16, 16)))
    hp = rc(r_conv=0.01, conv_drop=0.5, stat_momentum=0.8)
    m = RecoverModule(torch.randn(8, 3, 16, 16), torch.arange(8) % 4, [b], hp, LO, HI)
    keeps = [m.conv_keep(s)[0] for s in range(12)]
    assert keeps == [m.conv_keep(s)[0] for s in range(12)] and any(not all(k) for k in keeps)
    assert any(any(k) and not all(k) for k in keeps)
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        net(x)
        full = float(b.conv.loss(b.conv_targets, 1.0))
        parts = []
        for i in range(len(b.conv.layers)):
            keep = [j == i for j in range(len(b.conv.layers))]
            parts.append(float(b.conv.loss(b.conv_targets, 1.0, keep=keep)))
        assert sum(parts) == pytest.approx(full, rel=1e-5)
        b.reset_ema()
        b.conv.loss(b.conv_targets, 1.0, momentum=0.8, keep=[True, False])
        assert b.conv.ema[0] is not None and b.conv.ema[1] is None
    b.remove()


def test_teacher_module_keeps_the_squeeze_recipe():
    """SGD (momentum 0.9, Nesterov as set, L2 weight decay) and a cosine per optimizer step:
    ``(1 + cos(pi min(s, T) / T)) / 2``, the same floats as SRe2L's schedule written out."""
    import math

    from lightning_dd.methods.images.statistics_matching import teacher_module

    tcfg = method("sre2l", **{f"teacher.optimizer.{k}": v for k, v in
                              {"nesterov": True, "weight_decay": 0.001, "lr": 0.2}.items()}).teacher
    conf = teacher_module(_teacher(), tcfg, 7, (16, 16)).configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    g = opt.param_groups[0]
    assert isinstance(opt, torch.optim.SGD) and conf["lr_scheduler"]["interval"] == "step"
    assert (g["lr"], g["momentum"], g["nesterov"], g["weight_decay"]) == (0.2, 0.9, True, 0.001)
    assert [sched.lr_lambdas[0](s) for s in range(10)] == [0.5 * (1 + math.cos(math.pi * min(s, 7) / 7))
                                                           for s in range(10)]


def test_teacher_cache_keys_stay_those_of_the_typed_fields():
    """The optimizer partial keys a teacher with the names and values the typed fields had
    (``lr``, ``weight_decay``, ``nesterov``): the CPU preset's teacher of the cda_cifar10 proof run
    keeps its folder ``83b8eb7ea24b24c0``; another recipe (other keywords, schedule) gets its own key."""
    from lightning_dd.methods.images.statistics_matching.squeeze import teacher_spec
    from lightning_dd.io import cache_key

    cfg = compose_train("experiment=cda_cifar10", "scale=cpu", "method.teacher.epochs=2")
    teacher = instantiate_node(cfg.method, "method").teacher
    assert teacher_spec(teacher) == {"lr": 0.05, "weight_decay": 0.0005, "nesterov": False}
    data = {"n_train": 50000, "name": "cifar10", "source": "/work/shared/data/cifar10", "subset_seed": 0,
            "train_per_class": 100, "zca": False, "zca_eps": 0.1}
    spec = {"data": data, "net": {"depth": 3, "name": "ConvNet", "norm": "batchnorm", "width": 32}, "seed": 0,
            "epochs": 2, "batch_size": 128, "label_smoothing": 0.0, **teacher_spec(teacher)}
    assert cache_key(spec) == "83b8eb7ea24b24c0"
    other = [method("sre2l", **{k: v}).teacher for k, v in (("teacher.optimizer.momentum", 0.8),
                                                             ("teacher.optimizer.dampening", 0.1),
                                                             ("teacher.scheduler.warmup", 2))]
    keys = [teacher_spec(method("sre2l").teacher)] + [teacher_spec(t) for t in other]
    assert all("recipe" in k for k in keys[1:]) and len({cache_key(k) for k in keys}) == 4


def test_accuracy_is_the_fraction_of_correct_predictions():
    from lightning_dd.training.metrics import accuracy

    net = _teacher()
    images, labels = torch.randn(37, 3, 16, 16), torch.arange(37) % 4
    with torch.no_grad():
        correct = int((net(images).argmax(1) == labels).sum())
    assert accuracy(net, images, labels, batch_size=10) == correct / 37
    assert accuracy(net, images[:0], labels[:0]) == 0.0
