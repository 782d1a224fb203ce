"""Dataset Quantization: GraphCut's incremental gain is the naive one, bins partition each class,
sampling is class-balanced with the right count, the embeddings' similarity is the cosine of the
materialized gradient embedding, and the method runs end to end through the runner."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_dd.methods.images.dataset_quantization import (bin_quotas, cosine_similarity, graph_cut,
                                                               last_layer_embeddings, quantize_bins, sample_bins)
from configs import method


def _sim(n, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return cosine_similarity(torch.randn(n, d, generator=g, dtype=torch.float64))


def naive_graph_cut(sim, k, lam=1.0):
    """The reference's NaiveGreedy + GraphCut.calc_gain: the whole gain recomputed at every step."""
    selected = torch.zeros(len(sim), dtype=torch.bool)
    order, gains = [], []
    for _ in range(k):
        gain = lam * sim.sum(0) - 2 * sim[selected].sum(0)
        gain[selected] = -torch.inf
        j = int(gain.argmax())
        order.append(j)
        gains.append(gain)
        selected[j] = True
    return torch.tensor(order), gains


@pytest.mark.parametrize("lam", [1.0, 0.3, 2.5])
def test_incremental_graph_cut_equals_naive_recomputation(lam):
    sim = _sim(120, seed=1)
    fast = graph_cut(sim, 60, lam)
    slow, _ = naive_graph_cut(sim, 60, lam)
    assert torch.equal(fast, slow)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 40), d=st.integers(1, 8), frac=st.floats(0.01, 1.0), lam=st.floats(0.1, 3.0),
       seed=st.integers(0, 2**16))
def test_graph_cut_property_matches_naive_and_is_a_permutation_prefix(n, d, frac, lam, seed):
    sim = _sim(n, d, seed)
    k = max(1, round(frac * n))
    fast = graph_cut(sim, k, lam)
    slow, gains = naive_graph_cut(sim, k, lam)
    assert len(set(fast.tolist())) == k
    # same choices, or (float ties) a choice whose naive gain is the maximum too
    for t, (a, b) in enumerate(zip(fast.tolist(), slow.tolist())):
        if a != b:
            assert torch.isclose(gains[t][a], gains[t][b]), (t, a, b)
            break


def test_graph_cut_trades_representativeness_for_diversity_by_lambda():
    # two tight orthogonal clusters, 30 and 10 points (S ~ 1 within, 0.5 across): after m picks in
    # the big one its gain is ~ lam*35 - 2m, the small one's ~ lam*25 - m, so with lam = 1 the small
    # cluster gets its first pick after ~10 big-cluster picks, and with a small lam at once
    g = torch.Generator().manual_seed(0)
    a = torch.randn(30, 4, generator=g) * 0.01 + torch.tensor([1.0, 0, 0, 0])
    b = torch.randn(10, 4, generator=g) * 0.01 + torch.tensor([0, 1.0, 0, 0])
    sim = cosine_similarity(torch.cat([a, b]))
    first_small = int((graph_cut(sim, 20) >= 30).nonzero()[0])
    assert first_small in (10, 11)
    sel = graph_cut(sim, 2, lam=0.05)
    assert sel[0] < 30 and sel[1] >= 30


def test_graph_cut_rejects_bad_budgets():
    with pytest.raises(ValueError, match="asked for 5 of 3"):
        graph_cut(_sim(3), 5)
    with pytest.raises(ValueError, match="asked for 0 of 3"):
        graph_cut(_sim(3), 0)


@pytest.mark.parametrize("n,num_bins", [(100, 10), (103, 10), (57, 4), (10, 10), (5, 1)])
def test_bins_are_disjoint_and_cover_the_class(n, num_bins):
    sim = _sim(n, seed=n)
    bins = quantize_bins(sim, num_bins)
    assert len(bins) == num_bins
    flat = torch.cat(bins)
    assert len(flat) == n and torch.equal(flat.sort().values, torch.arange(n))
    size = round(n / num_bins)
    assert all(len(b) == size for b in bins[:-1]) and len(bins[-1]) == n - size * (num_bins - 1)


