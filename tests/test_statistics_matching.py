"""Statistics matching (SRe2L / CDA / G-VBSM): BN hooks, convolution statistics, crops, the CDA
curriculum, FKD relabel replay, resumable recovery, multi-backbone sampling."""
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn as nn

from lightning_dd.methods.statistics_matching import (Backbone, StatsHooks, bn_loss_views, channel_stats,
                                                      conv_statistics, crop_resize, crop_scale_min, recover_batch,
                                                      relabel_fkd, replay_fkd, run_device, sample_crops)
from lightning_dd.nets import build_net


def _teacher(width=8, size=16, classes=4, seed=0) -> nn.Module:
    """A small BN ConvNet with non-trivial running statistics (a few train-mode forwards)."""
    torch.manual_seed(seed)
    net = build_net("ConvNet", 3, classes, (size, size), width=width, depth=2, norm="batchnorm")
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.rand(32, 3, size, size) * 2 + 0.5)
    return net.eval()


HP = {"iterations": 10, "lr": 0.1, "r_bn": 1.0, "first_bn_multiplier": 10.0, "jitter": 2, "flip": True,
      "crop_scale": [0.08, 1.0], "crop_schedule": "none", "milestone": 1.0, "backbones_per_iter": 1,
      "r_conv": 0.0, "r_logit": 0.0, "ckpt_every": 5}
LO, HI = torch.full((3,), -3.0), torch.full((3,), 3.0)


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


def test_conv_statistics_are_exact_over_batches():
    net = _teacher()
    x = torch.randn(50, 3, 16, 16)
    got = conv_statistics(net, x, batch_size=7)
    with StatsHooks(net, "conv") as hooks, torch.no_grad():
        net(x)
        for (m, v), (em, ev) in zip(got, hooks.stats):
            assert torch.allclose(m, em, atol=1e-5) and torch.allclose(v, ev, atol=1e-4)
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
    with pytest.raises(ValueError):
        crop_scale_min(0, iters, "exp")
    with pytest.raises(ValueError):
        crop_scale_min(39, iters, "exp")  # also past the milestone


def test_fkd_relabel_replay_gives_the_same_crops_and_targets():
    teacher = _teacher(classes=4)
    images = torch.randn(10, 3, 16, 16)
    store = relabel_fkd(teacher, images, epochs=3, topk=2, seed=5, batch_size=4)
    assert store["boxes"].shape == (3, 10, 4) and store["topk_indices"].shape == (3, 10, 2)
    again = relabel_fkd(teacher, images, epochs=3, topk=2, seed=5)
    assert all(torch.equal(store[k], again[k]) for k in ("boxes", "flips", "topk_values", "topk_indices"))
    idx = torch.tensor([7, 2, 5])
    crops, targets = replay_fkd(images, store, 1, idx)
    crops2, targets2 = replay_fkd(images, store, 1, idx)
    assert torch.equal(crops, crops2) and torch.equal(targets, targets2)
    with torch.no_grad():
        p = torch.softmax(teacher(crops), 1)
    v, i = p.topk(2, 1)
    assert torch.equal(i, store["topk_indices"][1][idx])  # the teacher agrees on the replayed crops
    assert torch.allclose(targets.gather(1, i), v / v.sum(1, keepdim=True), atol=2e-3)
    assert torch.allclose(targets.sum(1), torch.ones(3)) and not torch.equal(store["boxes"][0], store["boxes"][1])
    with pytest.raises(IndexError):
        replay_fkd(images, store, 3)


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
    args = dict(seed=3, batch_index=1, accelerator="cpu")
    full, hist = recover_batch(x0, y, [Backbone(teacher)], HP, LO, HI, ckpt_dir=tmp_path / "a", **args)
    assert len(hist) == HP["iterations"]
    with pytest.raises(_Crash):
        recover_batch(x0, y, [Backbone(teacher)], HP, LO, HI, ckpt_dir=tmp_path / "b", callbacks=[_CrashAt(7)],
                      **args)
    assert (tmp_path / "b" / "last.ckpt").is_file()
    resumed, hist2 = recover_batch(x0, y, [Backbone(teacher)], HP, LO, HI, ckpt_dir=tmp_path / "b", resume=True,
                                   **args)
    assert [h["step"] for h in hist2] == list(range(10))  # continued at the step-5 checkpoint, history restored
    assert [h["loss_bn"] for h in hist2] == pytest.approx([h["loss_bn"] for h in hist], rel=1e-5)
    assert torch.allclose(resumed, full, atol=1e-6)
    assert not torch.allclose(full, x0)
    for changed in ({**HP, "iterations": 12}, {**HP, "crop_scale": [0.5, 1.0]}):
        with pytest.raises(ValueError, match=r"last\.ckpt.*recover\.(iterations|crop_scale)"):
            recover_batch(x0, y, [Backbone(teacher)], changed, LO, HI, ckpt_dir=tmp_path / "b", resume=True, **args)
    with pytest.raises(ValueError, match="labels"):  # another ipc / batch: other labels
        recover_batch(x0, y.flip(0), [Backbone(teacher)], HP, LO, HI, ckpt_dir=tmp_path / "b", resume=True, **args)


