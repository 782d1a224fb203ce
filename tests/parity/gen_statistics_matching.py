"""Parity fixture for statistics matching (SRe2L arXiv 2306.13092, CDA arXiv 2311.18838, G-VBSM arXiv
2311.17950) from the authors' code.

Two checkouts: ``--reference`` VILA-Lab/SRe2L (SRe2L and CDA) and ``--gvbsm``
shaoshitong/G_VBSM_Dataset_Condensation. Exercised, on CPU:

* ``SRe2L/*small_dataset/utils.py``: ``BNFeatureHook`` on every BN layer of a small fixed BN
  ConvNet (ours, weights and running statistics in the fixture), the loss ``sum_l rescale_l
  r_feature_l`` with ``rescale = [first_bn_multiplier, 1, ...]`` as the recover scripts build it:
  value and gradient w.r.t. the input images (case ``bn_loss``); ``lr_cosine_policy`` at a few
  iterations (case ``lr_cosine``).
* ``SRe2L/*small_dataset/recover_cifar.py`` ``get_images``: the whole recovery loop (Adam 0.5/0.9,
  cosine lr, CE + r_bn BN loss, ``clip_cifar``) for 4 iterations on one batch of 100 (its labels
  0..99) with ``--jitter 0`` (case ``sre2l_recover``). Replaced to run on CPU: the ``"cuda"``
  device of ``torch.randn`` / ``Tensor.to`` / ``Module.cuda`` (mapped to the CPU), the initial
  ``torch.randn`` images (fixed images of 8x8 pixels instead of 32x32 noise), ``optim.Adam``
  (subclassed to record each step's lr and pixel gradient), ``Tensor.backward`` (wrapped to
  record the loss).
* ``CDA/recover_cda_in1k.py`` ``get_images``: the easy-to-hard crop-scale lower bound of every
  iteration (``--easy2hard-mode`` step / linear / cosine, ``--milestone`` 1 and 0.5, 20 iterations;
  read from the ``RandomResizedCrop`` each iteration builds; case ``cda_schedule``), and views of
  the iteration's real ``aug_function`` (``RandomResizedCrop(224, scale=(min_crop, 1))`` +
  ``RandomHorizontalFlip()``) applied to seeded 224-px images after ``torch.manual_seed(seed)``
  (case ``cda_views``). Replaced: ``wandb`` (a stub module), the pretrained torchvision teacher (a
  linear layer on 2x2 images, 1000 classes), ``transforms.Compose`` (records the pipeline and
  hands the images on unchanged), the CUDA device as above.
* G-VBSM ``Branch_CIFAR_10/recover/utils.py``: ``ConvFeatureHook`` (its real-data statistics with
  ``pre_hook_fn`` over batches of 64, then ``post_hook_fn`` with ``drop_rate 0``) and
  ``BNFeatureHook`` (``training_momentum 0.8``, their default: the matched statistics are moving
  averages that start at 0) on every conv / BN layer of a small BN ConvNet in ``named_modules``
  order, the feature loss ``sum_l rescale_l r_feature_l`` (rescale: ``--first-multiplier`` on the first hook)
  on 6x6 images (resized to 8x8 for the patches): value, gradient, and the stored statistics (case
  ``gvbsm_stats``). Replaced: ``einops`` (not installed) by a stub whose ``rearrange`` does the one
  pattern the hook uses, ``"b c (u h) (v w) -> (u v) (b c h w)"``, with ``reshape``/``permute``.
* G-VBSM ``data_synthesis_with_svd_with_db_with_all_statistic.py`` ``main_worker``: three
  iterations of its recovery with two backbones (one per iteration, in turn) on one batch of 20
  CIFAR-sized images (IPC 2, so that every class has a 2x2 Gram matrix): CE + ``--r-loss`` x (BN + conv statistics) + ``--nuc-norm`` x the eigenvalue term,
  ``--training-momentum 0.8`` (its default) and ``--drop-rate 0`` (case ``gvbsm_recover``). Replaced: the process
  group (gloo, world size 1, a file store), ``torch.cuda.set_device`` and ``.cuda()`` (CPU),
  ``torch.randn`` (fixed images), ``transforms.Compose`` (identity: crop/flip off), ``--jitter 0``,
  the saved statistics (written first with the hooks' own ``save``), the verifier display
  (``validate``: records the batch's labels instead).

Usage: ``python tests/parity/gen_statistics_matching.py --reference /tmp/ref/SRe2L --gvbsm /tmp/ref/G_VBSM``
"""
import argparse
import contextlib
import importlib
import os
import sys
import tempfile
import types

