"""Dataset Quantization (DQ; Zhou et al., "Dataset Quantization", ICCV 2023, arXiv 2308.10524) and
its diversity baseline, GraphCut selection alone.

DQ (Sec. 3.2-3.3, Alg. 1 of the paper; reference code ``magic-research/Dataset_Quantization``,
``quantize_sample.py`` + ``quantize_bin.py``), per class:

1. embed every training image of the class (:func:`last_layer_embeddings`) and build the pairwise
   similarity ``S = 0.5 + 0.5 * cos`` (:func:`cosine_similarity`, the reference's ``cossim``);
2. **bins**: greedily select ``round(n / num_bins)`` images by the GraphCut submodular gain
   ``lam * sum_{j in pool} S[i, j] - 2 * sum_{s in selected} S[i, s]`` (:func:`graph_cut`); the
   selected images leave the pool and the step repeats on what is left; the last bin is the
   remainder, so the bins are disjoint and cover the class (:func:`quantize_bins`);
3. **sampling**: the same keep ratio drawn uniformly at random from every bin
   (:func:`sample_bins`).

``GraphCut`` (:class:`GraphCutSelection`) is step 2's first bin alone, sized to the whole budget:
the paper's argument is that this concentrates on one (dense, "representative") region and loses
diversity at low keep ratios, which the bins restore.

Budget: ``fraction`` is the keep ratio of each class's pool (``round(fraction * n)`` images per
class, :meth:`lightning_dd.methods.images.selection.Budget.per_class`), or ``ipc`` when ``fraction`` is
null; the other selectors (random, herding, k-center) take the same ``fraction``.

Deviations from the reference code, and why:

* **Embedding network.** The reference embeds with an ImageNet-pretrained ResNet-18 (224 px, a
  fresh randomly initialized 10-way head). Nothing can be downloaded here, so the network is the
  framework's own: the cached expert of the feature-space coresets (``net`` trained on the real
  pool with the ``method`` expert settings, :meth:`FeatureCoreset.feature_net`), at the data's
  own resolution. Its head is trained, not fresh.
* **Embedding kind** is a choice (``embedding``): ``gradient`` is the reference's last-layer
  gradient embedding ``[dL/db, dL/dW]`` (bias and weight gradients of the classifier) of the
  reference's loss ``CE(softmax(logits), y)`` (a softmax applied twice; ``gradient_loss=ce`` uses
  the plain ``CE(logits, y)``); ``features`` is the penultimate features. The gradient embedding
  is never materialized (``C * (D + 1)`` numbers per image): since ``dL/dW = g e^T``, its inner
  products are ``<g_i, g_j> (1 + <e_i, e_j>)``, which gives the cosine exactly.
* **Incremental, vectorized gain.** The reference's naive greedy recomputes
  ``sum_{s in selected} S[s, :]`` at every step (``O(k^2 n)`` per bin); here the running sum is
  updated by one row per step (``O(k n)``), same choices (first maximum on ties, as numpy's
  ``argmax``); ``tests/test_dataset_quantization.py`` checks it against the naive recomputation.
* **Per-bin counts** (``bin_quota``): ``round`` (default) is the reference's ``quantize_bin.py``,
  ``round(ratio * |bin|)`` per bin, so the total can miss ``ratio * n`` (0.125 of 10 bins of 500:
  620 images, not 625); ``exact`` instead gives proportional quotas with largest-remainder
  rounding, summing to exactly the per-class budget of the other selectors. Both agree whenever
  the per-bin product is whole (the CPU preset's bins of 100 at 10/20/30 % without the pixel step;
  with it, 10 % buys 125 images per class for the bins: 12 of each, 120).
* **Bin sizes.** The reference sizes each class's bin from a global ratio of what is left
  (``coreset_size / len(avail)``); here ``round(n / num_bins)`` per class. Equal on class-balanced
  pools (CIFAR-10 and every pool here); they can differ by rounding on unbalanced ones.
* **Random streams.** The reference reseeds numpy's legacy generator with the same seed for every
  bin; here one torch generator (``seed``) draws all bins. Same rule (uniform, without
  replacement, within each bin and class), different draws; ``tests/parity/test_parity_dq.py``
  checks the rule, the bins and the greedy order against the reference's own output.
* **Pixel quantization** (GradCAM++ patch dropping + MAE reconstruction, Sec. 3.4;
  ``method.pixel``, on by default with ``drop_ratio`` 0.2 and the CAM of the predicted class, as
  the README's CIFAR pipeline ``--mask_ratio 0.2 --cam_mask``) uses an MAE the framework trains on
  the real pool, not an ImageNet-pretrained one (nothing can be downloaded); see
  :mod:`lightning_dd.methods.images.pixel_quantization`. The keep ratio counts stored pixels: with
  ``drop_ratio`` r, ``round(k / (1 - r))`` images per class are the bins' budget for a keep ratio
  of k (the README: ``--fraction 0.125`` in the bins for 10 % with ``--mask_ratio 0.2``).
* **Data and evaluation** (``experiment=dq_cifar10``): per-channel mean/std, no ZCA
  (``dq/datasets/cifar10.py``; the mean/std are fitted on the training pool, the reference uses
  constants, and its ``validate_cifar.py`` a second std); the evaluation is ``eval=dq_resnet18``
  (``validate_cifar.py``: ResNet-18, 200 epochs, SGD 0.1, cosine per epoch, crop + flip, batch 16 at
  <= 10 %). The crop pads with zeros in normalized space (the mean colour), the reference in
  pixel space (black); the reference reports the best test accuracy over the 200 epochs, here the
  last epoch's. ``scale=cpu`` keeps the shared CPU evaluator (ConvNet-64, DSA, 300 epochs).
"""
from __future__ import annotations

