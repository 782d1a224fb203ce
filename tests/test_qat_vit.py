"""QAT-ViT (arXiv 2307.00331) and weight selection (arXiv 2311.18823): quantizer against PyTorch's
learnable fake-quantize op, at most 2^b values per quantized tensor, the vectorized regularizer
against a per-bin loop, the integer export, fused-qkv loading and weight selection."""
import math

import pytest
import torch
from configs import compose_train, method

from lightning_dd.methods.quantization.qat_vit.model import (calibrate, export_quantized, load_quantized, quantize_vit,
                                                quantized_layers, quantizers)
from lightning_dd.methods.quantization.qat_vit.quantizer import Quantizer, mse_step, qrange
from lightning_dd.methods.quantization.qat_vit.regularizer import (OscillationTracker, bin_regularizer, bin_stats, ramp,
                                                      within_bin_variance)
from lightning_dd.nets.vit import ViT, load_vit_state, split_fused_qkv
from lightning_dd.nets.weight_selection import uniform_indices, weight_selection

SMALL = dict(patch_size=4, embed_dim=24, depth=2, num_heads=3)


def small_vit(seed=0, **kw):
    torch.manual_seed(seed)
    return ViT(3, 10, (16, 16), **{**SMALL, **kw})


@pytest.mark.parametrize("bits,signed", [(2, True), (3, False), (4, True), (8, False)])
@pytest.mark.parametrize("mode", ["reference", "lsq"])
def test_quantizer_matches_pytorch_learnable_fake_quantize(bits, signed, mode):
    """Forward values equal torch._fake_quantize_learnable_per_tensor_affine's; so do the gradients
    of x and of the step at the same gradient factor, except for inputs within half a step outside
    the range, where the reference clamps before it rounds and PyTorch's kernel rounds first (their
    upstream gradient is zeroed here; the parity tests pin those against the authors' code)."""
    torch.manual_seed(bits)
    x = (torch.randn(6, 50) * 1.3).requires_grad_()
    q = Quantizer(bits, signed, "act", grad_scale=mode)
    q.init_act(x.detach())
    with torch.no_grad():
        q.step.mul_(0.7)  # push some values outside the range
    qn, qp = qrange(bits, signed)
    u = x.detach() / q.step.detach()
    band = ((u > qp) & (u < qp + 0.5)) | ((u < qn) & (u > qn - 0.5))
    dy = torch.randn(6, 50).masked_fill(band, 0.0)
    y = q(x)
    (y * dy).sum().backward()
    x2 = x.detach().clone().requires_grad_()
    s2 = q.step.detach().clone().reshape(1).requires_grad_()
    zp = torch.zeros(1)
    g = q.grad_factor(x.detach())
    y2 = torch._fake_quantize_learnable_per_tensor_affine(x2, s2, zp, qn, qp, g)
    (y2 * dy).sum().backward()
    torch.testing.assert_close(y, y2, rtol=0, atol=1e-6)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(q.step.grad.reshape(1), s2.grad, rtol=1e-4, atol=1e-6)
    assert ((y.detach() / q.step.detach()).round() - y.detach() / q.step.detach()).abs().max() < 1e-4


def test_gradient_factor_conventions():
    """The reference's step-gradient factors: 1/sqrt(sum|w| Qp) (weights), 1/(sqrt(numel) Qp)
    (activations, QuantAct); LSQ's 1/sqrt(N Qp)."""
    w = torch.randn(8, 16)
    ref = Quantizer(4, True, "weight", grad_scale="reference").grad_factor(w)
    lsq = Quantizer(4, True, "weight", grad_scale="lsq").grad_factor(w)
    assert math.isclose(ref, 1 / math.sqrt(float(w.abs().sum()) * 7), rel_tol=1e-6)
    assert math.isclose(lsq, 1 / math.sqrt(128 * 7), rel_tol=1e-6)
    x = torch.randn(5, 4, 6)
    assert math.isclose(Quantizer(4, True, "act").grad_factor(x), 1 / (math.sqrt(120) * 7), rel_tol=1e-6)
    assert math.isclose(Quantizer(4, False, "act").grad_factor(x), 1 / (math.sqrt(120) * 15), rel_tol=1e-6)
    assert math.isclose(Quantizer(4, True, "act", grad_scale="lsq").grad_factor(x), 1 / math.sqrt(24 * 7),
                        rel_tol=1e-6)