def test_first_bin_is_graph_cut_and_later_bins_use_the_remaining_pool():
    sim = _sim(50, seed=3)
    bins = quantize_bins(sim, 5)
    assert torch.equal(bins[0], graph_cut(sim, 10))
    rest = torch.tensor(sorted(set(range(50)) - set(bins[0].tolist())))
    assert torch.equal(bins[1], rest[graph_cut(sim[rest][:, rest], 10)])


def test_too_many_bins_for_a_class_is_an_error():
    with pytest.raises(ValueError, match="cannot fill 10 non-empty bins"):
        quantize_bins(_sim(8), 10)


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 50), min_size=1, max_size=12), frac=st.floats(0, 1), seed=st.integers(0, 99))
def test_exact_bin_sampling_draws_the_budget_proportionally_from_every_bin(sizes, frac, seed):
    k = round(frac * sum(sizes))
    quotas = bin_quotas(sizes, k, "exact")
    assert sum(quotas) == k
    assert all(0 <= q <= s and abs(q - k * s / sum(sizes)) < 1 for q, s in zip(quotas, sizes))
    starts = torch.tensor([0, *sizes]).cumsum(0)
    bins = [torch.arange(int(starts[i]), int(starts[i + 1])) for i in range(len(sizes))]
    got = sample_bins(bins, k, torch.Generator().manual_seed(seed), "exact")
    assert len(got) == k == len(set(got.tolist()))
    for b, q in zip(bins, quotas):
        assert int(torch.isin(got, b).sum()) == q


def test_equal_bins_give_the_reference_per_bin_quota():
    assert bin_quotas([100] * 10, 200) == bin_quotas([100] * 10, 200, "exact") == [20] * 10


def test_default_bin_quota_rounds_each_bin_as_the_reference():
    """quantize_bin.py: round(ratio * |bin|) per bin, half to even (12.5 % of 500 -> 62, not 62.5 on
    average), so the total can miss the class budget; ``exact`` keeps it."""
    assert bin_quotas([500] * 10, 625) == [62] * 10
    assert bin_quotas([10] * 4, 6) == [2] * 4 and bin_quotas([10] * 4, 6, "exact") == [2, 2, 1, 1]
    assert bin_quotas([7, 3], 10) == [7, 3]


def test_gradient_similarity_is_the_cosine_of_the_materialized_embedding():
    g0 = torch.Generator().manual_seed(0)
    e, g = torch.randn(20, 7, generator=g0), torch.randn(20, 3, generator=g0)
    full = torch.cat([g, (g[:, :, None] * e[:, None, :]).flatten(1)], 1).double()  # [dL/db, dL/dW]
    cos = torch.nn.functional.cosine_similarity(full[:, None], full[None], dim=-1)
    assert torch.allclose(cosine_similarity(e, g), 0.5 + 0.5 * cos, atol=1e-10)


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(12, 5)
        self.classifier = torch.nn.Linear(5, 3)

    def forward(self, x):
        return self.classifier(self.body(x.flatten(1)))


@pytest.mark.parametrize("loss", ["softmax_ce", "ce"])
def test_last_layer_gradient_embedding_is_the_classifier_gradient(loss):
    torch.manual_seed(0)
    net, x, y = _Net(), torch.randn(4, 3, 2, 2), torch.tensor([0, 2, 1, 2])
    e, g = last_layer_embeddings(net, x, y, "gradient", loss, chunk=3)
    for i in range(4):
        net.zero_grad()
        z = net(x[i : i + 1])
        torch.nn.functional.cross_entropy(z.softmax(1) if loss == "softmax_ce" else z, y[i : i + 1]).backward()
        assert torch.allclose(net.classifier.bias.grad, g[i], atol=1e-6)
        assert torch.allclose(net.classifier.weight.grad, torch.outer(g[i], e[i]), atol=1e-6)
    e2, none = last_layer_embeddings(net, x, y, "features")
    assert none is None and torch.allclose(e, e2)


