"""The method contract: methods, data, nets and Trainers are built from config; bad values fail
before any work, naming the key; the Trainer settings reach every stage; a new method is one
class plus one config file."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

from conftest import ROOT
from lightning_dd.core.config import ConfigError
from lightning_dd.core.trainer import TrainerFactory
from lightning_dd.methods.base import MethodOutput
from lightning_dd.methods.images.base import ImageMethod
from lightning_dd.results import DistilledSet
from lightning_dd.runner import check_config, run

QUICK = ["method.num_experts=1", "method.expert_train_epochs=3", "method.max_start_epoch=2",
         "method.current_max_start_epoch=1", "method.syn_steps=3", "method.iterations=2", "eval.epochs=2",
         "eval.num_eval=1", "logger.wandb.enabled=false", "trainer.enable_progress_bar=false", "trainer.compile=false"]


def _cfg(tmp_path, *overrides, searchpath=None):
    """The composed run config, as `python train.py` builds it (Hydra's runtime config set)."""
    extra = [f"hydra.searchpath=[file://{searchpath}]"] if searchpath else []
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*extra, f"paths.output_dir={tmp_path / 'run'}",
                                          f"paths.cache_dir={tmp_path / 'cache'}", *overrides],
                      return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


class DataTouched(Exception):
    pass


@pytest.fixture
def no_data(monkeypatch):
    """Any DataModule setup raises: an error that arrives first proves the check came before the data."""
    import lightning_dd.data.images as images

    def boom(self, stage=None):
        raise DataTouched("data was read before the config was checked")
    monkeypatch.setattr(images.ImageDataModule, "setup", boom)


@pytest.mark.parametrize("override, key", [
    ("method.ipc=abc", "method.ipc"),
    ("method.ipc=0", "method.ipc"),
    ("method.ipc=-1", "method.ipc"),
    ("method.lr_img=-100", "method.lr_img"),
    ("method.lr_teacher=-0.01", "method.lr_teacher"),
    ("method.lr_lr=nan", "method.lr_lr"),
    ("method.meta_grad=recompte", "method.meta_grad"),
    ("+method.sy_steps=3", "method.sy_steps"),
    ("stage=distil", "stage"),
    ("eval.augment=dsaa", "eval.augment"),
    ("eval.nets=[ConvNet,LeNet7]", "eval.nets"),
    ("eval.lr=0", "eval.lr"),
    ("eval.num_eval=0", "eval.num_eval"),
    ("ckpt_path=/nonexistent/last.ckpt", "ckpt_path"),
    ("net.norm=layernrm", "net: net.norm must be"),
    ("method.max_start_epoch=120", "method: Value error, the last start epoch"),  # past the 100 expert epochs
])
def test_bad_value_fails_before_any_data_naming_the_key(tmp_path, no_data, override, key):
    cfg = _cfg(tmp_path, "experiment=datm_cifar10", override)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        run(cfg)


def test_scale_cpu_without_a_preset_fails_naming_the_experiment(tmp_path, no_data):
    exp = tmp_path / "conf" / "experiment"
    exp.mkdir(parents=True)
    (exp / "no_cpu_preset.yaml").write_text("# @package _global_\nmethod:\n  ipc: 2\n")
    cfg = _cfg(tmp_path, "experiment=no_cpu_preset", "scale=cpu", searchpath=tmp_path / "conf")
    with pytest.raises(ConfigError, match="scale=cpu: no_cpu_preset has no CPU preset"):
        run(cfg)
    check_config(_cfg(tmp_path, "experiment=no_cpu_preset", searchpath=tmp_path / "conf"))  # paper scale is fine


def test_trainer_settings_reach_every_stage(tmp_path, monkeypatch):
    """trainer.precision=bf16-mixed: every Trainer of one run (experts, distillation, evaluation of
    the set and of both baselines) is built with it."""
    built = []
    call = TrainerFactory.__call__

    def spy(self, stage, **kw):
        t = call(self, stage, **kw)
        built.append((stage, t.precision, t.num_devices, type(t.strategy).__name__))
        return t
    monkeypatch.setattr(TrainerFactory, "__call__", spy)
    run(_cfg(tmp_path, *QUICK, "trainer.precision=bf16-mixed", "trainer.accelerator=cpu"))
    stages = [b[0] for b in built]
    assert set(stages) == {"experts", "distill", "evaluate"} and stages.count("evaluate") == 3, stages
    assert all(b[1] == "bf16-mixed" and b[2] == 1 for b in built), built


