"""Evaluation seeds stacked with vmap (lightning_dd.evaluate.ensemble) against one-by-one runs: per
seed the same initial weights, augmentation draws, batch order (hence losses to float32 rounding)
and test accuracy; the mode choice and its errors."""
import copy
import logging

import pytest
import torch

from configs import student_settings
from lightning_dd.augment.dsa import DSA
from lightning_dd.core.trainer import TrainerFactory
from lightning_dd.data import DigitsDataModule
from lightning_dd.evaluate import evaluate_set, student
from lightning_dd.evaluate.ensemble import SeedEnsembleModule, batched_support, seed_mode
from lightning_dd.nets import build_net


@pytest.fixture(scope="module")
def digits():
    dm = DigitsDataModule()
    dm.setup()
    return dm


def _traced(monkeypatch, dm, x, y, mode, net=None, num_eval=3, epochs=20, **kw):
    """evaluate_set in ``mode`` with what each seed drew and lost recorded: initial weights, DSA
    parameters and losses per step, in ``[seed][step]`` order, and the global RNG state after."""
    inits, draws, losses = [], [], []
    build, sample = student.build_net_cfg, DSA.sample

    def spy_build(*a, **k):
        n = build(*a, **k)
        inits.append(copy.deepcopy(n.state_dict()))
        return n

    def spy_sample(self, *a, **k):
        p = sample(self, *a, **k)
        draws.append(p)
        return p

    seq_step, stacked_step = student.StudentModule.training_step, SeedEnsembleModule.training_step

    def spy_seq(self, batch, i):
        loss = seq_step(self, batch, i)
        losses.append(loss.detach().reshape(1))
        return loss

    def spy_stacked(self, batch, i):
        loss = stacked_step(self, batch, i)
        losses.append(self.last_losses)
        return loss

    monkeypatch.setattr(student, "build_net_cfg", spy_build)
    monkeypatch.setattr(DSA, "sample", spy_sample)
    monkeypatch.setattr(student.StudentModule, "training_step", spy_seq)
    monkeypatch.setattr(SeedEnsembleModule, "training_step", spy_stacked)
    teacher = kw.pop("teacher", None)
    settings = student_settings(**{"epochs": epochs, "batch_size": 16, "num_eval": num_eval, "seed": 3, "augment": "dsa",
                                   "parallel_seeds": mode, **kw})
    r = evaluate_set(x, y, dm.test_images, dm.test_labels, 10, net or {"name": "ConvNet", "width": 16, "depth": 2},
                     settings, lr=0.01, dsa=DSA(), make_trainer=TrainerFactory(accelerator="cpu", compile=False),
                     teacher=teacher)
    monkeypatch.undo()
    if mode == "vmap":  # step-major -> seed-major; the probe's net is built in a forked RNG, drop it
        inits = inits[-num_eval:]
        draws = [draws[s::num_eval] for s in range(num_eval)]
        losses = torch.stack(losses).T
    else:
        steps = len(draws) // num_eval
        draws = [draws[s * steps:(s + 1) * steps] for s in range(num_eval)]
        losses = torch.cat(losses).view(num_eval, -1)
    return r, inits, draws, losses, torch.get_rng_state()


def _assert_same_runs(a, b, n_test, loss_rtol=1e-4):
    (ra, inits_a, draws_a, loss_a, rng_a), (rb, inits_b, draws_b, loss_b, rng_b) = a, b
    for sa, sb in zip(inits_a, inits_b, strict=True):
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    for da, db in zip(draws_a, draws_b, strict=True):  # same DSA families and parameters, step by step
        assert [p.ops for p in da] == [p.ops for p in db]
        assert all(torch.equal(p.values[k], q.values[k]) for p, q in zip(da, db) for k in p.values)
    assert loss_a.shape == loss_b.shape
    torch.testing.assert_close(loss_a, loss_b, rtol=loss_rtol, atol=1e-6)
    assert not torch.equal(loss_a[0], loss_a[1])  # the seeds do differ
    # accuracies: identical, or at most one test image apart (float32 reassociation in the stacked kernels)
    assert all(abs(p - q) * n_test <= 1.0 + 1e-6 for p, q in zip(ra.accs, rb.accs, strict=True)), (ra.accs, rb.accs)
    assert torch.equal(rng_a, rng_b)  # the global RNG is left where the one-by-one runs leave it


def test_stacked_seeds_draw_and_learn_what_sequential_runs_do(monkeypatch, digits, caplog):
    x, y = digits.random_subset(5, 0)  # 50 images, batch 16: 4 steps per epoch, the last one partial
    with caplog.at_level(logging.INFO, logger="lightning_dd.evaluate.student"):
        seq = _traced(monkeypatch, digits, x, y, "sequential")
        vm = _traced(monkeypatch, digits, x, y, "vmap")
    assert "stacked with vmap" in caplog.text and "one by one" in caplog.text
    assert vm[3].shape == (3, 80)
    _assert_same_runs(seq, vm, len(digits.test_labels))
    assert seq[0].accs == vm[0].accs  # observed on this data: identical accuracies


