"""Distribution matching (arXiv 2110.04181) and CLoM (arXiv 2310.03295): the loss, its vectorized
form against the reference's per-class loop, the cosine CLoM formula, the cached model pool, and a
short real-CIFAR run."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lightning_dd.augment.dsa import DSA
from lightning_dd.core.config import ConfigError
from lightning_dd.core.trainer import TrainerFactory
from lightning_dd.methods.images.clom import ClomConfig, ClomTerm, ModelPool, cos_clom, penultimate
from lightning_dd.methods.images.distribution_matching import (DistributionMatching, class_table, dm_loss,
                                                               sample_per_class, siamese_dsa)
from lightning_dd.nets import build_net
from configs import CountingTrainerFactory, augment_settings, method, run_context


def test_dm_loss_is_zero_iff_every_class_mean_matches():
    g = torch.Generator().manual_seed(0)
    f_real = torch.randn(4, 16, 8, generator=g)
    noise = torch.randn(4, 3, 8, generator=g)
    f_syn = noise - noise.mean(1, keepdim=True) + f_real.mean(1, keepdim=True)  # same class means
    assert dm_loss(f_real, f_syn).item() < 1e-10
    for c in range(4):  # any single class off -> positive, equal to that class's squared mean gap
        off = f_syn.clone()
        off[c, 0] += 0.3
        expected = ((f_real[c].mean(0) - off[c].mean(0)) ** 2).sum()
        assert dm_loss(f_real, off).item() == pytest.approx(expected.item(), rel=1e-4)
        assert dm_loss(f_real, off).item() > 1e-4
    # swapping two classes' synthetic sets breaks the match (the loss is per class, not global)
    assert dm_loss(f_real, f_syn[[1, 0, 2, 3]]).item() > 1e-2


def test_vectorized_dm_step_equals_the_reference_per_class_loop():
    """One forward of all classes + grouped siamese DSA == the reference loop (per class: one DSA
    draw applied to every real and synthetic image of the class, embed, squared mean gap), in loss
    and pixel gradient."""
    torch.manual_seed(0)
    C, B, I = 5, 7, 3
    net = build_net("ConvNet", 3, C, (16, 16), width=8, depth=2).requires_grad_(False)
    real = torch.randn(C, B, 3, 16, 16)
    syn = torch.randn(C, I, 3, 16, 16, requires_grad=True)
    dsa = DSA()
    fast_r, fast_s = siamese_dsa(dsa, real, syn, torch.Generator().manual_seed(3))
    f_r = penultimate(net, net, fast_r.flatten(0, 1)).unflatten(0, (C, B))
    f_s = penultimate(net, net, fast_s.flatten(0, 1)).unflatten(0, (C, I))
    loss = dm_loss(f_r, f_s)
    (grad,) = torch.autograd.grad(loss, syn)

    g = torch.Generator().manual_seed(3)
    naive = torch.zeros(())
    families = set()
    for c in range(C):
        p = dsa.sample(1, (16, 16), generator=g)
        families.add(p.ops)
        r = dsa.apply(real[c], p.index(torch.zeros(B, dtype=torch.long)))
        s = dsa.apply(syn[c], p.index(torch.zeros(I, dtype=torch.long)))
        naive = naive + (penultimate(net, net, r).mean(0) - penultimate(net, net, s).mean(0)).pow(2).sum()
    (grad_naive,) = torch.autograd.grad(naive, syn)
    assert len(families) > 1  # the grouping by DSA family was exercised
    assert torch.allclose(loss, naive, rtol=1e-4)
    assert torch.allclose(grad, grad_naive, rtol=1e-3, atol=1e-6)
    assert grad.abs().sum() > 0


@pytest.mark.parametrize("strategy", ["color", "crop", "cutout", "flip", "scale", "rotate"])
def test_siamese_dsa_gives_every_image_of_a_class_the_same_draw(strategy):
    """As the reference's seeded ``DiffAugment`` (``param.Siamese`` copies the first image's parameters
    to the batch): one draw per class for all its real and synthetic images, so copies of one image
    come out identical. Fails with a draw per image (the earlier pairing of real ``i`` with synthetic ``i``)."""
    C, B, I = 12, 6, 3
    x = torch.rand(C, 1, 3, 16, 16).expand(C, B, 3, 16, 16).contiguous()
    out_r, out_s = siamese_dsa(DSA(strategy), x, x[:, :I].clone(), torch.Generator().manual_seed(0))
    assert torch.equal(out_r, out_r[:, :1].expand_as(out_r)) and torch.equal(out_s, out_r[:, :I])


def test_real_batches_are_distinct_and_from_their_class():
    labels = torch.tensor([0, 1, 2] * 20 + [2] * 5)
    table, counts = class_table(labels, 3)
    idx = sample_per_class(table, counts, 15, torch.Generator().manual_seed(0))
    assert idx.shape == (3, 15)
    for c in range(3):
        assert (labels[idx[c]] == c).all() and len(set(idx[c].tolist())) == 15
    assert sample_per_class(table, counts, 100, torch.Generator()).shape == (3, 20)  # capped at the smallest class
    with pytest.raises(ValueError, match="without training images"):
        class_table(torch.tensor([0, 0, 2]), 3)


def test_cosine_clom_matches_the_naive_formula():
    g = torch.Generator().manual_seed(1)
    f_s, f_r = torch.randn(6, 5, generator=g), torch.randn(9, 5, generator=g)
    y_s, y_r = torch.randint(3, (6,), generator=g), torch.randint(3, (9,), generator=g)
    num = den = 0.0
    for i in range(6):
        for j in range(9):
            d = 1 - float(torch.dot(f_s[i], f_r[j]) / (f_s[i].norm() * f_r[j].norm()))
            num += d * (y_s[i] == y_r[j]).item()
            den += d
    assert cos_clom(f_s, y_s, f_r, y_r).item() == pytest.approx(num / den, rel=1e-5)
    # synthetic features equal to their class's real features and orthogonal to the others -> 0
    e = torch.eye(3)
    assert cos_clom(e, torch.arange(3), e.repeat(2, 1), torch.arange(3).repeat(2)).item() == pytest.approx(0, abs=1e-6)


class _TinyData:
    """A DataModule stand-in: 2 classes of 4x8x8 random images (enough to train a pool)."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.train_labels = torch.arange(40) % 2
        self.train_images = torch.randn(40, 3, 8, 8, generator=g) + self.train_labels.view(-1, 1, 1, 1)
        self.test_images, self.test_labels = self.train_images[:10], self.train_labels[:10]
        self.num_classes, self.image_shape = 2, (3, 8, 8)

    def identity(self):
        return {"name": "tiny", "n": 40}