def test_offset_quantizer_matches_fake_quantize_with_zero_point():
    """An unsigned quantizer with offset beta = -zp * s equals the fake-quantize op with zero point zp."""
    x = torch.randn(200) * 0.5
    q = Quantizer(3, False, "act", offset=True)
    with torch.no_grad():
        q.step.fill_(0.125)
        q.beta.fill_(-2 * 0.125)
        q.initialized.fill_(True)
    y2 = torch._fake_quantize_learnable_per_tensor_affine(x, torch.tensor([0.125]), torch.tensor([2.0]), 0, 7, 1.0)
    torch.testing.assert_close(q(x), y2, rtol=0, atol=1e-6)


def test_mse_step_is_a_fixed_point_that_beats_max_scaling():
    w = torch.randn(4000)
    s = mse_step(w, -8, 7)
    err = lambda st: float(((w / st).round().clamp(-8, 7) * st - w).pow(2).mean())  # noqa: E731
    assert err(s) < err(w.abs().max() / 7) and err(s) <= err(s * 1.05) and err(s) <= err(s * 0.95)


def quantizer_outputs(model, x) -> dict:
    """``{quantizer name: (its bits, its output)}`` of one forward of ``model`` on ``x``."""
    seen = {}
    hooks = [q.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, (m.bits, o.detach())))
             for n, q in quantizers(model).items()]
    model(x)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_every_quantized_tensor_takes_at_most_2_to_the_b_values(bits):
    """Hooks on every quantizer: each quantized weight and activation tensor has <= 2^b distinct values
    (8 bits for the patch embedding and head); the blocks' weights and activations use the target bits."""
    model = calibrate(quantize_vit(small_vit(), bits), torch.randn(16, 3, 16, 16))
    seen = quantizer_outputs(model, torch.randn(8, 3, 16, 16))
    names = set(quantizers(model))
    assert set(seen) == names and len(names) == 2 * (6 + 8) + 4  # q/k/v share one input quantizer
    for name, (b, out) in seen.items():
        assert out.unique().numel() <= 2 ** b, name
        expect = 8 if name.startswith(("patch_embed", "head")) else bits
        assert b == expect, name
    assert sum(q.signed is False for q in quantizers(model).values()) == 2 * 2  # softmax + GELU output per block
    assert all(q.beta is not None for n, q in quantizers(model).items() if n.endswith("fc2.aq"))


def _naive_bin_reg(w, s, qn, qp):
    u = (w / s).clamp(qn, qp).flatten()
    q = u.detach().round()
    total = (u * s - q * s).pow(2).mean()
    for b in range(qn, qp + 1):
        sel = (u * s)[q == b]
        if sel.numel() > 1:
            total = total + sel.var()
    return total


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_vectorized_regularizer_equals_the_per_bin_loop(bits):
    torch.manual_seed(bits)
    qn, qp = qrange(bits, True)
    w = (torch.randn(64, 48, dtype=torch.float64) * 0.05).requires_grad_()  # float64: no cancellation noise
    s = mse_step(w, qn, qp).double()
    fast = bin_regularizer(w, s, qn, qp)
    (gf,) = torch.autograd.grad(fast, w)
    slow = _naive_bin_reg(w, s, qn, qp)
    (gs,) = torch.autograd.grad(slow, w)
    torch.testing.assert_close(fast, slow, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gf, gs, rtol=1e-7, atol=1e-9 * float(gs.abs().max()))
    cnt, _, var = bin_stats(w, s, qn, qp)
    assert cnt.numel() == 2 ** bits and int(cnt.sum()) == w.numel() and (var >= 0).all()


