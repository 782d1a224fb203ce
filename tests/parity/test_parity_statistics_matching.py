"""SRe2L / CDA / G-VBSM recovery against the authors' code (fixture: ``gen_statistics_matching.py``;
SRe2L's ``recover_cifar.py`` and ``utils.py``, CDA's ``recover_cda_in1k.py``, G-VBSM's CIFAR-10
``utils.py`` hooks and ``main_worker``).

Tolerances (float32): losses ``rtol 1e-5``; pixel gradients ``rtol 1e-4, atol 1e-7``; images after
the Adam steps ``rtol 1e-4, atol 1e-5`` (Adam's first steps are close to ``lr * sign(grad)``, so
a pixel whose gradient is near 0 moves by a rounding-sensitive amount); lr values and crop-scale
bounds ``1e-12`` (float64 arithmetic on both sides); the crop views exact up to ``1e-6`` (the
same torchvision ops on the same RNG stream); G-VBSM's real-data statistics ``rtol 1e-5, atol 1e-6``.
"""
import lightning as L
import pytest
import torch
from configs import node
from fixture_io import load_fixture
from lightning_dd.core.trainer import TrainerFactory
from lightning_dd.methods.images.statistics_matching import (Backbone, RecoverConfig, RecoverModule, batch_crop_flip,
                                                             conv_statistics, recover_batch)
from lightning_dd.nets import build_net

pytestmark = pytest.mark.parity

CASES = load_fixture("statistics_matching")["cases"]
CPU = TrainerFactory(accelerator="cpu", enable_progress_bar=False)


def recover_config(**settings) -> RecoverConfig:
    """``conf/method/sre2l.yaml``'s ``recover`` settings (SRe2L's) with ``settings`` changed."""
    return RecoverConfig(**{**node("method", "sre2l")["recover"], **settings})


def _draw(spec: dict) -> torch.Tensor:
    """A large input stored as its seed (see the generator's ``seeded``), checked against its sum."""
    x = torch.randn(*spec["shape"], generator=torch.Generator().manual_seed(spec["seed"])) * spec["std"] + spec["shift"]
    assert float(x.double().sum()) == pytest.approx(spec["sum"], rel=1e-9), "the seeded input was not reproduced"
    return x


def _net(state_dict, classes: int, size: int):
    net = build_net("ConvNet", 3, classes, (size, size), width=8, depth=2, norm="batchnorm")
    net.load_state_dict(state_dict)
    return net.eval()


class _Steps(L.Callback):
    """Records each recovery step's lr, pixel gradient (before the step) and loss."""

    def __init__(self):
        self.lr, self.grad, self.loss = [], [], []

    def on_before_optimizer_step(self, trainer, module, optimizer):
        self.lr.append(optimizer.param_groups[0]["lr"])
        self.grad.append(module.slot_images(0).grad.detach().clone())

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.loss.append(float(outputs["loss"]))


def test_bn_statistics_loss_and_its_gradient_equal_bnfeaturehook():
    """Pins ``Backbone.stat_losses`` / ``StatsHooks.loss`` (SRe2L Eq. 6): per BN layer
    ``||var - running_var||_2 + ||mean - running_mean||_2`` of the layer's input (biased variance),
    summed with ``first_bn_multiplier`` on the first BN layer; value and gradient w.r.t. the images.
    Mutations checked: unbiased variance in ``channel_stats`` (fails); the first multiplier applied
    to the last BN layer in ``StatsHooks.loss`` (fails)."""
    case = CASES["bn_loss"]
    net = _net(case["state_dict"], case["classes"], case["size"])
    x = _draw(case["images"]).requires_grad_(True)
    b = Backbone(net)
    net(x)
    bn, conv = b.stat_losses(case["first_bn_multiplier"])
    assert conv is None
    bn.backward()
    b.remove()
    torch.testing.assert_close(bn.detach(), case["loss"], rtol=1e-5, atol=0)
    torch.testing.assert_close(x.grad, case["grad"], rtol=1e-4, atol=1e-7)


def test_recover_lr_is_lr_cosine_policy():
    """Pins the recovery lr schedule (``RecoverModule.configure_optimizers``): SRe2L's
    ``lr_cosine_policy(lr, 0, iterations)``, ``0.5 (1 + cos(pi i / T)) lr`` at iteration ``i``.
    Mutation checked: ``min(s, total) / total`` -> ``(s + 1) / total`` (fails)."""
    case = CASES["lr_cosine"]
    hp = recover_config(iterations=case["iterations"], lr=case["base_lr"])
    m = RecoverModule(torch.zeros(1, 3, 4, 4), torch.zeros(1, dtype=torch.long), [], hp, torch.zeros(3), torch.ones(3))
    conf = m.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    lrs, i = [], 0
    for at in case["at"]:
        while i < at:
            opt.step()
            sched.step()
            i += 1
        lrs.append(opt.param_groups[0]["lr"])
    torch.testing.assert_close(torch.tensor(lrs, dtype=torch.float64), case["lr"], rtol=1e-12, atol=1e-15)