import torch
import torch.nn as nn

from fixture_io import reference_commit, save_fixture

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from lightning_dd.nets import build_net  # noqa: E402  (the fixed networks are ours)


def bn_net(classes: int, size: int, seed: int) -> nn.Module:
    """A ConvNet-8-2 with BatchNorm and non-trivial running statistics, eval mode."""
    torch.manual_seed(seed)
    net = build_net("ConvNet", 3, classes, (size, size), width=8, depth=2, norm="batchnorm")
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.rand(32, 3, size, size) * 2 + 0.5)
    return net.eval()


@contextlib.contextmanager
def on_cpu():
    """``"cuda"`` devices of ``Tensor.to`` / ``.cuda()`` / ``Module.cuda`` / ``torch.cuda.set_device``
    become the CPU while the reference runs."""
    to, tcuda, mcuda, setdev = torch.Tensor.to, torch.Tensor.cuda, nn.Module.cuda, torch.cuda.set_device

    def to_cpu(self, *a, **k):
        a = tuple("cpu" if (isinstance(x, str) and x.startswith("cuda")) else x for x in a)
        if isinstance(k.get("device"), str) and k["device"].startswith("cuda"):
            k["device"] = "cpu"
        return to(self, *a, **k)

    torch.Tensor.to = to_cpu
    torch.Tensor.cuda = lambda self, *a, **k: self
    nn.Module.cuda = lambda self, *a, **k: self
    torch.cuda.set_device = lambda *a, **k: None
    try:
        yield
    finally:
        torch.Tensor.to, torch.Tensor.cuda, nn.Module.cuda, torch.cuda.set_device = to, tcuda, mcuda, setdev


class TorchProxy(types.ModuleType):
    """The ``torch`` a reference module sees: ``torch`` with ``randn`` replaced."""

    def __init__(self, randn):
        super().__init__("torch")
        self._randn = randn

    def __getattr__(self, name):
        return self._randn if name == "randn" else getattr(torch, name)


def fixed_randn(images):
    def randn(*shape, requires_grad=False, **kw):
        return images.clone().requires_grad_(requires_grad)
    return randn


