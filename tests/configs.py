"""Typed objects built from the config files, which hold every default (tests import these instead of
relying on defaults in the classes)."""
from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lightning_dd.augment.dsa import AugmentSettings
from lightning_dd.core.config import LoggerSettings
from lightning_dd.core.trainer import TrainerFactory

CONF = Path(__file__).resolve().parents[1] / "conf"


def compose_train(*overrides: str) -> DictConfig:
    """``conf/train.yaml`` composed with ``overrides`` (Hydra's command-line syntax), outside a run."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def node(group: str, name: str, drop: tuple[str, ...] = (), **overrides) -> dict:
    """The resolved ``conf/<group>/<name>.yaml`` (its defaults list applied, composed alone: no
    experiment adds keys) without the keys ``drop``, updated with ``overrides`` (dotted keys
    allowed: ``**{"teacher.epochs": 2}``)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=f"{group}/{name}")
    d = OmegaConf.to_container(OmegaConf.select(cfg, group.replace("/", ".")), resolve=False)
    out = OmegaConf.create({k: v for k, v in d.items() if k not in drop})
    for k, v in overrides.items():
        OmegaConf.update(out, k, v, force_add=True)
    return OmegaConf.to_container(out, resolve=True)


def method(name: str, **overrides):
    """The method of ``conf/method/<name>.yaml`` with ``overrides``, built as the runner builds it."""
    return instantiate(node("method", name, **overrides), _convert_="all")


def eval_settings(name: str = "default", schema=None, **overrides):
    """``conf/eval/<name>.yaml`` with ``overrides`` validated into ``schema`` (default: the image
    family's :class:`lightning_dd.evaluate.images.ImageEvalConfig`)."""
    if schema is None:
        from lightning_dd.evaluate.images import ImageEvalConfig as schema
    return schema.model_validate(node("eval", name, **overrides))


def student_settings(**overrides):
    """``conf/eval/default.yaml`` with ``overrides`` as the student evaluator's
    :class:`lightning_dd.evaluate.student.StudentSettings` (``augment`` defaults to ``none`` here: pass
    ``augment="dsa"`` with a DSA)."""
    from lightning_dd.evaluate.student import StudentSettings

    return StudentSettings.model_validate(node("eval", "default", **{"augment": "none", **overrides}))


def augment_settings(**overrides) -> AugmentSettings:
    return AugmentSettings.model_validate(node("augment", "dsa", **overrides))


def logger_settings(**overrides) -> LoggerSettings:
    return LoggerSettings.model_validate(node("logger", "default", drop=("wandb",), **overrides))


def run_context(dm=None, out_dir: Path | str = ".", cache_dir: Path | str = ".cache", net: dict | None = None,
                eval=None, make_trainer: TrainerFactory | None = None, **fields):
    """A :class:`lightning_dd.methods.base.RunContext` as the runner builds it, from the config
    files' defaults: ``net`` defaults to ``conf/net/convnet.yaml``, ``eval`` to ``None``, the
    Trainer factory to a CPU one without compile or progress bars."""
    from lightning_dd.methods.base import RunContext

    data = fields.pop("data", {"name": getattr(dm, "name", "test")})
    return RunContext(dm=dm, data=data, net=net if net is not None else node("net", "convnet"), eval=eval,
                      augment=fields.pop("augment", None) or augment_settings(),
                      logger=fields.pop("logger", None) or logger_settings(),
                      make_trainer=make_trainer or TrainerFactory(accelerator="cpu", enable_progress_bar=False),
                      out_dir=Path(out_dir), cache_dir=Path(cache_dir), **fields)


class CountingTrainerFactory(TrainerFactory):
    """A :class:`TrainerFactory` that records the stage of every Trainer it builds (``stages``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stages: list[str] = []

    def __call__(self, stage: str, **stage_kwargs):
        self.stages.append(stage)
        return super().__call__(stage, **stage_kwargs)