def test_four_recovery_steps_equal_recover_cifar():
    """Pins one SRe2L recovery fit (``recover_batch``: ``RecoverModule`` under a Lightning Trainer)
    against four iterations of ``recover_cifar.get_images`` (jitter 0, no crop, no flip: the CIFAR
    recovery's settings but the roll): each step's loss ``CE + r_bn R_BN``, lr, the first step's
    pixel gradient, and the images after four Adam (betas 0.5, 0.9, eps 1e-8) steps, each followed
    by the clip to the valid pixel range. Mutations checked: Adam betas (0.9, 0.999) (final images
    fail); the clip removed from ``optimizer_step`` (final images fail); ``r_bn`` applied twice in
    ``total_loss`` (loss fails)."""
    case = CASES["sre2l_recover"]
    ref = CASES["bn_loss"]
    net = _net(ref["state_dict"], ref["classes"], ref["size"])
    assert (case["betas"], case["eps"]) == ([0.5, 0.9], 1e-8)
    hp = recover_config(iterations=case["iterations"], batch=100, lr=case["lr"], r_bn=case["r_bn"],
                        first_bn_multiplier=case["first_bn_multiplier"], jitter=case["jitter"], flip=False,
                        crop_scale=(1.0, 1.0))
    steps = _Steps()
    b = Backbone(net)
    x, _ = recover_batch(_draw(case["init"]), case["labels"], [b], hp, case["lo"], case["hi"], seed=0, batch_index=0,
                         ckpt_dir=None, trainer=CPU, callbacks=[steps])
    b.remove()
    torch.testing.assert_close(torch.tensor(steps.lr, dtype=torch.float64), case["step_lr"], rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.tensor(steps.loss, dtype=torch.float64), case["step_loss"], rtol=1e-5, atol=0)
    torch.testing.assert_close(steps.grad[0][:len(case["grad0"])], case["grad0"], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(x[:len(case["final"])], case["final"], rtol=1e-4, atol=1e-5)
    assert float(x.double().sum()) == pytest.approx(case["final_sum"], abs=1e-5 * x.numel())  # atol per pixel


@pytest.mark.parametrize("mode", ["step", "linear", "cosine"])
@pytest.mark.parametrize("milestone", [1.0, 0.5])
def test_cda_crop_scale_bound_equals_recover_cda_in1k(mode, milestone):
    """Pins CDA's easy-to-hard curriculum as recovery uses it (``RecoverModule.augment``'s lower
    crop-scale bound with ``crop_scale [0.08, 1]``) at every one of 20 iterations, for each
    ``--easy2hard-mode`` and ``--milestone`` 1 and 0.5. Mutation checked: progress ``i / (milestone
    * T)`` -> ``(i + 1) / (milestone * T)`` in ``crop_scale_min`` (fails)."""
    case = CASES["cda_schedule"]
    hp = recover_config(iterations=case["iterations"], crop_schedule=mode, milestone=milestone, crop_scale=(0.08, 1.0),
                        jitter=0)
    m = RecoverModule(torch.zeros(2, 3, 8, 8), torch.zeros(2, dtype=torch.long), [], hp, -torch.ones(3), torch.ones(3))
    got = torch.tensor([m.augment(i)[1] for i in range(case["iterations"])], dtype=torch.float64)
    torch.testing.assert_close(got, case[f"{mode}_{milestone}"], rtol=1e-12, atol=1e-15)


def test_batch_crop_and_flip_equal_cdas_aug_function():
    """Pins the per-batch crop + flip (``batch_crop_flip``, the default ``crop_per_image=false``):
    one ``RandomResizedCrop(size, scale=(min_crop, 1))`` box and one ``RandomHorizontalFlip`` for
    the whole batch, as CDA's ``aug_function`` draws them after ``torch.manual_seed(seed)``, at four
    iterations of the cosine curriculum and three seeds each (224-px images). Mutation checked:
    the flip before the crop in ``batch_crop_flip`` (fails)."""
    for key, v in CASES["cda_views"].items():
        x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(v["input_seed"]))
        view = batch_crop_flip(x, v["seed"], scale=tuple(v["scale"]), flip=True)
        torch.testing.assert_close(view[:, :, ::28, ::28], v["sub"], rtol=1e-6, atol=1e-6, msg=key)
        assert float(view.double().sum()) == pytest.approx(v["sum"], rel=1e-6), key