def _pool_ctx(cache: Path, dsa_enabled=False, make=None, **augment):
    """A run context for the pool: tiny data, a tiny ConvNet, ``cache`` as ``paths.cache_dir``, seed 0."""
    return run_context(dm=_TinyData(), cache_dir=cache, net={"name": "ConvNet", "width": 4, "depth": 1},
                       augment=augment_settings(dsa_enabled=dsa_enabled, **augment), make_trainer=make, seed=0)


def _clom(**overrides) -> ClomConfig:
    """``conf/clom/default.yaml`` (as mounted at ``method.clom``) with ``overrides``."""
    return method("dm", **{f"clom.{k}": v for k, v in overrides.items()}).clom


def test_pool_is_trained_once_and_keyed_by_its_config(tmp_path):
    hp = _clom(enabled=True, archs=["ConvNet"], seeds=2, epochs=[1, 2], batch=16)
    make = CountingTrainerFactory(accelerator="cpu", enable_progress_bar=False)  # one Trainer per model trained
    ctx = _pool_ctx(tmp_path, make=make)
    pool = ModelPool.build(hp, ctx)
    assert len(pool) == 4 and sorted((m.seed, m.epoch) for m in pool.members) == [(0, 1), (0, 2), (1, 1), (1, 2)]
    assert len(make.stages) == 2  # one training per seed
    first = [m.theta for m in pool.members]
    again = ModelPool.build(hp, ctx)
    assert len(make.stages) == 2  # reused from the cache: nothing trained
    assert all(torch.equal(a, m.theta) for a, m in zip(first, again.members))
    other = ModelPool.build(hp.model_copy(update={"lr": 0.05}), ctx)  # another config -> another pool
    assert len(make.stages) == 4 and other.dirs[0] != pool.dirs[0]
    # epochs 1 and 2 of one model differ; the members run and give CE-CLoM gradients on the images only
    assert not torch.equal(pool.members[0].theta, pool.members[1].theta)
    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    term, member = ClomTerm(hp, pool)(x, torch.tensor([0, 1, 0, 1]), torch.Generator().manual_seed(0))
    ce = F.cross_entropy(pool.logits(member, x), torch.tensor([0, 1, 0, 1]))
    assert term.item() == pytest.approx(hp.alpha * ce.item())
    term.backward()
    assert x.grad.abs().sum() > 0 and not member.theta.requires_grad