def test_recovery_lowers_the_bn_loss_and_the_cda_curriculum_runs_to_its_end(tmp_path):
    teacher = _teacher()
    b = Backbone(teacher)
    x0 = torch.randn(16, 3, 16, 16)
    hp = {**HP, "iterations": 60, "lr": 0.1, "crop_schedule": "cosine", "jitter": 1, "crop_scale": [0.5, 1.0]}
    start = bn_loss_views(b, x0, hp)  # on the same fixed augmented views before and after
    x, hist = recover_batch(x0, torch.arange(16) % 4, [b], hp, LO, HI, seed=0, batch_index=0, ckpt_dir=None,
                            accelerator="cpu")
    assert bn_loss_views(b, x, hp) < start / 3
    assert hist[-1]["loss_bn"] < hist[0]["loss_bn"] / 2  # the logged per-step loss too
    assert hist[0]["crop_scale_min"] == pytest.approx(1.0)
    assert hist[-1]["crop_scale_min"] == pytest.approx(0.5, abs=1e-3)  # one step short of the end (CDA)
    assert x.min() >= -3.0 and x.max() <= 3.0  # clipped to the valid pixel range


def test_gvbsm_samples_several_backbones_with_conv_and_logit_terms():
    nets = [_teacher(seed=s) for s in range(3)]
    x = torch.randn(50, 3, 16, 16)
    bbs = [Backbone(n, conv_statistics(n, x), torch.randn(4, 4)) for n in nets]
    hp = {**HP, "iterations": 8, "backbones_per_iter": 2, "r_conv": 0.01, "r_logit": 1.0}
    _, hist = recover_batch(torch.randn(8, 3, 16, 16), torch.arange(8) % 4, bbs, hp, LO, HI, seed=0, batch_index=0,
                            ckpt_dir=None, accelerator="cpu")
    assert all(len(h["backbones"]) == 2 for h in hist)
    assert len({i for h in hist for i in h["backbones"]}) == 3  # every backbone is used in the run


def test_backbone_norm_start_weights_every_backbone_to_the_first_ones_scale():
    from lightning_dd.methods.statistics_matching import backbone_weights

    nets = [_teacher(seed=0), _teacher(width=16, seed=1)]
    real = torch.randn(50, 3, 16, 16)
    bbs = [Backbone(n, conv_statistics(n, real), torch.randn(4, 4)) for n in nets]
    x0 = torch.randn(8, 3, 16, 16)
    assert backbone_weights(bbs, x0, {**HP, "backbone_norm": "none"}) == ([1.0, 1.0], [1.0, 1.0])
    assert backbone_weights(bbs, x0, HP) == ([1.0, 1.0], [1.0, 1.0])  # absent: none (unweighted, as G-VBSM)
    wb, wc = backbone_weights(bbs, x0, {**HP, "backbone_norm": "start"})
    raw = []
    with torch.no_grad():
        for b in bbs:
            b.net(x0)
            raw.append((float(b.bn.loss(first_multiplier=10.0)), float(b.conv.loss(b.conv_targets, 10.0))))
    assert wb[0] == 1.0 and wc[0] == 1.0
    assert wb[1] * raw[1][0] == pytest.approx(raw[0][0], rel=1e-5)
    assert wc[1] * raw[1][1] == pytest.approx(raw[0][1], rel=1e-5)
    with pytest.raises(ValueError, match="backbone_norm"):
        backbone_weights(bbs, x0, {**HP, "backbone_norm": "max"})


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

    from lightning_dd.methods.statistics_matching import real_statistics

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


