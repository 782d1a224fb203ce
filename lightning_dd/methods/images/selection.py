"""Coreset selection baselines: random, herding and k-center, IPC real images per class with hard
labels, evaluated by the same student evaluator as every distilled set.

* ``random``: a uniform random subset per class.
* ``herding`` (Welling, ICML 2009; the DC/DM baseline, arXiv 2006.05929): per class, greedily add
  the image whose embedding brings the running mean of the selected embeddings closest to the
  class mean.
* ``kcenter`` (greedy k-center, Sener & Savarese, arXiv 1708.00489): per class, start at the image
  nearest the class mean, then repeatedly add the image farthest from the selected ones.

Embeddings are the penultimate features (the input of the classifier) of a network trained on the
real data: the last checkpoint of the first cached expert trajectory (trained on demand with the
``method`` expert settings, shared with trajectory matching).

The budget is ``ipc`` images per class, or, with ``fraction`` set (a keep ratio, e.g. 0.1), that
fraction of each class's training pool (``round(fraction * n)`` of its ``n`` images), so the
selectors run at the same budget as Dataset Quantization (``methods/images/dataset_quantization.py``).
"""
from __future__ import annotations

import time
from typing import Annotated

import torch
from pydantic import Field

from lightning_dd.data.protocols import ImageData
from lightning_dd.methods.base import MethodOutput, RunContext
from lightning_dd.methods.images.base import ImageMethod
from lightning_dd.methods.images.experts import ExpertSettings, expert_bank
from lightning_dd.nets import build_net_cfg
from lightning_dd.training.coresets import herding, k_center
from lightning_dd.results import DistilledSet


@torch.no_grad()
def embed(net: torch.nn.Module, images: torch.Tensor, chunk: int = 1000) -> torch.Tensor:
    """Penultimate features ``(N, D)``: the input of ``net.classifier`` (captured by a hook)."""
    feats = []
    hook = net.classifier.register_forward_hook(lambda m, inp, out: feats.append(inp[0].flatten(1)))
    try:
        net.eval()
        for part in images.split(chunk):
            net(part)
    finally:
        hook.remove()
    return torch.cat(feats)


class Budget(ImageMethod):
    """A selector's budget: ``ipc`` images per class, or ``fraction`` of each class's pool when set."""

    fraction: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] | None

    def per_class(self, dm) -> int:
        """Images kept per class: ``ipc``, or ``round(fraction * n)`` (at least 1) with ``n`` the
        smallest class's training-pool size when ``fraction`` is set."""
        if self.fraction is None:
            return self.ipc
        return max(1, round(self.fraction * min(len(i) for i in dm.class_indices())))


class RandomSelection(Budget):
    """``ipc`` (or ``fraction``) uniformly random real training images per class, hard labels
    (``conf/method/random.yaml``)."""

    def run(self, ctx: RunContext[ImageData]) -> MethodOutput:
        t0, ipc = time.perf_counter(), self.per_class(ctx.dm)
        x, y = ctx.dm.random_subset(ipc, ctx.seed)
        res = DistilledSet(x, y, None, ctx.dm.classes, ctx.dm.preprocessing.state(), method=self.name, ipc=ipc)
        return MethodOutput(result=res, timings={"select_s": time.perf_counter() - t0})


class FeatureCoreset(ExpertSettings, Budget):
    """``ipc`` real training images per class chosen by :meth:`select` in the penultimate feature space
    of the first cached expert's last checkpoint (trained on demand with the expert settings,
    shared with trajectory matching); hard labels, the evaluator's default lr."""

    @staticmethod
    def select(features: torch.Tensor, k: int) -> torch.Tensor:  # pragma: no cover - abstract
        """Indices of ``k`` rows of ``features`` ``(N, D)``."""
        raise NotImplementedError

    def feature_net(self, ctx: RunContext[ImageData]) -> tuple[torch.nn.Module, dict]:
        """The first cached expert's last checkpoint as a ``ctx.net`` network (trained on demand
        with the expert settings) and its metrics (``selection/feature_net_test_acc``)."""
        from torch.nn.utils import vector_to_parameters

        dm, metrics = ctx.dm, {}
        expert = expert_bank(ctx, self).ensure(
            1, dm.train_images, dm.train_labels, dm.num_classes, test=(dm.test_images, dm.test_labels))[0]
        if expert.get("test_acc") is not None:
            metrics["selection/feature_net_test_acc"] = expert["test_acc"]
        net = build_net_cfg(ctx.net, dm.train_images.shape[1], dm.num_classes, dm.image_shape[1:])
        vector_to_parameters(expert["trajectory"][-1], net.parameters())  # FlatParams order = parameters()
        return net, metrics

    def run(self, ctx: RunContext[ImageData]) -> MethodOutput:
        dm, t0, ipc = ctx.dm, time.perf_counter(), self.per_class(ctx.dm)
        net, metrics = self.feature_net(ctx)
        feats = embed(net, dm.train_images)
        idx = torch.cat([i[self.select(feats[i], ipc)] for i in dm.class_indices()])
        x, y = dm.train_images[idx].clone(), dm.train_labels[idx].clone()
        res = DistilledSet(x, y, None, dm.classes, dm.preprocessing.state(), method=self.name, ipc=ipc)
        return MethodOutput(result=res, metrics=metrics, timings={"select_s": time.perf_counter() - t0})


class Herding(FeatureCoreset):
    """Herding coreset (Welling, ICML 2009), :func:`herding` (``conf/method/herding.yaml``)."""

    select = staticmethod(herding)


class KCenter(FeatureCoreset):
    """Greedy k-center coreset (Sener & Savarese, arXiv 1708.00489), :func:`k_center` (``conf/method/kcenter.yaml``)."""

    select = staticmethod(k_center)