def test_pool_defaults_are_the_authors_recipe(tmp_path):
    """The default pool is DDInterpreter's ``train_original_models.py`` + README (``--model_num 1
    --epoch 150``): SGD lr 0.01, momentum 0.9, weight decay 5e-3, batch 256, no augmentation even when
    the run uses DSA, the epoch-150 weights. ``augment=True`` trains with the run's DSA (CPU preset).
    Mutation checked: momentum / weight decay not passed to the expert trainer (spec says 0)."""
    d = method("dm").clom  # conf/clom/default.yaml, as mounted at method.clom
    assert (d.seeds, d.epochs, d.lr, d.batch, d.momentum, d.weight_decay, d.augment) == (1, [150], 0.01, 256, 0.9,
                                                                                         5e-3, False)
    ctx = _pool_ctx(tmp_path, dsa_enabled=True, **{"dsa.strategy": "flip"})
    for augment in (False, True):
        pool = ModelPool.build(d.model_copy(update={"enabled": True, "epochs": [1], "batch": 16, "augment": augment}),
                               ctx)
        spec = json.loads((pool.dirs[0] / "spec.json").read_text())
        assert (spec["momentum"], spec["weight_decay"], spec["epochs"]) == (0.9, 5e-3, 1)
        assert spec["lr_milestones"] == [50, 100]
        assert (spec["dsa"] == "none") != augment


def test_pool_lr_drops_tenfold_after_each_milestone_epoch():
    """The pool's ``MultiStepLR`` (``--lr_decay_step 50,100``, gamma 0.1, stepped per epoch) through the
    expert trainer; no milestones: a constant lr (the trajectory-matching experts). Mutation checked: the
    scheduler stepped per batch instead of per epoch fails."""
    from lightning_dd.methods.images.experts import ExpertModule
    net = torch.nn.Linear(2, 2)
    conf = ExpertModule(net, 0.01, 0.9, 5e-3, None, lr_milestones=(1, 3)).configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]
    assert conf["lr_scheduler"]["interval"] == "epoch"
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        sched["scheduler"].step()
    assert lrs == pytest.approx([0.01, 0.001, 0.001, 0.0001])
    assert isinstance(ExpertModule(net, 0.01, 0.0, 0.0, None).configure_optimizers(), torch.optim.SGD)


