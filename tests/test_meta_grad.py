"""method.meta_grad=auto: the decision rule, its inputs (compile verification, unroll's predicted
memory, free memory) and that the mode it picks gives the unrolled meta-gradient."""
import pytest
import torch

from lightning_dd.augment.dsa import DSA
from lightning_dd.methods.images import meta_grad as mg
from lightning_dd.methods.images.meta_grad import (MetaGradChoice, StudentFunctions, StudentStep, available_memory_bytes,
                                            choose_meta_grad, compile_verified, matching_loss_and_grads,
                                            resolve_meta_grad, unroll_memory_bytes)
from lightning_dd.methods.images.trajectory_matching import TrajectoryMatching
from lightning_dd.nets import FlatParams, build_net
from configs import method

GiB = 2**30


def test_choose_compiled_recompute_when_compile_is_verified():
    for predicted, available in [(1, 100 * GiB), (100 * GiB, 1), (None, None)]:
        c = choose_meta_grad(True, predicted, available)
        assert (c.mode, c.compile, c.label) == ("recompute", True, "recompute+compile")


def test_choose_unroll_only_when_its_memory_fits_with_margin():
    assert choose_meta_grad(False, 7 * GiB, 10 * GiB).label == "unroll"
    assert choose_meta_grad(False, 8 * GiB, 10 * GiB).label == "unroll"  # exactly 80%
    assert choose_meta_grad(False, 8 * GiB + 1, 10 * GiB).label == "recompute"
    assert choose_meta_grad(False, 26 * GiB, 20 * GiB).label == "recompute"
    assert choose_meta_grad(False, 26 * GiB, 40 * GiB, margin=0.5).label == "recompute"
    c = choose_meta_grad(False, 26 * GiB, 20 * GiB)
    assert not c.compile and "26.00 GiB exceeds" in c.reason
    # unknown figures: the mode whose memory does not grow with syn_steps
    assert choose_meta_grad(False, None, 10 * GiB).label == "recompute"
    assert choose_meta_grad(False, GiB, None).label == "recompute"


def _never():
    raise AssertionError("predicted unroll memory although it is not needed")


def test_resolve_explicit_modes_and_compile_flag():
    cpu = torch.device("cpu")
    assert resolve_meta_grad("unroll", None, True, _never, cpu) == MetaGradChoice("unroll", False,
                                                                                    "method.meta_grad=unroll")
    assert resolve_meta_grad("recompute", None, True, _never, cpu).label == "recompute+compile"
    assert resolve_meta_grad("recompute", None, False, _never, cpu).label == "recompute"
    assert resolve_meta_grad("recompute", False, True, _never, cpu).label == "recompute"
    assert resolve_meta_grad("auto", None, True, _never, cpu).label == "recompute+compile"
    assert resolve_meta_grad("auto", True, False, _never, cpu).reason == "method.compile=true"
    with pytest.raises(ValueError, match="'auto', 'unroll' or 'recompute'"):
        resolve_meta_grad("tesla", None, True, _never, cpu)


