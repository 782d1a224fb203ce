"""Typed, validated configs: pydantic models built from Hydra config nodes.

A method's hyperparameters are the fields of its class (a pydantic model, see
:class:`lightning_dd.methods.base.Method`), so ``hydra.utils.instantiate(cfg.method)`` both builds
and validates it: a wrong type (``method.ipc=abc``), an out-of-range value (``method.ipc=0``, a
negative learning rate) or an unknown key fails there, before any data is read, with a
:class:`ConfigError` naming the key. The same holds for the evaluator's node (``eval``) and the
run's own keys (:class:`RunConfig`).
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# Field types used across configs (pydantic checks them when a node is validated).
PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Fraction = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class ConfigError(ValueError):
    """A config value that is missing, of the wrong type or out of range; the message names each
    offending key (``method.ipc: Input should be greater than 0 (got 0)``)."""


class Typed(BaseModel):
    """Base of every typed config node: unknown keys are errors (a typo is not silently ignored),
    values are checked on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, arbitrary_types_allowed=True)


def describe(err: ValidationError, prefix: str) -> str:
    """One line per problem of a pydantic error: ``<prefix>.<key>: <message> (got <value>)``."""
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in (prefix, *e["loc"]) if p != "")
        got = e.get("input")
        shown = "" if isinstance(got, dict) or e["type"] == "missing" else f" (got {got!r})"
        lines.append(f"{key}: {e['msg']}{shown}")
    return "\n".join(lines)


def validated(model: type[BaseModel], node: Any, prefix: str) -> BaseModel:
    """``model`` built from ``node`` (a mapping or DictConfig, resolved).

    Raises:
        ConfigError: naming every offending key under ``prefix``.
    """
    from omegaconf import DictConfig, OmegaConf

    data = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"invalid config:\n{describe(e, prefix)}") from None


def config_error_from(exc: BaseException, prefix: str) -> ConfigError | None:
    """The :class:`ConfigError` behind an exception raised while instantiating a node under
    ``prefix`` (Hydra wraps constructor errors in ``InstantiationException``), or ``None``."""
    seen = exc
    while seen is not None:
        if isinstance(seen, ValidationError):
            return ConfigError(f"invalid config:\n{describe(seen, prefix)}")
        if isinstance(seen, ConfigError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def instantiate_node(node: Any, prefix: str, **kwargs) -> Any:
    """``hydra.utils.instantiate(node, **kwargs)`` with plain-container conversion; a validation
    failure of the built object becomes a :class:`ConfigError` naming keys under ``prefix``.

    Raises:
        ConfigError: a missing ``_target_`` or an invalid value.
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    if node is None or "_target_" not in node:
        raise ConfigError(f"{prefix}._target_ is missing: the node must name the class to build")
    try:
        return instantiate(node, _convert_="all", **kwargs)
    except (InstantiationException, ValidationError, ConfigError) as e:
        err = config_error_from(e, prefix)
        if err is None:
            raise
        raise err from None


class RunConfig(Typed):
    """The run's own top-level keys (the rest of the config are the groups).

    ``stage`` is checked against the method's stages by the runner. Defaults: ``conf/train.yaml``
    (``scale_name``: ``conf/scale/*.yaml``).
    """

    model_config = ConfigDict(extra="ignore")
    seed: int
    stage: str
    resume: bool
    ckpt_path: str | None
    scale_name: Literal["paper", "cpu"]
    scale_preset: str | None
    optimized_metric: str | None


class LoggerSettings(Typed):
    """The ``logger`` node's run-time settings a method reads (``conf/logger/default.yaml``; the
    ``wandb`` part is the runner's): ``image_every`` (synthetic-image grid every N iterations),
    ``eval_every`` (evaluate the current set every N iterations, 0: only at the end) and
    ``eval_epochs`` (that evaluation's training epochs)."""

    model_config = ConfigDict(extra="ignore")
    image_every: int = Field(ge=0)
    eval_every: int = Field(ge=0)
    eval_epochs: PositiveInt