def test_batched_run_resumes_from_finished_batches_and_checkpoints(tmp_path, monkeypatch):
    """The whole method (squeeze -> recover in 2 batches -> relabel) on scikit-learn's digits; a run
    that lost its second batch's result resumes (finished batch read back, the other from its
    checkpoint, or recomputed) to the same distilled set."""
    from hydra import compose, initialize_config_dir

    from conftest import ROOT
    from lightning_dd.methods.statistics_matching import run_statistics_matching
    from lightning_dd.runner import build_datamodule

    monkeypatch.setenv("LDD_CACHE_DIR", str(tmp_path / "cache"))
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[
            "experiment=sre2l_cifar10", "data=digits", "data.zca=false", "method.ipc=2",
            "method.teacher.nets=[{name:ConvNet,width:8,depth:2,norm:batchnorm}]", "method.teacher.epochs=1",
            "method.recover.iterations=6", "method.recover.batch=10", "method.recover.ckpt_every=3",
            "method.recover.jitter=1", "method.relabel.epochs=1", "trainer.accelerator=cpu",
            "trainer.enable_progress_bar=false"])
    dm = build_datamodule(cfg.data)
    dm.setup()
    out = tmp_path / "run"
    a = run_statistics_matching(cfg, dm, out, [], [])
    assert a["metrics"]["recover/n_batches"] == 2 and a["result"].images.shape == (20, 1, 8, 8)
    assert (out / "fkd_labels.pt").is_file() and Path(a["teacher_ckpt"]).is_file()
    hard = a["result"].meta["hard_labels"]  # the recovered classes, class-major, not the teacher's argmax
    assert torch.equal(hard, torch.arange(10).repeat_interleave(2))
    teacher_argmax = a["result"].labels.argmax(1)
    agree = float((teacher_argmax == hard).float().mean())
    assert a["metrics"]["recover/teacher_acc_on_synthetic"] == pytest.approx(agree)
    from lightning_dd.results import DistilledSet

    a["result"].save(tmp_path / "distilled.pt")
    assert torch.equal(DistilledSet.load(tmp_path / "distilled.pt").meta["hard_labels"], hard)
    assert torch.equal(a["result"].hard_labels(), hard)
    (out / "recover" / "batch_001.pt").unlink()  # killed before batch 1 was saved
    cfg.resume = True
    b = run_statistics_matching(cfg, dm, out, [], [])
    assert torch.allclose(a["result"].images, b["result"].images, atol=1e-6)
    assert torch.equal(a["result"].labels.argmax(1), b["result"].labels.argmax(1))
    import shutil

    (out / "recover" / "batch_001.pt").unlink()
    shutil.rmtree(out / "checkpoints" / "recover_001")  # nothing left of batch 1: recomputed alike
    c = run_statistics_matching(cfg, dm, out, [], [])
    assert torch.allclose(a["result"].images, c["result"].images, atol=1e-6)
    import json

    hist = json.loads((out / "recover_history.json").read_text())  # batch 0 read back: its history too
    assert [(h["batch"], h["step"]) for h in hist] == [(b, i) for b in range(2) for i in range(6)]
    cfg.method.recover.iterations = 8  # changed settings: the finished batches are not reused
    with pytest.raises(ValueError, match=r"batch_000\.pt.*recover\.iterations: 6 there, 8 now"):
        run_statistics_matching(cfg, dm, out, [], [])
    cfg.method.recover.iterations = 6
    cfg.method.recover.crop_scale = [0.5, 1.0]
    with pytest.raises(ValueError, match=r"recover\.crop_scale"):
        run_statistics_matching(cfg, dm, out, [], [])