def seeded(shape, seed: int, std: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    """``randn(shape) * std + shift`` from a generator seeded ``seed``: the large inputs are stored as
    (shape, seed, std, shift, sum) and drawn again by the test (the sum checks the draw)."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * std + shift


def spec(shape, seed: int, std: float = 1.0, shift: float = 0.0) -> dict:
    x = seeded(shape, seed, std, shift)
    return {"shape": list(shape), "seed": seed, "std": std, "shift": shift, "sum": float(x.double().sum())}


class Recorder:
    """Records each optimizer step's lr and gradient, and each backward's loss."""

    def __init__(self):
        self.lrs, self.grads, self.losses, self.params = [], [], [], []

    def adam(self):
        rec = self

        class Adam(torch.optim.Adam):
            def __init__(self, params, **kw):
                params = list(params)
                rec.params = params
                rec.kw = kw
                super().__init__(params, **kw)

            def step(self, closure=None):
                rec.lrs.append(self.param_groups[0]["lr"])
                rec.grads.append(self.param_groups[0]["params"][0].grad.detach().clone())
                return super().step(closure)

        return types.SimpleNamespace(Adam=Adam)

    @contextlib.contextmanager
    def backward(self):
        bw = torch.Tensor.backward

        def backward(t, *a, **k):
            self.losses.append(float(t.detach()))
            return bw(t, *a, **k)

        torch.Tensor.backward = backward
        try:
            yield
        finally:
            torch.Tensor.backward = bw


def sre2l_cases(ref: str) -> dict:
    sys.path.insert(0, os.path.join(ref, "SRe2L", "*small_dataset"))
    utils = importlib.import_module("utils")
    recover_cifar = importlib.import_module("recover_cifar")
    cases = {}

    # the BN loss and its gradient
    net = bn_net(100, 8, seed=0)
    x = seeded((16, 3, 8, 8), 1, 1.5, 0.3)
    xr = x.clone().requires_grad_(True)
    hooks = [utils.BNFeatureHook(m) for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    net(xr)
    rescale = [10.0] + [1.0] * (len(hooks) - 1)
    loss = sum(h.r_feature * rescale[i] for i, h in enumerate(hooks))
    loss.backward()
    for h in hooks:
        h.close()
    cases["bn_loss"] = {"state_dict": net.state_dict(), "classes": 100, "size": 8, "images": spec((16, 3, 8, 8), 1, 1.5, 0.3),
                        "first_bn_multiplier": 10.0, "loss": loss.detach(), "grad": xr.grad}

    # lr_cosine_policy at a few iterations of 1000
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.25)
    sched = utils.lr_cosine_policy(0.25, 0, 1000)
    its = [0, 1, 10, 250, 500, 750, 999]
    lrs = []
    for i in its:
        sched(opt, i, i)
        lrs.append(opt.param_groups[0]["lr"])
    cases["lr_cosine"] = {"base_lr": 0.25, "iterations": 1000, "at": its, "lr": torch.tensor(lrs, dtype=torch.float64)}

    # four iterations of recover_cifar.get_images on one batch of 100
    init = seeded((100, 3, 8, 8), 2)
    rec = Recorder()
    recover_cifar.torch = TorchProxy(fixed_randn(init))
    recover_cifar.optim = rec.adam()
    args = types.SimpleNamespace(batch_size=100, iteration=4, lr=0.25, jitter=0, r_bn=0.01, first_bn_multiplier=10.0,
                                 store_best_images=False, verifier=False)
    lo = recover_cifar.clip_cifar(torch.full((1, 3, 1, 1), -1e9)).flatten()
    hi = recover_cifar.clip_cifar(torch.full((1, 3, 1, 1), 1e9)).flatten()
    with on_cpu(), rec.backward():
        recover_cifar.get_images(args, net, None, 0)
    cases["sre2l_recover"] = {
        "net": "bn_loss's", "init": spec((100, 3, 8, 8), 2),
        "labels": torch.arange(100),
        "iterations": 4, "lr": 0.25, "r_bn": 0.01, "first_bn_multiplier": 10.0, "jitter": 0, "lo": lo, "hi": hi,
        "betas": list(rec.kw["betas"]), "eps": rec.kw["eps"], "step_lr": torch.tensor(rec.lrs, dtype=torch.float64),
        "step_loss": torch.tensor(rec.losses, dtype=torch.float64), "grad0": rec.grads[0][:16],
        "final": rec.params[0].detach()[:16].clone(), "final_sum": float(rec.params[0].detach().double().sum())}
    sys.path.pop(0)
    for m in ("utils", "recover_cifar"):
        sys.modules.pop(m, None)
    return cases


def cda_cases(ref: str) -> dict:
    sys.modules.setdefault("wandb", types.ModuleType("wandb"))
    sys.path.insert(0, os.path.join(ref, "CDA"))
    cda = importlib.import_module("recover_cda_in1k")
    from torchvision import transforms

    pipelines = []

    def compose(ts):
        pipelines.append(transforms.Compose(ts))
        return lambda x: x

    cda.transforms = types.SimpleNamespace(Compose=compose, RandomResizedCrop=transforms.RandomResizedCrop,
                                           RandomHorizontalFlip=transforms.RandomHorizontalFlip)
    cda.torch = TorchProxy(fixed_randn(torch.zeros(1000, 3, 1, 1)))
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(3, 1000)).eval()
    iters = 20
    schedule = {}
    with on_cpu():
        for mode in ("step", "linear", "cosine"):
            for milestone in (1.0, 0.5):
                pipelines.clear()
                args = types.SimpleNamespace(batch_size=1000, iteration=iters, lr=0.25, jitter=0, r_bn=0.01,
                                             first_bn_multiplier=10.0, store_best_images=False, verifier=False,
                                             easy2hard_mode=mode, milestone=milestone)
                cda.get_images(args, teacher, None, 0)
                schedule[f"{mode}_{milestone}"] = torch.tensor(
                    [p.transforms[0].scale[0] for p in pipelines], dtype=torch.float64)
                if mode == "cosine" and milestone == 1.0:
                    views_of = {i: pipelines[i] for i in (0, 5, 12, 19)}
    cases = {"cda_schedule": {"iterations": iters, **{k: v for k, v in schedule.items()}}}
    views = {}
    for i, pipe in views_of.items():
        for seed in (0, 1, 2):
            x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(100 + seed))
            torch.manual_seed(seed)
            v = pipe(x)
            views[f"{i}_{seed}"] = {"iteration": i, "seed": seed, "input_seed": 100 + seed,
                                    "scale": [float(v) for v in pipe.transforms[0].scale], "sub": v[:, :, ::28, ::28].clone(),
                                    "sum": float(v.double().sum())}
    cases["cda_views"] = views
    sys.path.pop(0)
    sys.modules.pop("utils", None)
    return cases


def einops_stub() -> types.ModuleType:
    """``einops.rearrange`` for the one pattern G-VBSM's ConvFeatureHook uses."""
    mod = types.ModuleType("einops")

    def rearrange(x, pattern, h, w):
        assert pattern == "b c (u h) (v w) -> (u v) (b c h w)", pattern
        b, c, hh, ww = x.shape
        return x.reshape(b, c, hh // h, h, ww // w, w).permute(2, 4, 0, 1, 3, 5).reshape((hh // h) * (ww // w), -1)

    mod.rearrange = rearrange
    return mod


def gvbsm_cases(ref: str) -> dict:
    sys.modules["einops"] = einops_stub()
    sys.path.insert(0, os.path.join(ref, "Branch_CIFAR_10", "recover"))
    for m in ("utils", "models", "baseline", "networks"):
        sys.modules.pop(m, None)
    gutils = importlib.import_module("utils")
    cases = {}

    # the statistics hooks and the feature loss on one network
    net = bn_net(10, 6, seed=3)
    real = seeded((150, 3, 6, 6), 4, 0.8, 0.1)
    syn = torch.randn(12, 3, 6, 6, generator=torch.Generator().manual_seed(5))
    with tempfile.TemporaryDirectory() as tmp:
        hooks, kinds = [], []
        for name, m in net.named_modules():
            if isinstance(m, nn.BatchNorm2d):
                hooks.append(gutils.BNFeatureHook(m, training_momentum=0.8))
                kinds.append("bn")
            elif isinstance(m, nn.Conv2d):
                h = gutils.ConvFeatureHook(m, save_path=tmp, data_number=len(real), name="net=" + name,
                                           training_momentum=0.8, drop_rate=0.0)
                h.set_hook(pre=True)
                hooks.append(h)
                kinds.append("conv")
        with torch.no_grad():
            for part in real.split(64):
                net(part)
        conv_stats = [[h.running_dd_mean, h.running_dd_var, h.running_patch_mean, h.running_patch_var]
                      for h, k in zip(hooks, kinds) if k == "conv"]
        for h, k in zip(hooks, kinds):
            if k == "conv":
                h.set_hook(pre=False)
            else:  # the statistics pass ran through the BN hooks too: back to their initial 0. (as when
                h.dd_var, h.dd_mean = 0., 0.  # main_worker loads saved statistics and makes no such pass)
        xs = syn.clone().requires_grad_(True)
        net(xs)
        rescale = [10.0] + [1.0] * (len(hooks) - 1)
        feat = sum(h.r_feature * rescale[i] for i, h in enumerate(hooks))
        feat.backward()
        for h in hooks:
            h.close()
    cases["gvbsm_stats"] = {"state_dict": net.state_dict(), "classes": 10, "size": 6, "real": spec((150, 3, 6, 6), 4, 0.8, 0.1),
                            "images": syn,
                            "kinds": kinds, "first_multiplier": 10.0, "momentum": 0.8, "conv_stats": conv_stats,
                            "loss": feat.detach().reshape(()), "grad": xs.grad}

    # two iterations of main_worker: two backbones in turn, CE + r_loss (BN + conv) + nuc_norm x eigenvalues
    ds = importlib.import_module("data_synthesis_with_svd_with_db_with_all_statistic")
    import torch.distributed as dist

    nets = [bn_net(10, 32, seed=6), bn_net(10, 32, seed=7)]
    names = ["ConvNet", "ConvNet2"]
    for n, nm in zip(nets, names):
        n.__class__ = type(nm, (n.__class__,), {})  # the hooks' save folders are named by class
    real = seeded((40, 3, 32, 32), 8, 0.9)
    init = seeded((20, 3, 32, 32), 9, 0.03)  # small pixels: Gram eigenvalues ~3, a non-trivial eigenvalue term
    rec = Recorder()
    with tempfile.TemporaryDirectory() as tmp, on_cpu(), rec.backward():
        # the statistics files main_worker loads (its own hooks' pre pass + save)
        stats = {}
        for n, nm in zip(nets, names):
            hs = []
            for name, m in n.named_modules():
                if isinstance(m, nn.Conv2d):
                    h = gutils.ConvFeatureHook(m, save_path=tmp, data_number=len(real), name=nm + "=" + name)
                    h.set_hook(pre=True)
                    hs.append(h)
            with torch.no_grad():
                for part in real.split(64):
                    n(part)
            for h in hs:
                h.save()
                h.close()
            stats[nm] = [[torch.as_tensor(h.running_dd_mean), torch.as_tensor(h.running_dd_var),
                          torch.as_tensor(h.running_patch_mean), torch.as_tensor(h.running_patch_var)] for h in hs]
        ds.torch = TorchProxy(fixed_randn(init))
        ds.optim = rec.adam()
        ds.transforms = types.SimpleNamespace(Compose=lambda ts: (lambda x: x), RandomCrop=lambda *a, **k: None,
                                              RandomHorizontalFlip=lambda *a, **k: None)
        args = types.SimpleNamespace(rank=0, dist_backend="gloo", dist_url="file://" + os.path.join(tmp, "pg"),
                                     world_size=1, batch_size=20, statistic_path=tmp, training_momentum=0.8,
                                     drop_rate=0.0, iteration=3, jitter=0, lr=0.05, first_multiplier=10.0,
                                     nuc_norm=1.0, tau=4.0, r_loss=0.01, store_best_images=False)
        shown = []
        ds.validate = lambda x, y, model: shown.append(y.clone())  # the verifier display: records the labels
        ds.main_worker(0, 1, args, nets, nn.Identity(), [0, 1])
        dist.destroy_process_group()
    cases["gvbsm_recover"] = {
        "state_dicts": [n.state_dict() for n in nets], "classes": 10, "size": 32, "conv_stats": [stats[n] for n in names],
        "init": spec((20, 3, 32, 32), 9, 0.03), "labels": shown[0], "iterations": 3, "momentum": 0.8, "lr": 0.05, "r_loss": 0.01, "nuc_norm": 1.0,
        "tau": 4.0, "first_multiplier": 10.0, "lo": ds.clip(torch.full((1, 3, 1, 1), -1e9)).flatten(),
        "hi": ds.clip(torch.full((1, 3, 1, 1), 1e9)).flatten(),
        "step_lr": torch.tensor(rec.lrs, dtype=torch.float64), "step_loss": torch.tensor(rec.losses, dtype=torch.float64),
        "grad0": rec.grads[0][:2], "final": rec.params[0].detach()[:2].clone(),
        "final_sum": float(rec.params[0].detach().double().sum())}
    sys.path.pop(0)
    return cases


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference", required=True, help="checkout of VILA-Lab/SRe2L")
    p.add_argument("--gvbsm", required=True, help="checkout of shaoshitong/G_VBSM_Dataset_Condensation")
    args = p.parse_args()
    ref, gv = os.path.abspath(args.reference), os.path.abspath(args.gvbsm)
    cases = {**sre2l_cases(ref), **cda_cases(ref), **gvbsm_cases(gv)}
    cases["gvbsm_recover"]["gvbsm_repo"] = "shaoshitong/G_VBSM_Dataset_Condensation"
    cases["gvbsm_recover"]["gvbsm_commit"] = reference_commit(gv)
    save_fixture("statistics_matching", cases, reference=ref, repo="VILA-Lab/SRe2L",
                 replaced="CUDA devices -> CPU; initial torch.randn images -> fixed images; torch.optim.Adam and "
                          "Tensor.backward wrapped to record lr, gradients and losses; CDA: wandb stubbed, the "
                          "torchvision teacher -> a linear layer, transforms.Compose records and passes images "
                          "through; G-VBSM (cases gvbsm_*, commit in the case): einops stubbed (one rearrange "
                          "pattern), process group gloo/world 1, crop/flip and jitter off, drop rate 0")


if __name__ == "__main__":
    main()