def test_typed_fields_are_checked():
    from hydra.errors import InstantiationException

    with pytest.raises(InstantiationException, match="fraction"):
        method("dq", fraction=1.5)
    with pytest.raises(InstantiationException, match="embedding"):
        method("graphcut", embedding="pixels")
    with pytest.raises(InstantiationException, match="drop_ratio"):
        method("dq", **{"pixel.enabled": True, "pixel.drop_ratio": 1.5})


class _DM:
    def __init__(self, sizes):
        self.sizes = sizes

    def class_indices(self):
        starts = torch.tensor([0, *self.sizes]).cumsum(0)
        return [torch.arange(int(starts[c]), int(starts[c + 1])) for c in range(len(self.sizes))]


def test_every_selector_takes_the_same_fraction_budget():
    dm = _DM([1000] * 10)
    for name in ("dq", "graphcut", "random", "herding"):
        kw = {"pixel.enabled": False} if name == "dq" else {}
        assert method(name, fraction=0.2, **kw).per_class(dm) == 200
        assert method(name, fraction=None, ipc=7, **kw).per_class(dm) == 7
    # with the pixel step (on by default, 20 % of the patches dropped) DQ's bins buy 1 / 0.8 as many images
    assert method("dq", fraction=0.2).per_class(dm) == 250


def _dq_run(tmp_path, monkeypatch, *overrides):
    """DQ built from its config node and run as the runner runs it (a tiny expert on digits, keep
    25 % of 40 images per class in 4 bins) with ``overrides`` added. Returns ``(output, datamodule)``."""
    import dataclasses

    from hydra import compose, initialize_config_dir

    from conftest import ROOT
    from lightning_dd.core.config import instantiate_node
    from lightning_dd.runner import check_config

    monkeypatch.setenv("LDD_CACHE_DIR", str(tmp_path / "cache"))
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[
            "experiment=dq_cifar10", "data=digits", "data.zca=false", "data.train_per_class=40", "net.width=8",
            "net.depth=2", "method.fraction=0.25", "method.num_bins=4", "method.expert_train_epochs=1",
            "method.expert_batch=64", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
            "trainer.compile=false", *overrides])
    _, dq, ctx = check_config(cfg)  # validated and checked as the runner does
    dm = instantiate_node(cfg.data, "data")
    dm.setup()
    return dq.run(dataclasses.replace(ctx, dm=dm, out_dir=tmp_path)), dm


@pytest.mark.slow
def test_dq_runs_through_the_method_contract_class_balanced_with_disjoint_bins(tmp_path, monkeypatch):
    """DQ built from its config node and run as the runner runs it (a tiny expert on digits): keep
    25 % of 40 images per class in 4 bins of 10 is round(2.5) = 2 per bin (the reference's per-bin
    rounding, half to even), 8 per class, 2 from every bin."""
    out, dm = _dq_run(tmp_path, monkeypatch, "method.pixel.enabled=false")
    assert out.result.ipc == 8
    assert torch.equal(torch.bincount(out.result.labels, minlength=10), torch.full((10,), 8))
    bins = torch.load(tmp_path / "bins.pt", weights_only=True)["bins"]
    for class_bins, i in zip(bins, dm.class_indices()):
        flat = torch.cat(class_bins)
        assert len(class_bins) == 4 and torch.equal(flat.sort().values, i.sort().values)  # disjoint, cover
    # the chosen images are real training images of their class, 8 distinct per class, 2 from every bin
    for c, class_bins in enumerate(bins):
        mine = out.result.images[out.result.labels == c]
        hits = [int((mine[:, None] == dm.train_images[b][None]).flatten(2).all(-1).any(0).sum()) for b in class_bins]
        assert hits == [2, 2, 2, 2]