def test_soft_labels_teacher_and_batchnorm_stacked(monkeypatch, digits):
    """Soft-label logits, KD from a teacher on each seed's augmented batch, and a BatchNorm ConvNet
    (one set of running statistics per seed, used at test time)."""
    x, y = digits.random_subset(3, 1)
    noise = torch.randn(len(y), 10, generator=torch.Generator().manual_seed(0))
    soft = torch.nn.functional.one_hot(y, 10).float() * 4 + 0.1 * noise
    n = len(digits.test_labels)
    for mode_kw in ({"labels": soft, "soft_loss": "kl", "temperature": 2.0},
                    {"labels": y, "net": {"name": "ConvNet", "width": 8, "depth": 2, "norm": "batchnorm"}}):
        kw = dict(mode_kw)
        labels = kw.pop("labels")
        _assert_same_runs(_traced(monkeypatch, digits, x, labels, "sequential", num_eval=2, epochs=10, **kw),
                          _traced(monkeypatch, digits, x, labels, "vmap", num_eval=2, epochs=10, **kw), n)
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    kw = {"label_mode": "teacher", "teacher": teacher, "soft_loss": "soft_ce", "num_eval": 2, "epochs": 10}
    _assert_same_runs(_traced(monkeypatch, digits, x, y, "sequential", **kw),
                      _traced(monkeypatch, digits, x, y, "vmap", **kw), n)


@pytest.mark.parametrize("name, kw", [("ConvNet", {"width": 8, "norm": "batchnorm"}), ("AlexNet", {}),
                                      ("VGG11", {}), ("ResNet18", {})])
def test_evaluation_nets_can_be_stacked(name, kw):
    assert batched_support(build_net(name, 3, 10, (32, 32), **kw), torch.randn(2, 3, 32, 32)) is None


class _Dropout(torch.nn.Module):
    def __init__(self, channel, num_classes, im_size):
        super().__init__()
        self.fc = torch.nn.Linear(channel * im_size[0] * im_size[1], num_classes)

    def forward(self, x):
        return torch.nn.functional.dropout(self.fc(x.flatten(1)), 0.5, self.training)


def test_unstackable_net_falls_back_or_fails_clearly(monkeypatch, digits, caplog):
    """Dropout draws randomness inside vmap, which cannot match the one-by-one runs: auto (on a
    device where it would stack) falls back with the reason logged; an explicit vmap is an error."""
    from lightning_dd.evaluate import ensemble

    monkeypatch.setattr(ensemble, "trains_on_cuda", lambda make_trainer: True)  # auto would stack here
    x, y = digits.random_subset(2, 0)
    net = {"_target_": f"{__name__}._Dropout"}
    assert "randomness" in batched_support(_Dropout(1, 10, (8, 8)), x)
    kw = {"epochs": 2, "num_eval": 2}
    with pytest.raises(ValueError, match="_Dropout cannot be stacked over seeds .*sequential or auto"):
        evaluate_set(x, y, digits.test_images, digits.test_labels, 10, net, student_settings(parallel_seeds="vmap", **kw),
                     lr=0.01, make_trainer=TrainerFactory(accelerator="cpu"))
    with caplog.at_level(logging.INFO, logger="lightning_dd.evaluate.student"):
        r = evaluate_set(x, y, digits.test_images, digits.test_labels, 10, net, student_settings(parallel_seeds="auto", **kw),
                         lr=0.01, make_trainer=TrainerFactory(accelerator="cpu"))
    assert len(r.accs) == 2 and "one by one (_Dropout cannot be stacked over seeds (RuntimeError" in caplog.text


def test_seed_mode_choice(monkeypatch):
    cpu, gpu = TrainerFactory(accelerator="cpu"), TrainerFactory(accelerator="gpu")
    assert seed_mode("auto", 5, cpu)[0] == "sequential"  # CPU: stacking does not pay (benchmarks/eval_seeds.py)
    assert seed_mode("auto", 5, gpu) == ("vmap", "CUDA device")
    assert seed_mode("auto", 1, gpu)[0] == "sequential"
    assert seed_mode("vmap", 5, cpu)[0] == "vmap"
    assert seed_mode("sequential", 5, gpu)[0] == "sequential"
    fp16 = TrainerFactory(accelerator="gpu", precision="16-mixed")
    assert seed_mode("auto", 5, fp16)[0] == "sequential"
    with pytest.raises(ValueError, match="GradScaler"):
        seed_mode("vmap", 5, fp16)
    with pytest.raises(ValueError, match="trainer.devices=2"):
        seed_mode("vmap", 5, TrainerFactory(accelerator="gpu", devices=2, strategy="ddp"))
    with pytest.raises(ValueError, match="parallel_seeds must be one of"):
        seed_mode("threads", 5, cpu)


def test_eval_config_key(tmp_path):
    from omegaconf import OmegaConf

    from conftest import ROOT
    from lightning_dd.core.config import ConfigError, validated
    from lightning_dd.evaluate.images import ImageEvalConfig

    cfg = OmegaConf.load(ROOT / "conf" / "eval" / "default.yaml")
    assert cfg.parallel_seeds == "auto"
    assert validated(ImageEvalConfig, cfg, "eval").parallel_seeds == "auto"
    cfg.parallel_seeds = "threads"
    with pytest.raises((ConfigError, ValueError), match="parallel_seeds"):
        validated(ImageEvalConfig, cfg, "eval")
