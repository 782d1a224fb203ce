"""Trajectory matching: the loss, its two meta-gradients, the window schedule, DATM's init."""
import pytest
import torch

from lightning_dd.augment.dsa import DSA
from lightning_dd.methods.images.meta_grad import StudentFunctions, StudentStep, matching_loss_and_grads
from lightning_dd.methods.images.trajectory_matching import (TrajectoryMatching, expert_soft_labels,
                                                      select_correct_samples, window_upper_bound)
from lightning_dd.nets import FlatParams, build_net
from configs import method, run_context


def _problem(seed=0, n=12, soft=True, width=8):
    torch.manual_seed(seed)
    net = build_net("ConvNet", 3, 4, (8, 8), width=width, depth=2)
    flat = FlatParams(net)
    images = torch.randn(n, 3, 8, 8, requires_grad=True)
    labels = torch.randn(n, 4, requires_grad=True) if soft else torch.arange(n) % 4
    lr = torch.tensor(0.05, requires_grad=True)
    return net, flat, images, labels, lr


def _steps(n, k, batch, dsa=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(k):
        idx = torch.randperm(n, generator=g)[:batch]
        out.append(StudentStep(idx, dsa.sample(batch, (8, 8), generator=g) if dsa else None))
    return out


def test_loss_is_zero_when_student_reproduces_the_expert():
    net, flat, images, labels, lr = _problem()
    fns = StudentFunctions(flat)
    steps = _steps(12, 5, 6)
    theta0 = flat.flatten()
    # the "expert" makes exactly the student's updates
    theta = theta0.clone()
    for st in steps:
        theta = theta - lr.detach() * fns.grad(theta, images[st.idx].detach(), labels[st.idx].detach())
    loss = matching_loss_and_grads(fns, images, labels, lr, theta0, theta, steps)
    assert loss.item() < 1e-10
    assert images.grad.abs().max() < 1e-6 and lr.grad.abs() < 1e-6
    # and is positive against a different target
    images.grad = None
    other = matching_loss_and_grads(fns, images, labels, lr, theta0, theta + 0.01 * torch.randn_like(theta), steps)
    assert other.item() > 1e-3


@pytest.mark.parametrize("soft", [True, False])
def test_recompute_meta_gradient_equals_unrolled(soft):
    dsa = DSA()
    grads = {}
    for mode in ("unroll", "recompute"):
        net, flat, images, labels, lr = _problem(soft=soft)
        fns = StudentFunctions(flat)
        theta0 = flat.flatten()
        target = theta0 + 0.05 * torch.randn(theta0.shape, generator=torch.Generator().manual_seed(5))
        loss = matching_loss_and_grads(fns, images, labels, lr, theta0, target, _steps(12, 6, 5, dsa), dsa, mode)
        grads[mode] = (loss, images.grad.clone(), lr.grad.clone(), labels.grad.clone() if soft else None)
    (l1, gi1, gl1, gy1), (l2, gi2, gl2, gy2) = grads["unroll"], grads["recompute"]
    assert torch.allclose(l1, l2, rtol=1e-5)
    assert gi1.abs().max() > 0
    assert torch.allclose(gi1, gi2, rtol=1e-3, atol=1e-6 * gi1.abs().max())
    assert torch.allclose(gl1, gl2, rtol=1e-3)
    if soft:
        assert torch.allclose(gy1, gy2, rtol=1e-3, atol=1e-6 * gy1.abs().max())


def test_unknown_meta_grad_mode():
    net, flat, images, labels, lr = _problem()
    with pytest.raises(ValueError, match="unroll.*recompute"):
        matching_loss_and_grads(StudentFunctions(flat), images, labels, lr, flat.flatten(), flat.flatten() + 1,
                                _steps(12, 1, 4), mode="tesla-approx")


def test_window_grows_from_current_to_max_start_epoch():
    kw = dict(min_start_epoch=0, current_max_start_epoch=10, max_start_epoch=20, expansion_end_epoch=1000)
    assert window_upper_bound(0, sequential_generation=True, **kw) == 10
    assert window_upper_bound(500, sequential_generation=True, **kw) == 15
    assert window_upper_bound(1000, sequential_generation=True, **kw) == 20
    assert window_upper_bound(5000, sequential_generation=True, **kw) == 20
    seq = [window_upper_bound(i, sequential_generation=True, **kw) for i in range(0, 1200, 50)]
    assert seq == sorted(seq)
    assert window_upper_bound(0, sequential_generation=False, **kw) == 20  # MTT: fixed window


def test_window_rounds_as_datm():
    """DATM's ``distill/DATM.py`` computes ``current + int((max - current) * it / end)``: at
    (current 0, max 50, end 100, it 58) that is 29, where ``int(50 * (58 / 100))`` gives 28 (the
    rounding this module had; mutation-checked)."""
    kw = dict(min_start_epoch=0, current_max_start_epoch=0, max_start_epoch=50, expansion_end_epoch=100)
    assert window_upper_bound(58, sequential_generation=True, **kw) == 29


def test_soft_labels_average_only_correct_experts():
    labels = torch.tensor([0, 1])
    e1 = torch.tensor([[2.0, 0.0], [3.0, 0.0]])  # right on image 0, wrong on image 1
    e2 = torch.tensor([[4.0, 1.0], [0.0, 5.0]])  # right on both
    soft = expert_soft_labels(torch.zeros(2, 1), labels, [lambda x: e1, lambda x: e2])
    assert torch.allclose(soft[0], (e1[0] + e2[0]) / 2)
    assert torch.allclose(soft[1], e2[1])  # the wrong expert is left out
    assert torch.equal(soft.argmax(1), labels)


def test_init_selects_samples_the_expert_predicts_correctly():
    x = torch.randn(200, 5)
    y = torch.randint(0, 3, (200,))
    w = torch.randn(5, 3)
    predictor = lambda z: z @ w  # noqa: E731
    idx = select_correct_samples(x, y, 3, 4, [predictor], torch.Generator().manual_seed(0), chunk=16)
    assert idx.shape == (12,)
    assert torch.equal(y[idx], torch.arange(3).repeat_interleave(4))
    assert torch.equal(predictor(x[idx]).argmax(1), y[idx])


def test_distillation_lowers_the_matching_loss():
    """A few iterations against a real expert trajectory: the loss goes down."""
    torch.manual_seed(0)
    from lightning_dd.data import DigitsDataModule

    dm = DigitsDataModule()
    dm.setup()
    net = build_net("ConvNet", 1, 10, (8, 8), width=16, depth=2)
    flat = FlatParams(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    traj = [flat.flatten()]
    for ep in range(3):
        for i in range(0, len(dm.train_labels), 64):
            loss = torch.nn.functional.cross_entropy(net(dm.train_images[i:i + 64]), dm.train_labels[i:i + 64])
            opt.zero_grad(), loss.backward(), opt.step()
        traj.append(flat.flatten())
    hp = method("datm", soft_labels=True, lr_teacher=0.05, lr_img=100, lr_lr=1e-5, lr_y=2.0, momentum_y=0.9,
                min_start_epoch=0, current_max_start_epoch=1, max_start_epoch=1, expansion_end_epoch=1,
                sequential_generation=False, syn_steps=10, batch_syn=None, expert_epochs=1, expert_train_epochs=3,
                threshold=10.0, meta_grad="unroll")
    x, y = dm.random_subset(1, 0)
    module = TrajectoryMatching(x, torch.nn.functional.one_hot(y, 10).float() * 3, [torch.stack(traj)], net, hp,
                                None)
    module.on_fit_start()
    opt = module.configure_optimizers()
    losses = []
    for it in range(30):
        expert, start, upper, steps = module.sample_iteration(0)  # the same segment and batches each time
        opt.zero_grad()
        losses.append(matching_loss_and_grads(module.fns, module.images, module.labels, module.syn_lr,
                                              traj[start], traj[start + 1], steps, None).item())
        opt.step()
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5


def test_check_reads_the_typed_net_and_trainer_factory():
    """``check(ctx)``: a batchnorm student, more processes (``trainer.devices x num_nodes``) than expert
    draws, and a strategy other than one device or ``ddp`` are refused before any data is read."""
    from lightning_dd.core.config import ConfigError
    from lightning_dd.core.trainer import TrainerFactory

    def ctx(norm="instancenorm", **trainer):
        return run_context(net={"name": "ConvNet", "norm": norm},
                           make_trainer=TrainerFactory(accelerator="cpu", **trainer))

    hp = method("datm", expert_draws=2)
    hp.check(ctx(devices=2, strategy="ddp"))
    with pytest.raises(ConfigError, match="net.norm"):
        hp.check(ctx("batchnorm"))
    with pytest.raises(ConfigError, match=r"expert_draws: 2 .* over 4 processes"):
        hp.check(ctx(devices=2, strategy="ddp", num_nodes=2))
    with pytest.raises(ConfigError, match="trainer.strategy"):
        hp.check(ctx(devices=2, strategy="ddp_spawn"))