@pytest.mark.slow
def test_dq_with_the_pixel_step_runs_end_to_end_and_draws_it(tmp_path, monkeypatch):
    """The pixel step (on by default) inside a DQ run (digits, a 1-epoch MAE): keep 25 % with 20 % of
    the patches dropped buys round(10 / 0.8) = 12 images per class for the bins (3 of each bin of 10,
    the reference's per-bin rounding), 1 of the 4 patches of each image is dropped (int(4 * 0.8) = 3
    kept), the mask and the picture are written."""
    from PIL import Image

    out, _ = _dq_run(tmp_path, monkeypatch, "method.pixel.mae_dim=16",
                     "method.pixel.mae_depth=1", "method.pixel.mae_heads=2", "method.pixel.decoder_dim=16",
                     "method.pixel.decoder_depth=1", "method.pixel.mae_epochs=1")
    assert torch.equal(torch.bincount(out.result.labels, minlength=10), torch.full((10,), 12))
    dropped = torch.load(tmp_path / "dropped_patches.pt", weights_only=True)["dropped"]
    assert dropped.shape == (120, 4) and int(dropped.sum(1).max()) == 1  # 1 of the 4 patches of 8x8 digits
    w, h = Image.open(tmp_path / "pixel_step.png").size
    assert w > h > 200


def test_cosine_eval_schedule_is_validate_cifar_per_epoch_and_step_is_unchanged():
    """eval.schedule=cosine: the lr of every step of epoch e is CosineAnnealingLR(T_max=epochs) after
    e epoch steps (validate_cifar.py); the default ``step`` is still x0.1 after half of the steps."""
    from lightning_dd.evaluate.student import lr_schedule

    def lrs(schedule, steps, epochs):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        sched, out = lr_schedule(opt, schedule, steps, epochs), []
        for _ in range(steps):
            out.append(opt.param_groups[0]["lr"])
            opt.step(), sched.step()
        return out

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    ref_sched, ref = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5), []
    for _ in range(5):
        ref += [opt.param_groups[0]["lr"]] * 3
        opt.step(), ref_sched.step()
    assert lrs("cosine", 15, 5) == pytest.approx(ref, rel=1e-12, abs=1e-15)
    assert lrs("step", 10, 5) == pytest.approx([0.1] * 5 + [0.01] * 5)
    with pytest.raises(ValueError, match="equal epochs"):
        lrs("cosine", 16, 5)


def test_paper_config_trains_the_evaluation_as_long_as_the_reference():
    """experiment=dq_cifar10 at paper size: the README's CIFAR pipeline keeps 10 % of storage as
    ``--fraction 0.125`` of each of 10 bins of 500 images per class (round(62.5) = 62 per bin:
    6,200 images) with 20 % of each image's patches dropped, then validate_cifar.py trains 200 epochs
    at batch 16 (the README, keep ratio <= 10 %) without drop_last: 200 x ceil(6200 / 16) = 77,600
    SGD steps, 1,240,000 images seen. The composed config's method and evaluator give the same."""
    import math

    from hydra import compose, initialize_config_dir

    from conftest import ROOT
    from lightning_dd.core.config import instantiate_node
    from lightning_dd.data.batches import TensorBatches

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=dq_cifar10"])
    assert cfg.data.train_per_class is None  # all 5,000 per class
    dq = instantiate_node(cfg.method, "method")
    n, nb = 5000, dq.num_bins
    per_class = dq.per_class(_DM([n] * 10))
    assert per_class == 625  # 10 % of storage at 80 % of the pixels
    sizes = [round(n / nb)] * (nb - 1) + [n - round(n / nb) * (nb - 1)]  # the bins (pinned by test_parity_dq)
    kept = 10 * sum(bin_quotas(sizes, per_class, dq.bin_quota))
    assert kept == 6200
    steps = cfg.eval.epochs * TensorBatches((torch.empty(kept, 1),), cfg.eval.batch_size, 1).steps_per_epoch()
    assert steps == 200 * math.ceil(6200 / 16) == 77_600
    assert cfg.eval.epochs * kept == 1_240_000
    assert (cfg.eval.schedule, cfg.eval.lr, cfg.eval.augment, cfg.eval.nets) == ("cosine", 0.1, "crop_flip",
                                                                                 ["ResNet18BN"])
