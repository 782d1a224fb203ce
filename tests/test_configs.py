"""Every experiment preset builds and validates at paper and CPU scale, with the settings its paper names."""

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

from conftest import ROOT
from lightning_dd.methods.images.experts import ExpertSettings
from lightning_dd.runner import check_config

EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))


def _cfg(*overrides):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.mark.parametrize("scale", ["paper", "cpu"])
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_builds_and_validates(name, scale):
    """Every experiment at both scales: the method, the Trainer factory and the eval node pass
    their typed configs (what `python train.py experiment=NAME scale=SCALE` checks before any data)."""
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={name}", f"scale={scale}"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    run_cfg, method, ctx = check_config(cfg)
    assert method.name == cfg.method.name and run_cfg.scale_name == scale
    assert (run_cfg.scale_preset == name) == (scale == "cpu")
    if scale == "cpu" and name.endswith("cifar10") and isinstance(method, ExpertSettings):
        # the CIFAR-10 CPU presets of expert-based methods share data, net and experts (one cache)
        # (keep-ratio selectors, DQ and GraphCut, select from the pool of 1,000 per class)
        pool = 1000 if getattr(method, "fraction", None) else 2000
        assert cfg.data.train_per_class == pool and cfg.net.width == 64 and method.num_experts == 2


def test_paper_settings_of_datm_and_mtt():
    ipc = {n: _cfg(f"experiment={e}").method for n, e in
           [(1, "datm_cifar10_ipc1"), (10, "datm_cifar10"), (50, "datm_cifar10_ipc50")]}
    assert [ipc[i].max_start_epoch for i in (1, 10, 50)] == [4, 20, 40]
    assert [ipc[i].lr_img for i in (1, 10, 50)] == [100, 100, 1000]
    assert [ipc[i].batch_syn for i in (1, 10, 50)] == [10, 100, 500]
    assert [ipc[i].lr_y for i in (1, 10, 50)] == [5.0, 2.0, 2.0]
    assert all(ipc[i].syn_steps == 80 and ipc[i].expert_epochs == 2 and ipc[i].lr_teacher == 0.01 for i in ipc)
    mtt = _cfg("experiment=mtt_cifar10").method
    assert not mtt.soft_labels and mtt.pix_init == "real" and not mtt.sequential_generation
    assert _cfg("experiment=datm_cifar10").data.zca


def test_paper_settings_of_statistics_matching():
    cda = _cfg("experiment=cda_imagenet").method
    assert [n.name for n in cda.teacher.nets] == ["ResNet18BN"] and cda.recover.iterations == 4000
    r = cda.recover
    assert (r.lr, r.r_bn, r.first_bn_multiplier, r.jitter, list(r.crop_scale), r.crop_schedule) == \
        (0.25, 0.01, 10.0, 32, [0.08, 1.0], "cosine")
    assert _cfg("experiment=sre2l_imagenet").method.recover.iterations == 4000  # SRe2L recover.sh --iteration 4000
    assert _cfg("experiment=sre2l_imagenet").method.recover.crop_schedule == "none"
    assert len(_cfg("experiment=gvbsm_cifar10").method.teacher.nets) == 5
    assert _cfg("experiment=gvbsm_cifar10", "scale=cpu").method.recover.backbones_per_iter == 2
    assert _cfg("experiment=cda_imagenet", "scale=cpu").data.root.endswith("imagenet_sample")


def test_the_imagenet_experiments_switch_the_data_group_with_the_scale():
    for name in ("cda_imagenet", "sre2l_imagenet"):
        with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
            paper = compose("train", overrides=[f"experiment={name}"], return_hydra_config=True)
            cpu = compose("train", overrides=[f"experiment={name}", "scale=cpu"], return_hydra_config=True)
        assert paper.hydra.runtime.choices.data == "imagenet_paper" and paper.data.name == "imagenet"
        assert cpu.hydra.runtime.choices.data == "imagenet_cpu" and cpu.data.name == "imagenet_sample"
        assert cpu.data.image_size == 112 and cpu.data.train_per_class is None


def test_no_two_config_files_are_copies():
    """Settings live in one file (shared presets are included, not copied); two files may only share
    a short defaults list of includes."""
    seen = {}
    for p in sorted((ROOT / "conf").rglob("*.yaml")):
        body = "\n".join(ln.split("#")[0].rstrip() for ln in p.read_text().splitlines()
                         if ln.split("#")[0].strip() and not ln.startswith("scale_preset:"))
        assert body not in seen or len(body.splitlines()) <= 4, f"{p} repeats {seen[body]}"
        seen.setdefault(body, p)
