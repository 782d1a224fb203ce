"""Trajectory matching against the authors' distillation scripts (fixtures of
``gen_trajectory_matching.py``): MTT's ``distill.py`` (hard labels) and DATM's ``distill/DATM.py``
(learnable soft labels), one iteration each, with DSA off and on.

From the same expert trajectory, synthetic images, labels and ``syn_lr``, and a generator in the
state of the reference's RNG at its inner loop (so :func:`draw_student_steps` draws the reference's
minibatch permutations and DSA parameters), our :func:`matching_loss_and_grads` gives the
reference's matching loss after 6 student steps and its gradients w.r.t. the images, ``syn_lr`` and
the soft labels -- in every meta-gradient mode. Tolerances (float32, different summation order of a
6-step double backward): loss 1e-5 relative; gradients 1e-4 relative plus 1e-5 of the gradient's
largest entry.

Mutations checked (each made these tests fail, then restored): the last chunk of the permutation
taken first replaced by the first (``chunks.pop(0)``); the loss denominator squared distance of the
start to the target replaced by the number of parameters; hard-label CE replaced by label smoothing
0.1 in ``label_loss``; the soft-label CE's target softmax at temperature 2; ``recompute``'s Hessian
term dropped (TESLA's approximation: ``adj = adj``); ConvNet's instance norm as ``GroupNorm(4, width)``.
"""
import pytest
import torch

from fixture_io import load_fixture

from lightning_dd.augment.dsa import DSA
from lightning_dd.methods.images.meta_grad import MODES, StudentFunctions, draw_student_steps, matching_loss_and_grads
from lightning_dd.methods.images.trajectory_matching import expert_soft_labels
from lightning_dd.nets import FlatParams
from lightning_dd.nets.convnet import ConvNet

pytestmark = pytest.mark.parity
C, K, HW, WIDTH, DEPTH = 3, 4, 8, 16, 2
BATCH_SYN, SYN_STEPS, EXPERT_EPOCHS = 5, 6, 2
CASES = [("trajectory_matching", "mtt_no_dsa"), ("trajectory_matching", "mtt_dsa"),
         ("trajectory_matching_datm", "datm_no_dsa"), ("trajectory_matching_datm", "datm_dsa")]


def _net() -> ConvNet:
    return ConvNet(channel=C, num_classes=K, im_size=(HW, HW), width=WIDTH, depth=DEPTH, norm="instancenorm")


def _close(ours, ref, what):
    scale = ref.abs().max().clamp(min=1e-12)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=float(1e-5 * scale), msg=lambda m: f"{what}: {m}")


def test_convnet_forward_and_flat_layout_equal_the_reference():
    """Our ConvNet-16-2 (instance norm) with the reference ConvNet's state dict (same names, same
    shapes) gives its logits; our flat parameter vector has ``ReparamModule``'s layout (a flat vector
    through :class:`FlatParams` gives the logits of the reference's ``ReparamModule`` with it).
    Tolerance 1e-5 absolute."""
    case = load_fixture("trajectory_matching")["cases"]["convnet"]
    net = _net()
    net.load_state_dict(case["state_dict"], strict=True)
    torch.testing.assert_close(net(case["x"]), case["logits"], atol=1e-5, rtol=0)
    flat = FlatParams(net)
    torch.testing.assert_close(flat.flatten(), torch.cat([v.reshape(-1) for v in case["state_dict"].values()]))
    torch.testing.assert_close(flat.call(case["flat"], case["x"]), case["logits_flat"], atol=1e-5, rtol=0)


def _ours(fixture: str, name: str, mode: str, compile: bool = False):
    cases = load_fixture(fixture)["cases"]
    case, traj = cases[name], cases["expert"]["trajectory"]
    images = case["images"].clone().requires_grad_(True)
    soft = "labels" in case
    labels = case["labels"].clone().requires_grad_(True) if soft else cases["expert"]["labels"].clone()
    syn_lr = case["syn_lr"].clone().requires_grad_(True)
    dsa = DSA() if case["dsa"] else None  # the reference strategy, mode S
    g = torch.Generator()
    g.set_state(case["rng_state"])
    steps = draw_student_steps(len(images), BATCH_SYN, SYN_STEPS, g, dsa, (HW, HW))
    start = case["start_epoch"]
    loss = matching_loss_and_grads(StudentFunctions(FlatParams(_net()), compile=compile), images, labels, syn_lr,
                                   traj[start], traj[start + EXPERT_EPOCHS], steps, dsa, mode=mode)
    return case, loss, images.grad, syn_lr.grad, labels.grad if soft else None


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fixture, name", CASES, ids=[c[1] for c in CASES])
def test_matching_loss_and_meta_gradients_equal_the_reference(fixture, name, mode):
    """One iteration of the reference's loop (MTT: hard labels, CE; DATM: soft-label logits, soft CE;
    DSA off / on): the normalized parameter-matching loss after 6 unrolled steps with minibatches of
    5 of 12 images, and its gradients w.r.t. the images, ``syn_lr`` and (DATM) the soft labels, for
    each ``method.meta_grad`` mode."""
    case, loss, g_img, g_lr, g_y = _ours(fixture, name, mode)
    torch.testing.assert_close(loss, case["loss"], rtol=1e-5, atol=0)
    _close(g_img, case["grad_images"], "images")
    _close(g_lr, case["grad_syn_lr"], "syn_lr")
    if g_y is not None:
        _close(g_y, case["grad_labels"], "soft labels")


@pytest.mark.slow
@pytest.mark.parametrize("fixture, name", [CASES[1], CASES[3]], ids=[CASES[1][1], CASES[3][1]])
def test_compiled_recompute_equals_the_reference(fixture, name):
    """``recompute`` with its per-step functions compiled (``auto``'s choice for ConvNet at >= 32x32
    pixels) gives the reference's loss and gradients (DSA on; MTT and DATM)."""
    case, loss, g_img, g_lr, g_y = _ours(fixture, name, "recompute", compile=True)
    torch.testing.assert_close(loss, case["loss"], rtol=1e-5, atol=0)
    _close(g_img, case["grad_images"], "images")
    _close(g_lr, case["grad_syn_lr"], "syn_lr")
    if g_y is not None:
        _close(g_y, case["grad_labels"], "soft labels")


def test_datm_soft_label_init_is_the_experts_last_epoch_logits():
    """DATM's label init for real-image init (``pix_init=real``): the logits of the expert's last
    epoch on the synthetic images (:func:`expert_soft_labels` with one expert). Tolerance 1e-5."""
    cases = load_fixture("trajectory_matching_datm")["cases"]
    traj, case = cases["expert"]["trajectory"], cases["datm_no_dsa"]
    flat = FlatParams(_net())
    hard = torch.arange(K).repeat_interleave(len(case["images"]) // K)
    labels = expert_soft_labels(case["images"], hard, [lambda x: flat.call(traj[-1], x)])
    torch.testing.assert_close(labels, case["labels"], atol=1e-5, rtol=0)