def test_gvbsm_run_reports_every_backbone_and_takes_per_net_teacher_epochs(tmp_path, monkeypatch):
    """G-VBSM end to end on digits with two backbones: a net's own ``epochs`` overrides
    ``teacher.epochs`` (and keys its cache), ``backbone_norm=start`` runs, and metrics.json gets
    every backbone's BN loss start -> end."""
    import json

    from hydra import compose, initialize_config_dir

    from conftest import ROOT
    from lightning_dd.methods.statistics_matching import run_statistics_matching
    from lightning_dd.runner import build_datamodule

    monkeypatch.setenv("LDD_CACHE_DIR", str(tmp_path / "cache"))
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[
            "experiment=gvbsm_cifar10", "data=digits", "data.zca=false", "method.ipc=1",
            "method.teacher.nets=[{name:ConvNet,width:8,depth:2,norm:batchnorm},"
            "{name:ConvNet,width:4,depth:2,norm:batchnorm,epochs:2}]", "method.teacher.epochs=1",
            "method.recover.iterations=4", "method.recover.batch=10", "method.recover.jitter=1",
            "method.recover.backbone_norm=start", "method.relabel.epochs=0", "trainer.accelerator=cpu",
            "trainer.enable_progress_bar=false"])
    dm = build_datamodule(cfg.data)
    dm.setup()
    r = run_statistics_matching(cfg, dm, tmp_path / "run", [], [])
    m = r["metrics"]
    for i in range(2):
        assert m[f"recover/{i}_ConvNet/loss_bn_start"] > 0 and m[f"recover/{i}_ConvNet/loss_bn_end"] > 0
    assert m["recover/0_ConvNet/loss_bn_start"] == m["recover/loss_bn_start"]
    assert m["recover/loss_bn_reduction_min_over_backbones"] == pytest.approx(
        min(m[f"recover/{i}_ConvNet/loss_bn_reduction"] for i in range(2)))
    specs = sorted(json.loads(p.read_text())["epochs"] for p in (tmp_path / "cache" / "teachers").glob("*/spec.json"))
    assert specs == [1, 2]
    assert all("epochs" not in json.loads(p.read_text())["net"]
               for p in (tmp_path / "cache" / "teachers").glob("*/spec.json"))


def test_given_teacher_checkpoint_and_bad_settings_fail_clearly(tmp_path):
    from types import SimpleNamespace

    from lightning_dd.data.images import Preprocessing
    from lightning_dd.methods.statistics_matching import load_teacher_file, pixel_bounds

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
    from lightning_dd.methods.statistics_matching import accuracy

    teacher = _teacher()
    images = torch.randn(10, 3, 16, 16)
    cpu = relabel_fkd(teacher, images, epochs=2, topk=2, seed=1)
    conv_cpu = conv_statistics(teacher, images, batch_size=4)
    gpu_teacher = teacher.cuda()
    gpu = relabel_fkd(gpu_teacher, images, epochs=2, topk=2, seed=1)  # images stay on the CPU
    assert gpu["topk_values"].device.type == "cpu" and torch.equal(gpu["boxes"], cpu["boxes"])
    assert torch.allclose(gpu["topk_values"].float(), cpu["topk_values"].float(), atol=2e-3)
    conv_gpu = conv_statistics(gpu_teacher, images, batch_size=4)
    assert all(a[0].device.type == "cpu" and torch.allclose(a[0], b[0], atol=1e-4) for a, b in zip(conv_gpu, conv_cpu))
    assert 0 <= accuracy(gpu_teacher, images, torch.arange(10) % 4) <= 1