def test_resolve_auto_without_compile_compares_prediction_to_free_memory(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(mg, "available_memory_bytes", lambda device: 10 * GiB)
    assert resolve_meta_grad("auto", None, False, lambda: GiB, cpu).label == "unroll"
    assert resolve_meta_grad("auto", None, False, lambda: 9 * GiB, cpu).label == "recompute"
    c = resolve_meta_grad("auto", False, True, lambda: GiB, cpu)  # compile switched off by the user
    assert c.label == "unroll" and c.reason.startswith("method.compile=false")

    def oom():
        raise torch.OutOfMemoryError("one step")
    assert resolve_meta_grad("auto", None, False, oom, cpu).label == "recompute"


def test_compile_verified_by_architecture_and_image_size():
    assert compile_verified(build_net("ConvNet", 3, 10, (32, 32), width=8, depth=3), (3, 32, 32))
    assert not compile_verified(build_net("ConvNet", 1, 10, (8, 8), width=8, depth=2), (1, 8, 8))
    assert not compile_verified(build_net("AlexNet", 3, 10, (32, 32)), (3, 32, 32))


def test_available_memory_is_positive_on_cpu():
    free = available_memory_bytes(torch.device("cpu"))
    assert free is None or 0 < free < 2**50


def _problem(width=8, n=12, hw=8, soft=True, seed=0):
    torch.manual_seed(seed)
    net = build_net("ConvNet", 3, 4, (hw, hw), width=width, depth=2)
    flat = FlatParams(net)
    images = torch.randn(n, 3, hw, hw, requires_grad=True)
    labels = torch.randn(n, 4, requires_grad=True) if soft else torch.arange(n) % 4
    return net, flat, images, labels, torch.tensor(0.05, requires_grad=True)


def test_unroll_prediction_grows_with_steps_batch_and_width():
    dsa = DSA()

    def predict(width=8, batch=6, steps=10):
        net, flat, images, labels, lr = _problem(width=width)
        st = StudentStep(torch.arange(batch), dsa.sample(batch, (8, 8), generator=torch.Generator().manual_seed(0)))
        return unroll_memory_bytes(StudentFunctions(flat), images, labels, lr, st, dsa, steps), flat.flatten().numel()

    base, p = predict()
    assert predict(steps=21)[0] == pytest.approx(2 * base, rel=1e-3)  # (steps + 1) x one step
    # one step keeps at least the parameter vector and the first conv's input and output
    assert base >= 1.25 * 11 * 4 * (p + 6 * 3 * 64 + 6 * 8 * 64)
    assert predict(batch=12)[0] > 1.5 * base
    assert predict(width=32)[0] > 2 * base


def _module(hw, meta_grad="auto", compile=None, width=8):
    net, flat, images, labels, lr = _problem(width=width, hw=hw)
    trajs = [torch.stack([flat.flatten() + 0.01 * i for i in range(4)])]
    hp = method("datm", ipc=3, syn_steps=5, batch_syn=6, expert_epochs=1, min_start_epoch=0,
                current_max_start_epoch=1, max_start_epoch=2, expert_train_epochs=3, meta_grad=meta_grad,
                compile=compile)
    return TrajectoryMatching(images.detach(), labels.detach(), trajs, net, hp, DSA())


def test_auto_on_the_module_picks_per_net_and_memory(monkeypatch, caplog):
    caplog.set_level("INFO")
    m = _module(32)  # ConvNet on 32x32 images: compile verified (torch.compile is lazy: nothing compiles here)
    m.on_fit_start()
    assert m.meta_grad.label == "recompute+compile"
    assert "method.meta_grad=auto runs recompute+compile" in caplog.text
    m = _module(8)  # 8x8: compiling does not pay; unroll fits a tiny net
    m.on_fit_start()
    assert m.meta_grad.label == "unroll" and "fits" in m.meta_grad.reason
    monkeypatch.setattr(mg, "available_memory_bytes", lambda device: 1024)
    m = _module(8)
    m.on_fit_start()
    assert m.meta_grad.label == "recompute" and "exceeds" in m.meta_grad.reason


def _grads(mode, fns_compile, soft=True, hw=8, width=8):
    dsa = DSA()
    net, flat, images, labels, lr = _problem(width=width, hw=hw, soft=soft)
    fns = StudentFunctions(flat, compile=fns_compile)
    theta0 = flat.flatten()
    target = theta0 + 0.05 * torch.randn(theta0.shape, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(0)
    steps = [StudentStep(torch.randperm(12, generator=g)[:5], dsa.sample(5, (hw, hw), generator=g)) for _ in range(6)]
    loss = matching_loss_and_grads(fns, images, labels, lr, theta0, target, steps, dsa, mode)
    return loss, images.grad, lr.grad, labels.grad if soft else None


def _assert_same(a, b):
    (l1, gi1, gl1, gy1), (l2, gi2, gl2, gy2) = a, b
    assert torch.allclose(l1, l2, rtol=1e-5)
    assert gi1.abs().max() > 0
    assert torch.allclose(gi1, gi2, rtol=1e-3, atol=1e-5 * gi1.abs().max())
    assert torch.allclose(gl1, gl2, rtol=1e-3)
    if gy1 is not None:
        assert torch.allclose(gy1, gy2, rtol=1e-3, atol=1e-5 * gy1.abs().max())


@pytest.mark.parametrize("soft", [True, False])
def test_every_mode_auto_can_pick_gives_the_unrolled_gradient(soft):
    ref = _grads("unroll", False, soft)
    for label in ("unroll", "recompute"):
        _assert_same(ref, _grads(label, False, soft))


@pytest.mark.slow
def test_compiled_recompute_gives_the_unrolled_gradient():
    """The mode ``auto`` picks for a ConvNet on 32x32 images (compiles: ~30 s on one CPU core)."""
    assert compile_verified(build_net("ConvNet", 3, 4, (32, 32), width=8, depth=2), (3, 32, 32))
    _assert_same(_grads("unroll", False, hw=32), _grads("recompute", True, hw=32))


def test_benchmark_reference_style_loop_is_the_same_computation():
    """benchmarks/distill_iteration.py's reference-style row (flat-vector ConvNet, list of parameter
    vectors, autograd.grad at the end) computes the loss and gradients of ``unroll``."""
    from conftest import load_script

    bench = load_script("benchmarks/distill_iteration.py")
    dsa = DSA()
    net, flat, images, labels, lr = _problem(hw=16)
    shapes = [(k, tuple(p.shape)) for k, p in net.named_parameters()]
    theta0 = flat.flatten()
    x = images[:3].detach()
    assert torch.allclose(bench.reference_forward(theta0, x, shapes, 2), net(x), atol=1e-5)
    target = theta0 + 0.05 * torch.randn(theta0.shape, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randperm(12, generator=g)[:5], dsa.sample(5, (16, 16), generator=g)) for _ in range(4)]
    loss_u = matching_loss_and_grads(StudentFunctions(flat), images, labels, lr, theta0, target,
                                     [StudentStep(i, a) for i, a in batches], dsa, "unroll")
    grads_u = (images.grad, labels.grad, lr.grad)
    loss_r, grads_r = bench.reference_iteration(theta0, target, images, labels, lr, batches, dsa, shapes, 2)
    assert torch.allclose(loss_u, loss_r, rtol=1e-5)
    for a, b in zip(grads_u, grads_r):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6 * b.abs().max())