def test_regularizer_steps_lower_within_bin_variance_and_ramp_shape():
    w = (torch.randn(2000) * 0.1).requires_grad_()
    s = mse_step(w, -8, 7)
    before = within_bin_variance(w, s, -8, 7)
    opt = torch.optim.SGD([w], lr=1e-4)
    for _ in range(20):
        opt.zero_grad()
        bin_regularizer(w, s, -8, 7).backward()
        opt.step()
    assert within_bin_variance(w, s, -8, 7) < before
    assert ramp(0.1) == 0 and ramp(0.25) == 0 and math.isclose(ramp(1.0), 0.01) and 0 < ramp(0.6) < 0.01


def test_oscillation_tracker_counts_back_and_forth_flips():
    lay = torch.nn.Module()
    lay.weight = torch.nn.Parameter(torch.tensor([0.0, 0.0, 0.0, 0.0]))
    lay.wq = Quantizer(4, True, "weight")
    with torch.no_grad():
        lay.wq.step.fill_(1.0)
    tr = OscillationTracker({"l": lay})
    for vals in ([1.0, 1.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0], [1.0, 3.0, 0.0, 0.0]):
        lay.weight.data = torch.tensor(vals)
        tr.update()
    # weight 0 goes up, down, up: 2 oscillations in 3 steps over 4 weights; weight 1 only goes up
    assert math.isclose(tr.rates()["l"], 2 / 4 / 3)