def test_dm_cosine_clom_contrasts_against_a_uniform_real_batch():
    """DM's cosine CLoM gets ``clom.real_batch`` real images drawn uniformly with replacement from the
    whole training set (the authors' ``CLoM_batch_size``, ``np.random.randint``), not the iteration's
    class-balanced DM batch; CE-CLoM gets none. Mutation checked: passing the DM batch instead."""
    calls = []

    class Recorder:
        def __init__(self, kind):
            self.hp = _clom(enabled=True, kind=kind, real_batch=50)

        def __call__(self, images, labels, generator, real=None):
            calls.append(real)
            return images.sum() * 0, type("M", (), {"epoch": 1})()

    labels = torch.arange(3).repeat(10)
    x = torch.randn(30, 3, 8, 8)
    for kind in ("cos", "ce"):
        hp = method("dm", ipc=1, batch_real=4)
        module = DistributionMatching(x[:3], torch.arange(3), x, labels, 3, {"name": "ConvNet", "width": 4, "depth": 1},
                                      hp, None, clom=Recorder(kind))
        module.dm_step_loss(0)
    (xr, yr), none = calls
    assert none is None and xr.shape == (50, 3, 8, 8) and yr.shape == (50,)
    rows = (xr.view(50, 1, -1) == x.view(1, 30, -1)).all(2).float().argmax(1)  # which training image each is
    assert torch.equal(labels[rows], yr) and len(set(rows.tolist())) < 50  # from the set, with replacement


def test_pool_rejects_batchnorm_architectures():
    ctx = run_context(net={"name": "ConvNet", "width": 8})
    method("dm", **{"clom.enabled": True, "clom.archs": ["ConvNet", "ResNet18"]}).check(ctx)
    with pytest.raises(ConfigError, match="BatchNorm"):
        method("dm", **{"clom.enabled": True, "clom.archs": ["ResNet18BN"]}).check(ctx)
    with pytest.raises(ConfigError, match="clom.archs"):
        method("dm", **{"clom.enabled": True, "clom.archs": ["NoSuchNet"]}).check(ctx)
    with pytest.raises(ConfigError, match="stage=pool"):
        method("dm").check(run_context(stage="pool"))


def _probe(module, iterations):
    """Mean DM loss over fixed probe iterations (fixed nets, real batches and DSA draws)."""
    with torch.no_grad():
        return sum(float(module.dm_step_loss(k)[1]["distill/loss_dm"]) for k in iterations) / len(iterations)


@pytest.mark.slow
def test_a_few_dm_iterations_on_real_cifar_lower_the_dm_loss(shared_data, cache_dir, tmp_path):
    from lightning_dd.data import CIFARDataModule
    from lightning_dd.data.batches import StepLoader

    dm = CIFARDataModule(root=str(shared_data / "cifar10"), zca=True, train_per_class=100, cache_dir=str(cache_dir))
    dm.setup()
    x, y = dm.random_subset(2, 0)
    hp = method("dm", ipc=2, iterations=15, batch_real=16, lr_img=1.0)
    module = DistributionMatching(x, y, dm.train_images, dm.train_labels, dm.num_classes,
                                  {"name": "ConvNet", "width": 16}, hp, DSA(), seed=0)
    probes = range(10_000, 10_008)
    before = _probe(module, probes)
    trainer = TrainerFactory(accelerator="cpu", enable_progress_bar=False)("distill", max_steps=hp.iterations,
                                                                         max_epochs=1)
    trainer.fit(module, StepLoader(hp.iterations, lambda: module.global_step))
    assert trainer.global_step == hp.iterations
    after = _probe(module, probes)
    assert after < 0.9 * before, (before, after)
    images, labels, lr = module.current_set()
    assert torch.equal(labels, y) and lr is None and not torch.equal(images, x)