import time
from typing import Literal

import torch
import torch.nn.functional as F

from lightning_dd.core.config import PositiveFloat, PositiveInt
from lightning_dd.data.protocols import ImageData
from lightning_dd.io import atomic_save
from lightning_dd.methods.base import MethodOutput, RunContext
from lightning_dd.methods.images.pixel_quantization import (PixelQuantizationConfig, quantize_pixels, save_pixel_step_figure,
                                                     trained_mae)
from lightning_dd.methods.images.selection import FeatureCoreset
from lightning_dd.results import DistilledSet


@torch.no_grad()
def last_layer_embeddings(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                          kind: Literal["gradient", "features"] = "gradient",
                          gradient_loss: Literal["softmax_ce", "ce"] = "softmax_ce",
                          chunk: int = 1000) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Penultimate features and, for ``kind="gradient"``, the loss gradient w.r.t. the logits.

    The last-layer gradient embedding of image ``i`` is ``[g_i, g_i e_i^T]`` (the classifier's bias
    and weight gradients), returned factored as ``(e, g)``; :func:`cosine_similarity` takes the
    factors. ``gradient_loss``: ``softmax_ce`` = the reference's ``CE(softmax(z), y)``, ``ce`` =
    ``CE(z, y)`` (gradient ``softmax(z) - onehot(y)``).

    Shapes:
        images ``(N, C, H, W)`` (model space), labels ``(N,)`` -> e ``(N, D)`` (the input of
        ``net.classifier``), g ``(N, K)`` (K classes) or ``None`` for ``kind="features"``.
    """
    feats, logits = [], []
    hook = net.classifier.register_forward_hook(lambda m, inp, out: feats.append(inp[0].flatten(1)))
    try:
        net.eval()
        for part in images.split(chunk):
            logits.append(net(part))
    finally:
        hook.remove()
    e = torch.cat(feats)
    if kind == "features":
        return e, None
    z = torch.cat(logits).detach().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(z.softmax(1) if gradient_loss == "softmax_ce" else z, labels, reduction="sum")
        (g,) = torch.autograd.grad(loss, z)
    return e, g


def cosine_similarity(e: torch.Tensor, g: torch.Tensor | None = None, eps: float = 1e-12) -> torch.Tensor:
    """Pairwise similarity ``0.5 + 0.5 * cos`` in ``[0, 1]`` (the reference's ``cossim``), float64.

    With ``g`` given, the vectors are the gradient embeddings ``[g_i, g_i e_i^T]`` (see
    :func:`last_layer_embeddings`), whose inner products are ``<g_i, g_j> (1 + <e_i, e_j>)``.

    Shapes:
        e ``(n, D)``, g ``(n, K)`` or ``None`` -> ``(n, n)``, symmetric, diagonal 1 (0.5 for a
        zero vector).
    """
    e = e.double()
    gram = e @ e.T
    if g is not None:
        g = g.double()
        gram = (g @ g.T) * (1 + gram)
    norm = gram.diagonal().clamp_min(0).sqrt().clamp_min(eps)
    cos = (gram / norm[:, None] / norm[None, :]).clamp(-1, 1)
    return 0.5 + 0.5 * cos


def graph_cut(sim: torch.Tensor, k: int, lam: float = 1.0) -> torch.Tensor:
    """Greedy GraphCut selection of ``k`` items, in the order chosen.

    Step ``t`` picks ``argmax_i lam * sum_j S[i, j] - 2 * sum_{s in selected} S[i, s]`` over the
    unselected ``i`` (the first maximum on ties); the selected sum is kept as a running vector
    updated by one row per step. Source: DQ's ``GraphCut.calc_gain`` with ``NaiveGreedy``.

    Shapes:
        sim ``(n, n)`` symmetric -> ``(k,)`` long, distinct indices into ``0..n-1``.

    Raises:
        ValueError: ``k`` not in ``1..n``.
    """
    n = len(sim)
    if not 0 < k <= n:
        raise ValueError(f"graph_cut: asked for {k} of {n} samples")
    gain = lam * sim.sum(0)
    order = torch.empty(k, dtype=torch.long)
    for t in range(k):
        j = int(gain.argmax())
        order[t] = j
        gain -= 2 * sim[j]
        gain[j] = -torch.inf  # selected: never again (stays -inf under later updates)
    return order


def quantize_bins(sim: torch.Tensor, num_bins: int, lam: float = 1.0) -> list[torch.Tensor]:
    """DQ's non-overlapping bins of one class: ``num_bins - 1`` GraphCut selections of
    ``round(n / num_bins)`` items, each from what the previous ones left (the similarity row sums
    over that remaining pool), then the remainder.

    Shapes:
        sim ``(n, n)`` -> ``num_bins`` long tensors of indices into ``0..n-1``, disjoint, covering
        all ``n``; each in the order selected (the remainder ascending).

    Raises:
        ValueError: the class is too small for ``num_bins`` non-empty bins.
    """
    n = len(sim)
    size = round(n / num_bins)
    if size < 1 or size * (num_bins - 1) >= n:
        raise ValueError(f"quantize_bins: {n} samples cannot fill {num_bins} non-empty bins")
    avail = torch.arange(n)
    bins = []
    for _ in range(num_bins - 1):
        pick = avail[graph_cut(sim[avail][:, avail], size, lam)]
        bins.append(pick)
        keep = torch.ones(n, dtype=torch.bool)
        keep[pick] = False
        avail = avail[keep[avail]]
    bins.append(avail)
    return bins


def bin_quotas(sizes: list[int], k: int, rule: Literal["round", "exact"] = "round") -> list[int]:
    """Per-bin sample counts for ``k`` of the ``sum(sizes)`` items of a class.

    ``round`` (the reference's ``quantize_bin.py`` + ``Uniform``): each bin's count is the keep ratio
    times its size, rounded on its own (Python's ``round``, half to even: a ratio of 0.125 of bins
    of 500 keeps 62 each), so the total can differ from ``k``; ``exact``: proportional to ``sizes``
    with largest-remainder rounding (ties to the earlier bin), summing to exactly ``k``. Each count
    is at most its bin's size.

    Raises:
        ValueError: ``k`` not in ``0..sum(sizes)``.
    """
    total = sum(sizes)
    if not 0 <= k <= total:
        raise ValueError(f"bin_quotas: asked for {k} of {total} samples")
    if rule == "round":
        return [min(s, round(s * k / total)) for s in sizes]
    exact = [k * s / total for s in sizes]
    quotas = [int(x) for x in exact]
    rest = sorted(range(len(sizes)), key=lambda b: (-(exact[b] - quotas[b]), b))
    for b in rest[: k - sum(quotas)]:
        quotas[b] += 1
    return quotas


def sample_bins(bins: list[torch.Tensor], k: int, generator: torch.Generator | None = None,
                rule: Literal["round", "exact"] = "round") -> torch.Tensor:
    """DQ's bin sampling (``quantize_bin.py``): the keep ratio ``k / sum(len(bins))`` of every bin,
    drawn uniformly without replacement, :func:`bin_quotas` ``rule`` per bin.

    Shapes:
        bins: long tensors (disjoint) -> ``(sum of the quotas,)`` long, bin by bin.
    """
    quotas = bin_quotas([len(b) for b in bins], k, rule)
    return torch.cat([b[torch.randperm(len(b), generator=generator)[:q]] for b, q in zip(bins, quotas)])


class GraphCutSelection(FeatureCoreset):
    """GraphCut coreset (the submodular diversity baseline of DQ, arXiv 2308.10524): per class,
    :func:`graph_cut` of the budget in the similarity of :func:`last_layer_embeddings` of the
    feature network (``conf/method/graphcut.yaml``). Fields: ``embedding`` (``gradient`` |
    ``features``), ``gradient_loss``, ``lam`` (GraphCut's lambda, 1 in the reference)."""

    embedding: Literal["gradient", "features"]
    gradient_loss: Literal["softmax_ce", "ce"]
    lam: PositiveFloat

    def choose(self, sim: torch.Tensor, k: int, generator: torch.Generator) -> tuple[torch.Tensor, list | None]:
        """Indices into the class pool ``(k,)`` and the class's bins (``None`` without bins)."""
        return graph_cut(sim, k, self.lam), None

    def run(self, ctx: RunContext[ImageData]) -> MethodOutput:
        dm, t0, k = ctx.dm, time.perf_counter(), self.per_class(ctx.dm)
        net, metrics = self.feature_net(ctx)
        e, g = last_layer_embeddings(net, dm.train_images, dm.train_labels, self.embedding, self.gradient_loss)
        t_embed = time.perf_counter()
        gen = torch.Generator().manual_seed(int(ctx.seed))
        parts, all_bins = [], []
        for c, i in enumerate(dm.class_indices()):
            if k > len(i):
                raise ValueError(f"{self.name}: {k} images per class but class {dm.classes[c]!r} has {len(i)}")
            local, bins = self.choose(cosine_similarity(e[i], None if g is None else g[i]), k, gen)
            parts.append(i[local])
            if bins is not None:
                all_bins.append([i[b] for b in bins])
        idx = torch.cat(parts)
        if all_bins:  # training-set indices of every bin, per class
            atomic_save({"bins": all_bins, "classes": list(dm.classes)}, ctx.out_dir / "bins.pt")
        x, y = dm.train_images[idx].clone(), dm.train_labels[idx].clone()
        res = DistilledSet(x, y, None, dm.classes, dm.preprocessing.state(), method=self.name,
                           ipc=max(len(p) for p in parts))
        done = time.perf_counter()
        return MethodOutput(result=res, metrics=metrics,
                            timings={"select_s": done - t0, "select_greedy_s": done - t_embed})


class DatasetQuantization(GraphCutSelection):
    """Dataset Quantization (Zhou et al., ICCV 2023, arXiv 2308.10524): :func:`quantize_bins` into
    ``num_bins`` GraphCut bins per class, then :func:`sample_bins` (``conf/method/dq.yaml``).
    Training-set indices of the bins are saved to ``<run dir>/bins.pt``. ``bin_quota``: the per-bin
    counts (:func:`bin_quotas`; ``round``, the reference's, or ``exact``).

    ``pixel`` (:class:`PixelQuantizationConfig`, on by default): the pixel step, GradCAM++ patch
    dropping + reconstruction by an MAE the framework trains (Sec. 3.4); the budget then counts
    stored pixels (:meth:`per_class`).
    """

    num_bins: PositiveInt
    bin_quota: Literal["round", "exact"]
    pixel: PixelQuantizationConfig

    def per_class(self, dm) -> int:
        """Images per class: the budget's, or with the pixel step as many as fit the same number of
        stored pixels (:meth:`PixelQuantizationConfig.images_for`)."""
        return self.pixel.images_for(super().per_class(dm), min(len(i) for i in dm.class_indices()))

    def run(self, ctx: RunContext[ImageData]) -> MethodOutput:
        out = super().run(ctx)
        if not self.pixel.enabled:
            return out
        dm, res, t0 = ctx.dm, out.result, time.perf_counter()
        net, _ = self.feature_net(ctx)  # the selection network, from the expert cache
        mae, info = trained_mae(self.pixel, dm.train_images, dm.identity(), ctx.cache_dir, ctx.make_trainer,
                                seed=int(ctx.seed))
        t_mae = time.perf_counter()
        x, dropped = quantize_pixels(res.images, res.labels, net, mae, self.pixel)
        meta = {**res.meta, "pixel": {**self.pixel.model_dump(), "stored_pixel_fraction":
                                      float(1 - dropped.float().mean()), "mae_loss": info["mae/loss"]}}
        out.result = DistilledSet(x, res.labels, None, res.classes, res.preprocessing, method=res.method, ipc=res.ipc,
                                  meta=meta)
        atomic_save({"dropped": dropped, "patch": self.pixel.patch}, ctx.out_dir / "dropped_patches.pt")
        save_pixel_step_figure(res.images, dropped, x, res.hard_labels(), res.classes, dm.preprocessing,
                               self.pixel.patch, ctx.out_dir / "pixel_step.png")
        n_img = len(res.labels)
        out.metrics.update({**info, "pixel/images": float(n_img),
                            "pixel/stored_images_equiv": float(n_img * (1 - dropped.float().mean()))})
        out.timings.update({"mae_s": t_mae - t0, "pixel_s": time.perf_counter() - t_mae})
        return out

    def choose(self, sim: torch.Tensor, k: int, generator: torch.Generator) -> tuple[torch.Tensor, list | None]:
        bins = quantize_bins(sim, self.num_bins, self.lam)
        return sample_bins(bins, k, generator, self.bin_quota), bins