def test_export_reloads_to_identical_predictions(tmp_path):
    from lightning_dd.io import atomic_save, safe_load

    model = calibrate(quantize_vit(small_vit(), 3), torch.randn(16, 3, 16, 16))
    cfg = {"_target_": "lightning_dd.nets.vit.ViT", **SMALL}
    atomic_save(export_quantized(model, cfg, 3, 3, 8, "reference"), tmp_path / "quantized.pt")
    d = safe_load(tmp_path / "quantized.pt")
    assert all(t.dtype == torch.int8 and t.unique().numel() <= 8 for n, t in d["int_weights"].items()
               if not n.startswith(("patch_embed", "head")))
    back = load_quantized(d, 3, 10, (16, 16))
    x = torch.randn(64, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(back(x), model.eval()(x))
    for n, lay in quantized_layers(back).items():
        assert torch.equal(lay.wq(lay.weight), quantized_layers(model)[n].wq(quantized_layers(model)[n].weight))


def test_fused_qkv_checkpoints_are_split_and_loaded_strictly():
    src = small_vit(1)
    state = src.state_dict()
    fused = {k: v for k, v in state.items() if ".attn.q." not in k and ".attn.k." not in k and ".attn.v." not in k}
    for i in range(SMALL["depth"]):
        for part in ("weight", "bias"):
            fused[f"blocks.{i}.attn.qkv.{part}"] = torch.cat([state[f"blocks.{i}.attn.{n}.{part}"] for n in "qkv"])
    assert set(split_fused_qkv(fused)) == set(state)
    dst = load_vit_state(small_vit(2), {f"module.{k}": v for k, v in fused.items()})
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(dst.eval()(x), src.eval()(x))
    with pytest.raises(ValueError, match="does not fit"):
        load_vit_state(small_vit(2), {k: v for k, v in fused.items() if k != "norm.weight"})


def test_weight_selection_picks_uniformly_spaced_elements_of_the_first_layers():
    assert uniform_indices(12, 4).tolist() == [0, 3, 6, 9]
    assert uniform_indices(10, 4).tolist() == [0, 3, 6, 9]
    assert uniform_indices(11, 4).tolist() == [0, 3, 7, 10]
    teacher = ViT(3, 10, (16, 16), 4, embed_dim=48, depth=4, num_heads=3)
    student = ViT(3, 7, (16, 16), 4, embed_dim=24, depth=2, num_heads=3)
    head = student.head.weight.detach().clone()
    weight_selection(student, teacher.state_dict())
    t, s = teacher.state_dict(), student.state_dict()
    idx = torch.arange(0, 48, 2)
    torch.testing.assert_close(s["blocks.1.mlp.fc1.weight"], t["blocks.1.mlp.fc1.weight"][::2][:, idx])
    torch.testing.assert_close(s["blocks.0.attn.q.bias"], t["blocks.0.attn.q.bias"][idx])
    torch.testing.assert_close(s["pos_embed"], t["pos_embed"][:, :, idx])
    assert torch.equal(s["head.weight"], head)
    with pytest.raises(ValueError, match="teacher has no"):
        weight_selection(ViT(3, 7, (16, 16), 4, embed_dim=24, depth=6, num_heads=3), teacher.state_dict())


def _reference_loop_length(n_images: int, batch_size: int, epochs: int, num_crops: int, warmup: int = 0):
    """``train_VVTQ.py``'s loop arithmetic, written from the reference (one process): the loader
    batch is ``ceil(batch_size / num_crops)`` images (x num_crops views); warmup epochs and the
    last ones train single-crop at ``batch * num_crops`` images; loaders keep the last batch."""
    b = math.ceil(batch_size / num_crops)
    steps = views = 0
    for _ in range(warmup):
        steps, views = steps + math.ceil(n_images / (b * num_crops)), views + n_images
    for epoch in range(warmup, epochs, num_crops):
        if epoch >= epochs - num_crops:
            for _ in range(epoch, epochs):
                steps, views = steps + math.ceil(n_images / (b * num_crops)), views + n_images
            break
        steps, views = steps + math.ceil(n_images / b), views + n_images * num_crops
    return steps, views


@pytest.mark.parametrize("experiment", ["qat_deit_tiny_imagenet", "qat_swin_tiny_imagenet"])
def test_paper_configs_give_the_reference_training_length(experiment):
    """The composed paper-size configs train exactly as long as the reference's loop on ImageNet-1k
    (1,281,167 images): 375,376 optimizer steps and 150 x 1,281,167 views (37 four-crop passes +
    2 single-crop epochs), through our own schedule (:func:`qat_passes`, :func:`training_length`)."""
    from hydra import compose, initialize_config_dir

    from conftest import ROOT
    from lightning_dd.methods.quantization.qat_vit.training import qat_passes, training_length

    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        m = compose("train", overrides=[f"experiment={experiment}"]).method
    n = 1_281_167
    ref = _reference_loop_length(n, m.batch_size, m.epochs, m.num_crops, m.warmup_epochs)
    assert ref == (37 * 10_010 + 2 * 2_503, 150 * n)
    assert training_length(m.epochs, m.num_crops, m.warmup_epochs, n, m.batch_size) == ref
    passes = qat_passes(m.epochs, m.num_crops, m.warmup_epochs)
    assert [p.crops for p in passes] == [4] * 37 + [1, 1] and passes[-1].epoch == 149


@pytest.mark.parametrize("epochs,num_crops,warmup", [(4, 2, 0), (5, 2, 0), (1, 2, 0), (10, 4, 2), (7, 3, 1)])
def test_training_length_follows_the_reference_loop(epochs, num_crops, warmup):
    """Small cases of the same arithmetic, warmup included (the CPU preset is (4, 2, 0))."""
    from lightning_dd.methods.quantization.qat_vit.training import training_length

    for n, batch in ((3000, 64), (101, 10)):
        assert training_length(epochs, num_crops, warmup, n, batch) == _reference_loop_length(n, batch, epochs,
                                                                                               num_crops, warmup)


def test_reference_lr_is_timm_cosine_per_pass():
    """LR per epoch as timm's CosineLRScheduler(t_initial=epochs) of the reference: full at epoch 0,
    half at epochs/2, min_lr from epochs on (the last single-crop epoch), linear warmup; equal to
    the installed timm's scheduler at every epoch."""
    from lightning_dd.methods.quantization.qat_vit.training import reference_lr

    assert reference_lr(0, 150) == 1.0 and math.isclose(reference_lr(75, 150), 0.5) and reference_lr(150, 150) == 0
    assert math.isclose(reference_lr(2, 150, warmup_epochs=5, warmup_lr=0.0), 0.4)
    scheduler = pytest.importorskip("timm.scheduler.cosine_lr")
    for warmup in (0, 5):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=5e-4)
        timm_sched = scheduler.CosineLRScheduler(opt, t_initial=150, lr_min=0.0, warmup_t=warmup, warmup_lr_init=1e-6)
        for t in range(152):
            assert math.isclose(timm_sched._get_lr(t)[0], reference_lr(t, 150, warmup, 1e-6, 5e-4), rel_tol=1e-12), t