def _digits_cfg(tmp_path, monkeypatch, *extra, experiment="sre2l_cifar10"):
    from hydra import compose, initialize_config_dir

    from conftest import ROOT

    monkeypatch.setenv("LDD_CACHE_DIR", str(tmp_path / "cache"))
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=[
            f"experiment={experiment}", "data=digits", "data.zca=false", "method.ipc=1",
            "method.teacher.nets=[{name:ConvNet,width:8,depth:2,norm:batchnorm}]", "method.teacher.epochs=1",
            "method.recover.iterations=3", "method.recover.batch=10", "method.recover.jitter=1",
            "method.relabel.epochs=0", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", *extra])


def _hooks(net: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in net.modules())


def test_backbone_hooks_are_removed_after_recovery_even_when_it_fails(tmp_path, monkeypatch):
    import lightning_dd.methods.statistics_matching as sm
    from lightning_dd.runner import build_datamodule

    b = Backbone(_teacher(), conv_statistics(_teacher(), torch.randn(8, 3, 16, 16)))
    assert _hooks(b.net) > 0
    b.remove()
    b.remove()  # idempotent
    assert _hooks(b.net) == 0

    cfg = _digits_cfg(tmp_path, monkeypatch, "method.recover.r_conv=0.01", "method.recover.r_logit=1.0")
    dm = build_datamodule(cfg.data)
    dm.setup()
    seen, real_teachers = [], sm._teachers
    monkeypatch.setattr(sm, "_teachers", lambda cfg, dm: seen.extend(real_teachers(cfg, dm)) or seen)
    r = sm.run_statistics_matching(cfg, dm, tmp_path / "run", [], [])
    assert r["result"] is not None and _hooks(seen[0]["net"]) == 0  # soft labels ran on a hook-free teacher

    def crash(*a, **k):
        assert _hooks(seen[0]["net"]) > 0  # hooked while recovering
        raise RuntimeError("killed")

    seen.clear()
    monkeypatch.setattr(sm, "recover_batch", crash)
    with pytest.raises(RuntimeError, match="killed"):
        sm.run_statistics_matching(cfg, dm, tmp_path / "run2", [], [])
    assert _hooks(seen[0]["net"]) == 0


def test_sampled_backbones_losses_are_averaged():
    from lightning_dd.methods.statistics_matching import RecoverModule

    nets = [_teacher(seed=s) for s in range(2)]
    real = torch.randn(30, 3, 16, 16)
    bbs = [Backbone(n, conv_statistics(n, real), torch.randn(4, 4)) for n in nets]
    hp = {**HP, "backbones_per_iter": 2, "r_conv": 0.01, "r_logit": 1.0}
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
    from lightning_dd.methods.statistics_matching import RecoverModule

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        r = compose("train", overrides=["experiment=sre2l_cifar10"]).method.recover
        cda = compose("train", overrides=["experiment=cda_cifar10"]).method.recover
    assert list(r.crop_scale) == [1.0, 1.0] and not r.flip and r.jitter == 4  # SRe2L's recover_cifar.py
    assert list(cda.crop_scale) == [0.08, 1.0] and cda.flip and cda.crop_schedule == "cosine"
    hp = {**HP, "crop_scale": [1.0, 1.0], "flip": False, "jitter": 3}
    x = torch.randn(6, 3, 16, 16)
    m = RecoverModule(x, torch.arange(6) % 4, [Backbone(_teacher())], hp, LO, HI)
    for step in range(5):
        view, smin, _ = m.augment(step)
        assert smin == 1.0
        assert any(torch.equal(view, torch.roll(x, (dy, dx), (2, 3))) for dy in range(-3, 4) for dx in range(-3, 4))


def test_bn_loss_views_flip_only_when_recovery_does():
    from lightning_dd.methods.statistics_matching import bn_loss_of

    b = Backbone(_teacher())
    x = torch.randn(8, 3, 16, 16)
    plain = {**HP, "jitter": 0, "crop_scale": [1.0, 1.0], "flip": False}
    assert bn_loss_views(b, x, plain) == pytest.approx(bn_loss_of(b, x, 10.0), rel=1e-6)  # the whole images
    flipped = bn_loss_views(b, x, {**plain, "flip": True})
    assert flipped != pytest.approx(bn_loss_of(b, x, 10.0), rel=1e-4)
    assert bn_loss_views(b, x.flip(-1), {**plain, "flip": False}) == pytest.approx(bn_loss_of(b, x.flip(-1), 10.0))


def test_relabel_crops_are_not_recoverys_random_stream():
    from lightning_dd.methods.statistics_matching import RecoverModule, relabel_seed

    teacher = _teacher()
    images = torch.randn(10, 3, 16, 16)
    store = relabel_fkd(teacher, images, epochs=3, topk=2, seed=5)
    rm = RecoverModule(images, torch.arange(10) % 4, [Backbone(teacher)], HP, LO, HI, seed=5, batch_index=0)
    for e in range(3):  # recovery batch 0, step e, draws its crops from rm.generator(e)
        assert not torch.equal(store["boxes"][e], sample_crops(10, 16, 16, (0.08, 1.0), rm.generator(e)))
    assert len({relabel_seed(s, e) for s in range(20) for e in range(50)}) == 1000


@pytest.mark.parametrize("override, key", [
    ("method.recover.crop_schedule=exp", "method.recover.crop_schedule"),
    ("method.recover.milestone=0", "method.recover.milestone"),
    ("method.recover.milestone=1.5", "method.recover.milestone"),
    ("+method.recover.backbone_norm=max", "method.recover.backbone_norm"),
    ("method.relabel.crop_scale=[0.0,1.0]", "method.relabel.crop_scale"),
    ("method.relabel.crop_scale=[0.8,0.5]", "method.relabel.crop_scale"),
    ("method.recover.crop_scale=[0.5,1.5]", "method.recover.crop_scale"),
    ("method.recover.batch=0", "method.recover.batch"),
])
def test_bad_settings_fail_before_the_squeeze(tmp_path, monkeypatch, override, key):
    from types import SimpleNamespace

    import lightning_dd.methods.statistics_matching as sm
    from lightning_dd.data.images import Preprocessing

    cfg = _digits_cfg(tmp_path, monkeypatch, override)

    def no_squeeze(*a, **k):
        raise AssertionError("squeezed before validating the settings")

    monkeypatch.setattr(sm, "_teachers", no_squeeze)
    dm = SimpleNamespace(preprocessing=Preprocessing(torch.zeros(1), torch.ones(1)))
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        sm.run_statistics_matching(cfg, dm, tmp_path / "run", [], [])


def test_squeeze_cache_hit_loads_the_same_teacher(tmp_path, monkeypatch):
    from lightning_dd.methods.statistics_matching import squeeze
    from lightning_dd.runner import build_datamodule

    cfg = _digits_cfg(tmp_path, monkeypatch)
    dm = build_datamodule(cfg.data)
    dm.setup()
    tcfg = {"epochs": 1, "lr": 0.05, "batch_size": 64, "weight_decay": 0.0, "label_smoothing": 0.0}
    net_cfg = {"name": "ConvNet", "width": 8, "depth": 2, "norm": "batchnorm"}
    a = squeeze(net_cfg, dm, tcfg, tmp_path / "teachers", accelerator="cpu")
    b = squeeze(net_cfg, dm, tcfg, tmp_path / "teachers", accelerator="cpu")
    assert not a["cached"] and b["cached"] and a["path"] == b["path"] and b["test_acc"] == a["test_acc"]
    assert not b["net"].training
    assert all(torch.equal(v, b["net"].state_dict()[k]) for k, v in a["net"].state_dict().items())
    torch.save({"net_cfg": {**net_cfg, "width": 16}, "state_dict": a["net"].state_dict()}, a["path"])
    with pytest.raises(ValueError, match="cached teacher does not fit"):  # lightning_dd.nets.load_net_file's check
        squeeze(net_cfg, dm, tcfg, tmp_path / "teachers", accelerator="cpu")


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