@pytest.mark.parametrize("kind", ["ce", "cos"])
def test_trajectory_matching_adds_the_clom_term_to_the_image_gradient_only(tmp_path, kind):
    """``method.clom`` in trajectory matching: ``clom_backward`` adds exactly ``alpha * L_CLoM`` of the
    member drawn from its (seed, iteration) generator to the images' gradient; labels and lr get none."""
    from lightning_dd.methods.images.trajectory_matching import TrajectoryMatching
    from lightning_dd.nets import FlatParams, build_net

    hp_clom = _clom(enabled=True, kind=kind, alpha=5.0, archs=["ConvNet"], seeds=1, epochs=[1, 2], batch=16)
    ctx = _pool_ctx(tmp_path)
    dm, pool = ctx.dm, ModelPool.build(hp_clom, ctx)
    net = build_net("ConvNet", 3, 2, (8, 8), width=4, depth=1)
    traj = torch.stack([FlatParams(net).flatten()] * 3)
    hp = method("datm", soft_labels=True, min_start_epoch=0, current_max_start_epoch=1, max_start_epoch=1,
                expert_epochs=1, expert_train_epochs=3, clom=hp_clom.model_dump())
    x = dm.train_images[:4].clone()
    soft = F.one_hot(dm.train_labels[:4], 2).float() * 3
    module = TrajectoryMatching(x, soft, [traj], net, hp, None, clom=ClomTerm(hp_clom, pool),
                                clom_real=(dm.train_images, dm.train_labels))
    module.on_fit_start()
    logs = module.clom_backward(3)
    g = torch.Generator().manual_seed(3 + 7_777_777)
    member = pool.draw(g)
    xi = x.clone().requires_grad_(True)
    if kind == "ce":
        want = hp_clom.alpha * F.cross_entropy(pool.logits(member, xi), F.softmax(soft, 1))
    else:
        idx = torch.randperm(40, generator=g)[:40]
        with torch.no_grad():
            f_real = pool.features(member, dm.train_images[idx])
        want = hp_clom.alpha * cos_clom(pool.features(member, xi), dm.train_labels[:4], f_real, dm.train_labels[idx])
    want.backward()
    assert logs["distill/loss_clom"].item() == pytest.approx(want.item(), rel=1e-5)
    assert logs["distill/clom_epoch"] == member.epoch
    torch.testing.assert_close(module.images.grad, xi.grad)
    assert module.labels.grad is None and module.syn_lr.grad is None


def test_paper_config_trains_as_long_as_main_dm():
    """experiment=dm_cifar10 at paper size has main_DM.py's training length (the README command
    ``--ipc 10 --init real --lr_img 1``, defaults ``--Iteration 20000 --batch_real 256``): 20,000
    updates of the synthetic set (the reference loop runs ``Iteration + 1`` times and evaluates the
    set before the last update, i.e. after 20,000), each one embedding 256 real images of every one of
    the 10 classes (2,560; CIFAR-10 classes have 5,000) and the 100 synthetic images, from all 5,000
    training images per class. Checked through DistributionMatching.dm_step_loss on a stand-in data set
    of the same class sizes (8x8 images; the embedding network replaced by a recorder)."""
    from hydra import compose, initialize_config_dir

    from conftest import ROOT
    from lightning_dd.core.config import instantiate_node
    from lightning_dd.data.batches import StepLoader
    from omegaconf import OmegaConf

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=dm_cifar10"])
    assert cfg.data.train_per_class is None and cfg.data.zca is False
    dm_method = instantiate_node(cfg.method, "method")
    assert len(StepLoader(dm_method.iterations, lambda: 0)) == dm_method.iterations == 20_000
    labels = torch.arange(10).repeat(5000)
    x = torch.zeros(len(labels), 3, 8, 8)
    ipc = dm_method.ipc
    module = DistributionMatching(x[: 10 * ipc], torch.arange(10).repeat_interleave(ipc), x, labels, 10,
                                  OmegaConf.to_container(cfg.net), dm_method, None)
    seen = []
    recorder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 4), torch.nn.Linear(4, 10))
    recorder.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].shape[0]))
    module.embedding_net = lambda it: recorder
    with torch.no_grad():
        module.dm_step_loss(0)
    assert seen == [10 * 256, 10 * 10]  # real images, then synthetic images, per update