def test_streamed_views_are_independent_crops_of_the_original_image(shared_data):
    """ImageNet views for multi-crop KD (reference ``RandomResizedCrop_FKD``): each item holds
    ``views`` crops, each its own random-resized crop of the original JPEG (not crops of one crop);
    single-crop passes get ``(1, 3, S, S)`` items (views made, not cropped again)."""
    from lightning_dd.data.imagenet import image_folder_dataset

    ds = image_folder_dataset(shared_data / "imagenet_sample", "train", "flat", image_size=64, views=4,
                              scale=(0.08, 1.0))
    torch.manual_seed(0)
    x, _ = ds[0]
    assert x.shape == (4, 3, 64, 64)
    assert all(not torch.equal(x[i], x[j]) for i in range(4) for j in range(i))
    one, _ = image_folder_dataset(shared_data / "imagenet_sample", "train", "flat", image_size=64, views=1)[0]
    assert one.shape == (1, 3, 64, 64)


def test_a_step_driven_below_the_floor_restarts_there_and_exports_exactly():
    """As the reference's in-place ``alpha.data.clamp_(min=1e-4)``: a step an update drove negative
    is reset to 1e-4 by the next forward and still gets gradients; the export then reloads to the
    same predictions (it broke when the step stayed negative)."""
    model = calibrate(quantize_vit(small_vit(), 8), torch.randn(16, 3, 16, 16))
    with torch.no_grad():
        model.head.wq.step.fill_(-7e-4)
    x = torch.randn(8, 3, 16, 16)
    model.train()
    model(x).square().sum().backward()
    assert float(model.head.wq.step.detach()) == pytest.approx(1e-4) and model.head.wq.step.grad != 0
    cfg = {"_target_": "lightning_dd.nets.vit.ViT", **SMALL}
    back = load_quantized(export_quantized(model, cfg, 8, 8, 8, "reference"), 3, 10, (16, 16))
    with torch.no_grad():
        assert torch.equal(back(x), model.eval()(x))


def test_check_reads_the_typed_net_and_refuses_what_it_cannot_quantize():
    from configs import run_context
    from lightning_dd.core.config import ConfigError

    m = method("qat_vit")
    assert m.bits == 4 and m.epochs == 150 and m.loader_workers == 0 and m.fp_seed is None
    m.check(run_context(net={"_target_": "lightning_dd.nets.vit.ViT", **SMALL}))
    with pytest.raises(ConfigError, match="net: QAT-ViT quantizes"):
        m.check(run_context(net={"name": "ConvNet"}))
    with pytest.raises(ConfigError, match="method.batch_size"):
        method("qat_vit", batch_size=2, num_crops=4).check(run_context(net={"_target_": "lightning_dd.nets.vit.ViT"}))