def test_devices_and_strategy_reach_the_trainers():
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp_spawn"])
    from hydra.utils import instantiate

    make = instantiate(cfg.trainer)
    for stage in ("experts", "distill", "evaluate", "squeeze", "recover", "condense"):
        t = make(stage, max_steps=1)
        assert t.num_devices == 2 and type(t.strategy).__name__ == "DDPStrategy", stage
    with pytest.raises(ValueError, match="come from conf/trainer"):
        make("distill", precision="16-mixed")


class ToyMethod(ImageMethod):
    """A method defined outside lightning_dd: the first `ipc` training images of each class, scaled."""

    scale: float

    def run(self, ctx):
        idx = torch.cat([i[: self.ipc] for i in ctx.dm.class_indices()])
        x, y = ctx.dm.train_images[idx] * self.scale, ctx.dm.train_labels[idx]
        return MethodOutput(result=DistilledSet(x, y, None, ctx.dm.classes, ctx.dm.preprocessing.state(),
                                                method=self.name, ipc=self.ipc),
                            metrics={"toy/scale": self.scale})


@pytest.mark.slow
def test_a_new_method_is_one_class_and_one_config(tmp_path):
    """A method whose `_target_` names a class defined in this test file runs through
    `python train.py`, from a config directory outside the project (nothing under lightning_dd/)."""
    conf = tmp_path / "conf" / "method"
    conf.mkdir(parents=True)
    (conf / "toy.yaml").write_text(textwrap.dedent("""\
        _target_: test_contract.ToyMethod
        name: toy
        ipc: 3
        scale: 0.5
    """))
    (tmp_path / "conf" / "experiment").mkdir()
    (tmp_path / "conf" / "experiment" / "toy_digits.yaml").write_text(textwrap.dedent("""\
        # @package _global_
        defaults:
          - override /data: digits
          - override /method: toy
    """))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), "WANDB_MODE": "offline", "LDD_CACHE_DIR": str(tmp_path)}
    args = [sys.executable, "train.py", f"--config-dir={tmp_path / 'conf'}", "experiment=toy_digits", "eval.epochs=20",
            "eval.num_eval=1", "eval.baselines=[random]", "logger.wandb.enabled=false", f"hydra.run.dir={tmp_path / 'run'}"]
    r = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["toy/scale"] == 0.5 and m["eval/ConvNet/n_runs"] == 1 and "baseline/random/ConvNet/acc_mean" in m
    d = DistilledSet.load(tmp_path / "run" / "distilled.pt")
    assert d.method == "toy" and d.images.shape[0] == 30
    bad = subprocess.run([*args, "method.scale=abc"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "method.scale" in bad.stdout + bad.stderr


def test_resume_without_a_checkpoint_says_so_and_starts_fresh(tmp_path, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="lightning_dd"):
        m = run(_cfg(tmp_path, *QUICK, "resume=true", "stage=distill"))
    assert m["distill/iterations"] == 2
    assert any("resume=true but there is no checkpoint" in r.getMessage() for r in caplog.records), caplog.text


def test_step_loader_resumes_at_the_saved_step():
    """What Lightning saves and restores for a mid-way checkpoint: the next step, so the resumed
    epoch yields steps k..n-1 of n (the progress bar counts k..n of n)."""
    from lightning_dd.data.batches import StepLoader

    done = {"steps": 12}
    loader = StepLoader(40, lambda: done["steps"])
    state = loader.state_dict()
    fresh = StepLoader(40, lambda: 0)
    fresh.load_state_dict(state)
    assert len(fresh) == 40 and list(fresh) == list(range(12, 40))
    assert list(fresh) == list(range(40))  # the next epoch starts at 0 again