def test_gvbsm_statistics_and_feature_loss_equal_its_hooks():
    """Pins G-VBSM's statistics (``conv_statistics``: per conv layer the input's channel mean and
    variance and its 4x4-patch mean and variance, averaged over batches of 64 weighted by size) and
    its feature loss (``Backbone.stat_losses``: BN + conv terms, the first-layer multiplier once, on
    the first hooked layer in module order -- here the stem conv) on 6-px images (patches after a
    bilinear resize to 8 px), with G-VBSM's moving averages (momentum 0.8, starting at 0: the first
    step matches ``0.2 s`` with the gradient of ``s``): statistics, loss value and gradient.
    Mutations checked: the average started at the first statistic instead of 0 (fails); conv
    statistics of the layer's output instead of its input (fails); patch cells of 2 px (fails); the
    first multiplier on both the first BN and the first conv layer (fails)."""
    case = CASES["gvbsm_stats"]
    net = _net(case["state_dict"], case["classes"], case["size"])
    stats = conv_statistics(net, _draw(case["real"]), batch_size=64)
    assert len(stats) == len(case["conv_stats"])
    for ours, theirs in zip(stats, case["conv_stats"]):
        for a, t in zip(ours, theirs):
            torch.testing.assert_close(a, t.float(), rtol=1e-5, atol=1e-6)
    b = Backbone(net, conv_targets=[tuple(t.float() for t in ts) for ts in case["conv_stats"]])
    assert b.first_is_conv and case["kinds"][0] == "conv"
    x = case["images"].clone().requires_grad_(True)
    net(x)
    bn, conv = b.stat_losses(case["first_multiplier"], case["momentum"])
    (bn + conv).backward()
    b.remove()
    torch.testing.assert_close((bn + conv).detach(), case["loss"], rtol=1e-5, atol=0)
    torch.testing.assert_close(x.grad, case["grad"], rtol=1e-4, atol=1e-7)


def test_three_gvbsm_recovery_steps_equal_main_worker():
    """Pins a G-VBSM recovery fit (``recover_batch`` with ``backbone_sampling=cycle``, one backbone
    per step, ``r_conv = r_bn = --r-loss``, ``r_nuc = --nuc-norm``) against three iterations of
    ``main_worker`` with two backbones (used 0, 1, 0) on 20 images, 2 per class (crop/flip and
    jitter off, conv drop rate 0; momentum 0.8: backbone 0's moving averages carry from step 0 to
    step 2): each step's loss ``CE + r_loss (BN + conv) + nuc_norm
    x eigenvalue KL``, lr, the first pixel gradient and the images after the steps. Mutations
    checked: ``cycle`` -> a random backbone (loss fails); the eigenvalue target not detached
    (gradient fails); ``tau`` applied to the log-softmax side (loss fails)."""
    case = CASES["gvbsm_recover"]
    nets = [_net(sd, case["classes"], case["size"]) for sd in case["state_dicts"]]
    bbs = [Backbone(n, conv_targets=[tuple(t.float() for t in ts) for ts in st]) for n, st in zip(nets, case["conv_stats"])]
    hp = recover_config(iterations=case["iterations"], batch=20, lr=case["lr"], r_bn=case["r_loss"], r_conv=case["r_loss"],
                        first_bn_multiplier=case["first_multiplier"], jitter=0, flip=False, crop_scale=(1.0, 1.0),
                        backbones_per_iter=1, backbone_sampling="cycle", r_nuc=case["nuc_norm"], nuc_tau=case["tau"],
                        stat_momentum=case["momentum"])
    steps = _Steps()
    x, hist = recover_batch(_draw(case["init"]), case["labels"], bbs, hp, case["lo"], case["hi"], seed=0, batch_index=0,
                            ckpt_dir=None, trainer=CPU, callbacks=[steps])
    for b in bbs:
        b.remove()
    assert [h["backbones"] for h in hist] == [[0], [1], [0]]
    m = RecoverModule(x, case["labels"], bbs, hp, case["lo"], case["hi"])  # G-VBSM's counter % n, further on
    assert [m.augment(step)[2] for step in range(10)] == [[step % 2] for step in range(10)]
    torch.testing.assert_close(torch.tensor(steps.lr, dtype=torch.float64), case["step_lr"], rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.tensor(steps.loss, dtype=torch.float64), case["step_loss"], rtol=1e-5, atol=0)
    torch.testing.assert_close(steps.grad[0][:len(case["grad0"])], case["grad0"], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(x[:len(case["final"])], case["final"], rtol=1e-4, atol=1e-5)
    assert float(x.double().sum()) == pytest.approx(case["final_sum"], abs=1e-5 * x.numel())  # atol per pixel