def test_fp_module_keeps_the_deit_recipe():
    """The FP ViT trains with AdamW (weight decay on >= 2-dim weights only, not on the position
    embedding or class token) and warmup + cosine per step: the same lr multipliers as
    ``(s + 1) / warmup`` then ``(1 + cos(pi (s - warmup) / (total - warmup))) / 2``."""
    from lightning_dd.methods.quantization.qat_vit.training import fp_module

    net = small_vit()
    hp = method("qat_vit", **{"fp_optimizer.lr": 5e-4, "fp_optimizer.weight_decay": 0.05})
    conf = fp_module(net, hp.fp_optimizer, hp.fp_scheduler, 20, 3, (16, 16), 0.1).configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    assert isinstance(opt, torch.optim.AdamW) and conf["lr_scheduler"]["interval"] == "step"
    decay, rest = opt.param_groups
    assert decay["weight_decay"] == 0.05 and rest["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and any(p is net.pos_embed for p in rest["params"])
    for s in range(25):
        want = (s + 1) / 3 if s < 3 else 0.5 * (1 + math.cos(math.pi * min(1.0, (s - 3) / 17)))
        assert sched.lr_lambdas[0](s) == want


def test_fp_cache_key_stays_that_of_the_typed_fields():
    """``method.fp_optimizer`` keys the FP model with the names and values the typed fields had
    (``lr``, ``wd``): the qat_vit_cifar10 proof run's FP model keeps its folder ``e35db4e92648a723``;
    another recipe gets its own key. The QAT stage's optimizer peaks its schedule at its own lr."""
    from lightning_dd.core.config import instantiate_node
    from lightning_dd.methods.quantization.qat_vit.training import fp_spec
    from lightning_dd.io import cache_key

    cfg = compose_train("experiment=qat_vit_cifar10", "scale=cpu", "data.train_per_class=20", "method.fp_epochs=2",
                        "method.fp_warmup_epochs=1")
    hp = instantiate_node(cfg.method, "method")

    def spec(m):
        return fp_spec(m.fp_optimizer, m.fp_scheduler)

    assert spec(hp) == {"lr": 0.001, "wd": 0.05}
    data = {"n_train": 50000, "name": "cifar10", "source": "/work/shared/data/cifar10", "subset_seed": 0,
            "train_per_class": 20, "zca": False, "zca_eps": 0.1}
    net = {"_target_": "lightning_dd.nets.vit.ViT", "depth": 6, "drop_path": 0.0, "embed_dim": 192, "mlp_ratio": 4.0,
           "num_heads": 3, "patch_size": 4}
    full = {"data": data, "net": net, "seed": 0, "epochs": 2, "batch": 64, "warmup": 1, "ls": 0.1, "init_from": None,
            "stream": None, **spec(hp)}
    assert cache_key(full) == "e35db4e92648a723"
    assert "recipe" in spec(method("qat_vit", **{"fp_optimizer.betas": [0.9, 0.95]}))
    opt = hp.optimizer([torch.nn.Parameter(torch.zeros(1))])
    assert type(opt) is torch.optim.AdamW and (opt.defaults["lr"], opt.defaults["weight_decay"]) == (0.0002, 0.0001)


@pytest.mark.parametrize("override,key", [("method.fp_optimizer.lr=-1", "method.fp_optimizer"),
                                          ("method.optimizer.weight_decay=-1", "method.optimizer"),
                                          ("+method.fp_scheduler.gamma=0.5", "method.fp_scheduler")])
def test_an_optimizer_that_does_not_build_fails_at_check_time_naming_its_key(override, key):
    from lightning_dd.core.config import ConfigError
    from lightning_dd.runner import check_config

    with pytest.raises(ConfigError, match=rf"{key}: Value error, does not build"):
        check_config(compose_train("experiment=qat_vit_cifar10", override))


def test_qat_module_starts_without_oscillation_rates():
    from lightning_dd.methods.quantization.qat_vit.training import QATModule

    student = quantize_vit(small_vit(), 4)
    m = QATModule(student, small_vit(), method("qat_vit").optimizer, 2, 2, 0, lambda p: None, (0.5, 1.0), 0.0, 0.25)
    assert m.last_rates == {} and not hasattr(m, "osc_history")
