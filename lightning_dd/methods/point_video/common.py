"""Shared parts of the point-cloud video methods: the family's base class (its DataModule protocol),
the typed encoder settings, the encoder checkpoint (``encoder.pt``), clip features of a frozen
encoder and the linear probe, the probe's settings.
Data:
:class:`lightning_dd.data.protocols.PointVideoData` (:class:`lightning_dd.data.point_video.PointVideoDataModule`)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_dd.core.config import Fraction, PositiveFloat, PositiveInt, Typed
from lightning_dd.data.point_video import ClipDataset, video_accuracy
from lightning_dd.data.protocols import PointVideoData
from lightning_dd.io import atomic_save, load_dict
from lightning_dd.methods.base import Method
from lightning_dd.nets.p4transformer import P4Encoder
from lightning_dd.training.optim import OptimizerFactory

log = logging.getLogger(__name__)


class PointVideoMethod(Method):
    """Base of the point-cloud video family: its methods read a :class:`PointVideoData` DataModule."""

    data_protocol: ClassVar[type] = PointVideoData


class EncoderConfig(Typed):
    """P4Transformer encoder settings (:class:`lightning_dd.nets.p4transformer.P4Encoder`): token
    width ``dim``, ``depth`` transformer layers of ``heads`` heads and MLP width ``mlp_dim``, the
    tube embedding's ball ``radius`` (data units, mm / 300) with ``k`` neighbours, ``spatial_stride``
    (points per anchor), temporal kernel ``tk``, stride ``ts`` and ``padding``, and ``dropout``.
    The method configs hold P4Transformer's MSR-Action3D values (Fan et al., CVPR 2021)."""

    dim: PositiveInt
    depth: PositiveInt
    heads: PositiveInt
    mlp_dim: PositiveInt
    radius: PositiveFloat
    k: PositiveInt
    spatial_stride: PositiveInt
    tk: PositiveInt
    ts: PositiveInt
    padding: tuple[int, int]
    dropout: Fraction

    def build(self) -> P4Encoder:
        if self.dim % self.heads:
            raise ValueError(f"encoder.dim={self.dim} must be divisible by encoder.heads={self.heads}")
        return P4Encoder(**self.model_dump())


class ProbeConfig(Typed):
    """The linear probe on frozen clip features (max- and mean-pooled encoder tokens, standardized):
    a linear classifier, full batch, ``steps`` of ``optimizer`` (the configs: Adam, constant lr),
    repeated ``repeats`` times (each repeat draws its own augmented training clips and initial
    weights; the accuracies are averaged)."""

    steps: PositiveInt
    optimizer: OptimizerFactory
    train_views: PositiveInt   # augmented passes over the training clips
    repeats: PositiveInt


def save_encoder(encoder: P4Encoder, cfg: EncoderConfig, path: Path, method: str, **extra) -> None:
    """``encoder.pt``: ``{"encoder": state_dict, "encoder_config": dict, "method": str, ...}``, atomic."""
    atomic_save({"encoder": encoder.state_dict(), "encoder_config": cfg.model_dump(), "method": method, **extra}, path)


def load_encoder(path: str | Path) -> tuple[P4Encoder, EncoderConfig]:
    """The encoder of an ``encoder.pt`` (loaded with ``weights_only=True``) and its settings.

    An encoder saved before the tube embedding lost its bias (the reference's ``bias=False``) loads
    as the same function: that bias, a constant added to every token, moves into the position
    embedding's bias.

    Raises:
        FileNotFoundError: no file. ValueError: not an encoder checkpoint, or weights that do not fit.
    """
    d = load_dict(path, ("encoder", "encoder_config"), "pretrained encoder")
    cfg = EncoderConfig.model_validate(d["encoder_config"])
    enc = cfg.build()
    state = dict(d["encoder"])
    if "tube.conv_d.bias" in state and "pos.bias" in state:
        state["pos.bias"] = state["pos.bias"] + state.pop("tube.conv_d.bias")
    try:
        enc.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{path}: encoder weights do not fit its own encoder_config: {str(e)[:300]}") from None
    return enc, cfg


@torch.no_grad()
def clip_features(encoder: P4Encoder, ds: ClipDataset, batch_size: int = 32, views: int = 1):
    """Frozen-encoder features of every clip of ``ds``: [max, mean] over the encoder's output tokens.

    Shapes:
        Returns features ``(views * n, 2 dim)``, labels ``(views * n,)``, video indices ``(views * n,)``.
    """
    encoder.eval()
    feats, labels, vids = [], [], []
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False)
    for _ in range(views):
        for clip, y, v in loader:
            xyzt, f = encoder.tokens(clip)
            out = encoder.encode(f, xyzt)
            feats.append(torch.cat([out.amax(1), out.mean(1)], -1))
            labels.append(y)
            vids.append(v)
    return torch.cat(feats), torch.cat(labels), torch.cat(vids)


def linear_probe(encoder: P4Encoder, train: ClipDataset, test: ClipDataset, test_labels: torch.Tensor,
                 num_classes: int, cfg: ProbeConfig, seed: int) -> dict:
    """Train a linear classifier on frozen clip features of ``train``; video accuracy on ``test``
    (summed clip softmax scores). Repeat ``r`` of ``cfg.repeats`` seeds the global RNG with
    ``seed + r`` before drawing the training clips (resampled points, scale jitter) and the
    classifier's initial weights, so two encoders probed with the same ``seed`` see the same clips:
    their difference is a paired comparison, free of the augmentation draw's noise (a single probe
    of one encoder moves by up to ~4 points with that draw on MSR-Action3D at ``scale=cpu``).

    Returns:
        ``{"clip_acc", "video_acc", "train_acc"}`` averaged over the repeats, and ``"video_acc_std"``
        (their standard deviation; 0 for one repeat); fractions in [0, 1].
    """
    xte, yte, vte = clip_features(encoder, test)  # test clips: fixed per-clip resampling, no jitter
    runs = []
    for r in range(cfg.repeats):
        torch.manual_seed(seed + r)
        xtr, ytr, _ = clip_features(encoder, train, views=cfg.train_views)
        mu, sd = xtr.mean(0), xtr.std(0).clamp_min(1e-6)
        xtr_s, xte_s = (xtr - mu) / sd, (xte - mu) / sd
        lin = nn.Linear(xtr.shape[1], num_classes)
        opt = cfg.optimizer(lin.parameters())
        with torch.enable_grad():
            for _ in range(cfg.steps):
                opt.zero_grad()
                F.cross_entropy(lin(xtr_s), ytr).backward()
                opt.step()
        with torch.no_grad():
            scores = lin(xte_s).softmax(1)
            runs.append([float((scores.argmax(1) == yte).float().mean()), video_accuracy(scores, vte, test_labels),
                         float((lin(xtr_s).argmax(1) == ytr).float().mean())])
    acc = torch.tensor(runs, dtype=torch.float64)
    mean = acc.mean(0)
    return {"clip_acc": float(mean[0]), "video_acc": float(mean[1]), "train_acc": float(mean[2]),
            "video_acc_std": float(acc[:, 1].std()) if len(runs) > 1 else 0.0}
