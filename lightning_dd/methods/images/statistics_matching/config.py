"""Typed settings of statistics matching: ``method.teacher`` (:class:`TeacherConfig`, the squeeze)
and ``method.recover`` (:class:`RecoverConfig`, the recovery), the nested fields of
:class:`~.method.StatisticsMatching`. Every value is checked when the method node is
instantiated (before any data is read); an error names the key (``method.recover.milestone``)."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from lightning_dd.core.config import NonNegFloat, NonNegInt, PositiveFloat, PositiveInt, Typed
from lightning_dd.training.optim import OptimizerFactory, ScheduleFactory

# (min, max) area fraction of a random-resized crop: 0 < min <= max <= 1
CropScale = tuple[Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)],
                  Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]]


class TeacherConfig(Typed):
    """``method.teacher``: the squeezed BatchNorm backbones (SRe2L Sec. 3.1), or a given checkpoint.

    Attributes:
        ckpt: a teacher checkpoint ``{"net_cfg", "state_dict", ...}`` used instead of training one.
        nets: the backbones to squeeze, ``{"name" | "_target_": ..., **kwargs}``; the first is the
            evaluator's KD teacher; a net's own ``epochs`` (positive int) overrides ``epochs``.
        epochs, batch_size, label_smoothing: the squeeze's epochs, images per step, CE label smoothing.
        optimizer: ``params -> Optimizer`` (a config partial; the configs: SGD with momentum 0.9,
            ``lr``, ``weight_decay``, ``nesterov`` false as the references' ``squeeze_cifar.py`` /
            G-VBSM's ``train.py``); its ``lr``, ``weight_decay`` and ``nesterov`` key the cache.
        scheduler: ``(optimizer, total=, warmup=) -> LRScheduler`` per optimizer step (the configs:
            cosine from ``lr`` to 0, no warmup).
    """

    ckpt: str | None
    nets: list[dict[str, Any]]
    epochs: PositiveInt
    batch_size: PositiveInt
    optimizer: OptimizerFactory
    scheduler: ScheduleFactory
    label_smoothing: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)]

    @field_validator("nets")
    @classmethod
    def _nets(cls, nets: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for i, n in enumerate(nets):
            if not ("name" in n or "_target_" in n):
                raise ValueError(f"net {i} ({n}) names no architecture: give name or _target_")
            e = n.get("epochs")
            if e is not None and (isinstance(e, bool) or not isinstance(e, int) or e <= 0):
                raise ValueError(f"net {i}: epochs must be a positive integer, got {e!r}")
        return nets

    @model_validator(mode="after")
    def _some_teacher(self):
        if not self.ckpt and not self.nets:
            raise ValueError("nets is empty and no ckpt given: give at least one BatchNorm backbone or ckpt")
        return self

    def net_names(self) -> list[str]:
        """A label per teacher for metric keys: the net's ``name`` (or its ``_target_``'s last part);
        ``["ckpt"]`` for a given checkpoint."""
        if self.ckpt:
            return ["ckpt"]
        return [str(n.get("name") or str(n["_target_"]).rsplit(".", 1)[-1]) for n in self.nets]


class RecoverConfig(Typed):
    """``method.recover``: recovery of the synthetic images (SRe2L Sec. 3.2, Eq. 5-7; CDA; G-VBSM).

    Attributes:
        iterations: Adam steps per batch. batch: images optimized together (labels cycle over the
            classes). lr: Adam's lr (betas 0.5, 0.9), cosine to 0 over ``iterations``.
        r_bn: weight of the BN-statistics loss (SRe2L Eq. 6); first_bn_multiplier: weight of its
            first layer (and of G-VBSM's first conv layer).
        jitter: max roll in pixels (offsets ``U{0, ..., jitter}``, after the crop); flip: random
            horizontal flips; crop_scale: ``(min, max)`` area fraction of the random-resized crops,
            ``0 < min <= max <= 1``; crop_pad: ``> 0``: a random crop of the image zero-padded by
            that many pixels instead (G-VBSM's CIFAR ``RandomCrop(32, padding=4)``);
            crop_per_image: every image its own crop box and flip (``false``: one for the batch,
            as the reference code applies torchvision's transforms to the batch tensor).
        crop_schedule: CDA's curriculum on the min scale (``none`` = SRe2L: always ``min``);
            milestone: fraction of ``iterations`` in ``(0, 1]`` at which it reaches ``min``.
        backbones_per_iter: G-VBSM's backbones per step; backbone_sampling: ``random`` (a random
            subset each step) or ``cycle`` (G-VBSM's round robin: step ``s`` uses backbones
            ``s k, ..., s k + k - 1`` mod their number); r_conv, r_logit: weights of its
            convolution-statistics term and of a per-class logit (MSE) term (not G-VBSM's: 0 there);
            r_nuc, nuc_tau: weight and temperature of G-VBSM's eigenvalue (``--nuc-norm``) term;
            stat_momentum: G-VBSM's ``--training-momentum`` (alpha): the matched BN/conv statistics
            are moving averages over the batch's steps (0: the step's own, SRe2L/CDA); conv_drop:
            G-VBSM's ``--drop-rate``, the probability that a conv layer's term is left out of a step;
            backbone_norm: ``none``
            (unweighted) or ``start`` (each backbone's BN/conv loss rescaled to the first one's on
            the initial batch).
        init_std: std of the ``N(0, init_std)`` initial images (model space).
        ckpt_every: checkpoint period in steps (not part of a batch's identity for resume).
    """

    iterations: PositiveInt
    batch: PositiveInt
    lr: PositiveFloat
    r_bn: NonNegFloat
    first_bn_multiplier: NonNegFloat
    jitter: NonNegInt
    flip: bool
    crop_scale: CropScale
    crop_pad: NonNegInt
    crop_per_image: bool
    crop_schedule: Literal["none", "cosine", "linear", "step"]
    milestone: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
    backbones_per_iter: PositiveInt
    backbone_sampling: Literal["random", "cycle"]
    r_conv: NonNegFloat
    r_logit: NonNegFloat
    r_nuc: NonNegFloat
    nuc_tau: PositiveFloat
    stat_momentum: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)]
    conv_drop: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)]
    backbone_norm: Literal["none", "start"]
    init_std: PositiveFloat
    ckpt_every: PositiveInt

    @field_validator("crop_scale")
    @classmethod
    def _increasing(cls, v: tuple[float, float]) -> tuple[float, float]:
        if v[0] > v[1]:
            raise ValueError("crop_scale must be [min, max] with min <= max")
        return v

    @model_validator(mode="after")
    def _pad_per_batch(self):
        if self.crop_pad > 0 and self.crop_per_image:
            raise ValueError("crop_pad > 0 (pad-and-crop) is drawn per batch: set crop_per_image=false")
        return self

    def identity(self) -> dict:
        """The settings that determine a recovered batch (all but ``ckpt_every``), JSON-like
        (lists, not tuples), as stored in batch files and checkpoints for resume checks."""
        return self.model_dump(mode="json", exclude={"ckpt_every"})
