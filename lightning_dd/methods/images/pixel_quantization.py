"""Dataset Quantization's pixel step (Zhou et al., "Dataset Quantization", ICCV 2023, arXiv
2308.10524, Sec. 3.4): store only the informative patches of every selected image and
reconstruct the dropped ones with a masked autoencoder when the set is used.

Per selected image:

1. patch importance from a GradCAM++ map (Chattopadhay et al., WACV 2018, arXiv 1710.11063) of
   the selection network for the class it predicts (``cam_class=argmax``, the reference's
   ``mae_models.py`` ``get_cam_map``; ``label``: the image's own label) (:func:`gradcam_pp`),
   averaged over each ``patch x patch`` patch (:func:`patch_importance`);
2. the least important patches are dropped, all but the ``int(L * (1 - drop_ratio))`` most
   important of the ``L`` (the reference's ``cam_masking``; :func:`drop_mask`); ``drop_ratio`` 0.2
   as the README's CIFAR command (``--mask_ratio 0.2 --cam_mask``);
3. an MAE (:class:`lightning_dd.nets.mae.MAE`) reconstructs them from the kept ones; the kept
   patches stay bit for bit (:meth:`MAE.reconstruct`).

Storage: an image costs ``1 - drop_ratio`` of its pixels, so at the same keep ratio (storage
budget) DQ keeps ``round(k / (1 - drop_ratio))`` images per class instead of ``k``
(:meth:`PixelQuantizationConfig.images_for`); the run reports the stored-pixel fraction.

Deviations from the reference code, and why:

* **The MAE is the framework's own**, trained on the real training pool by
  :func:`trained_mae` (cached, keyed by the data and every MAE setting), not the reference's
  ImageNet-pretrained MAE-ViT (nothing can be downloaded here). Results with it are reported as
  such: a small MAE (default dim 128, depth 4, patches of 4x4 pixels at 32x32) trained for
  ``mae_epochs`` epochs with random masks at the drop ratio.
* **The importance network** is DQ's selection network (the framework's cached expert), not an
  ImageNet ResNet; GradCAM++ at its last activation before the classifier.
* **Resolution.** The reference resizes CIFAR images to 224 px for its MAE (16-px patches, a 14x14
  grid; the CAM resized to that grid) and the reconstruction back to 32 px, so every pixel passes
  two resizes; here the MAE works at the data's own resolution (``patch`` 4: an 8x8 grid at 32 px),
  the CAM is averaged over each patch, and the kept patches stay bit for bit.
* **Ties** in the importance drop the lower patch index first (the reference: ``torch.argsort``,
  unspecified order among ties).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Literal

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_dd.core.config import Fraction, PositiveFloat, PositiveInt, Typed
from lightning_dd.core.trainer import TrainerFactory
from lightning_dd.io import cache_key, load_cache, require_keys, save_cache
from lightning_dd.nets.mae import MAE, mae_loss, random_mask

log = logging.getLogger(__name__)


class PixelQuantizationConfig(Typed):
    """``method.pixel``: DQ's pixel step (arXiv 2308.10524, Sec. 3.4).

    Attributes:
        enabled: run the step (on in ``conf/method/dq.yaml``, as the README's CIFAR pipeline).
        patch: patch side in pixels (the image size must be a multiple).
        drop_ratio: share of each image's patches dropped (least GradCAM++ importance first; the
            reference's ``--mask_ratio``, 0.2).
        cam_class: the class GradCAM++ explains: ``argmax`` (the network's prediction, as the
            reference's ``get_cam_map``) or ``label`` (the image's own label).
        mae_dim, mae_depth, mae_heads, decoder_dim, decoder_depth: the MAE's size.
        mae_epochs, mae_lr, mae_batch, mae_weight_decay: its AdamW training on the real pool.
    """

    enabled: bool
    patch: PositiveInt
    drop_ratio: Fraction
    cam_class: Literal["argmax", "label"]
    mae_dim: PositiveInt
    mae_depth: PositiveInt
    mae_heads: PositiveInt
    decoder_dim: PositiveInt
    decoder_depth: PositiveInt
    mae_epochs: PositiveInt
    mae_lr: PositiveFloat
    mae_batch: PositiveInt
    mae_weight_decay: float

    def images_for(self, k: int, n: int) -> int:
        """Images per class at a storage budget of ``k`` full images, of a class of ``n``:
        ``min(n, round(k / (1 - drop_ratio)))``."""
        return min(n, round(k / (1.0 - self.drop_ratio))) if self.enabled else k


def _target_layer(net: nn.Module) -> nn.Module:
    """The last activation (ReLU/LeakyReLU/GELU) or, without one, the last conv of ``net``: where
    GradCAM++ reads activations and gradients.

    Raises:
        ValueError: ``net`` has neither.
    """
    acts = [m for m in net.modules() if isinstance(m, (nn.ReLU, nn.LeakyReLU, nn.GELU))]
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    if not acts and not convs:
        raise ValueError(f"GradCAM++: {type(net).__name__} has no activation or conv layer to explain")
    return (acts or convs)[-1]


def gradcam_pp(net: nn.Module, images: torch.Tensor, labels: torch.Tensor | None, chunk: int = 500) -> torch.Tensor:
    """GradCAM++ maps (arXiv 1710.11063, Eq. 19 with the exponential score, which gives
    ``alpha = g^2 / (2 g^2 + sum_ab(A) g^3)`` with ``g = dy_c/dA``): per image, for the class
    ``c`` of ``labels`` (``None``: the class the network predicts, the reference's ``get_cam_map``),
    ``relu(sum_k w_k A_k)`` with ``w_k = sum_ab alpha_kab relu(g_kab)``, upsampled bilinearly to
    the image size.

    Shapes: ``images (N, C, H, W)``, ``labels (N,)`` or ``None`` -> ``(N, H, W)`` (non-negative,
    unnormalized).
    """
    layer = _target_layer(net)
    out = []
    was_training = net.training
    net.eval()
    try:
        for i in range(0, len(images), chunk):
            x = images[i:i + chunk]
            acts = []

            def keep(m, inp, o):  # a leaf where nothing before the layer is learnable
                o = o if o.requires_grad else o.detach().requires_grad_()
                acts.append(o)
                return o

            hook = layer.register_forward_hook(keep)
            try:
                with torch.enable_grad():
                    logits = net(x)
                    a = acts[-1]
                    y = logits.detach().argmax(1) if labels is None else labels[i:i + chunk]
                    score = logits.gather(1, y.view(-1, 1)).sum()
                    g = torch.autograd.grad(score, a)[0]
            finally:
                hook.remove()
            a, g = a.detach(), g.detach()
            g2, g3 = g * g, g * g * g
            denom = 2 * g2 + a.sum((2, 3), keepdim=True) * g3
            alpha = torch.where(g != 0, g2 / torch.where(denom != 0, denom, torch.ones_like(denom)),
                                torch.zeros_like(g))
            w = (alpha * F.relu(g)).sum((2, 3), keepdim=True)
            cam = F.relu((w * a).sum(1, keepdim=True))
            out.append(F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0])
    finally:
        net.train(was_training)
    return torch.cat(out)


def patch_importance(cam: torch.Tensor, patch: int) -> torch.Tensor:
    """Mean of the map over each ``patch x patch`` patch, row-major (as
    :func:`lightning_dd.nets.mae.patchify`). ``(N, H, W)`` -> ``(N, H/p * W/p)``."""
    return F.avg_pool2d(cam[:, None], patch).flatten(1)


def drop_mask(importance: torch.Tensor, ratio: float) -> torch.Tensor:
    """``(N, L)`` bool, True for the dropped patches of each row: all but the ``int(L * (1 - ratio))``
    most important (the reference's ``cam_masking`` keep count; ties: the lower index is dropped
    first)."""
    L_ = importance.shape[1]
    k = L_ - int(L_ * (1 - ratio))
    ranks = importance.argsort(dim=1, stable=True).argsort(dim=1)
    return ranks < k


class MAETraining(L.LightningModule):
    """MAE pretraining on real images: random masks at ``drop_ratio``, :func:`mae_loss`, AdamW
    with a cosine schedule over ``mae_epochs``."""

    def __init__(self, mae: MAE, hp: PixelQuantizationConfig, seed: int = 0):
        super().__init__()
        self.mae, self.hp, self.seed = mae, hp, seed

    def training_step(self, batch, batch_idx):
        (x,) = batch
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.global_step)
        mask = random_mask(x.shape[0], self.mae.num_patches, self.hp.drop_ratio, g, device=x.device)
        loss = mae_loss(self.mae(x, mask), x, mask, self.mae.patch)
        self.log("mae/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.mae.parameters(), lr=self.hp.mae_lr, weight_decay=self.hp.mae_weight_decay,
                                betas=(0.9, 0.95))
        steps = self.trainer.estimated_stepping_batches
        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(
            opt, T_max=max(1, int(steps))), "interval": "step"}}


def _mae_fields(hp: PixelQuantizationConfig) -> dict:
    return {k: v for k, v in hp.model_dump().items() if k not in ("enabled", "cam_class")}


def build_mae(hp: PixelQuantizationConfig, channels: int, image_size) -> MAE:
    """The MAE of ``hp`` for ``channels`` x ``image_size`` images."""
    return MAE(channels, tuple(image_size), hp.patch, hp.mae_dim, hp.mae_depth, hp.mae_heads, hp.decoder_dim,
               hp.decoder_depth, max(1, hp.decoder_dim // 16))


def trained_mae(hp: PixelQuantizationConfig, images: torch.Tensor, data_identity: dict, cache_dir: str | Path,
                make_trainer: TrainerFactory, seed: int = 0) -> tuple[MAE, dict]:
    """The MAE of ``hp`` trained on ``images`` (the real pool), from the cache when a run with the
    same data, settings and seed trained it before (``<cache_dir>/mae/<key>/mae.pt``, a checksummed
    cache entry: :func:`lightning_dd.io.save_cache` / :func:`~lightning_dd.io.load_cache`; a
    corrupted one is retrained). Returns ``(mae in eval mode, info)`` with
    ``info = {"mae/loss": final training loss, "mae/train_s": seconds (0 when cached)}``.

    Shapes: ``images (N, C, H, W)`` model space.
    """
    spec = {"data": data_identity, "mae": _mae_fields(hp), "seed": seed}
    key = cache_key(spec)  # the same stable settings key as the expert and pool caches
    path = Path(cache_dir) / "mae" / key / "mae.pt"
    mae = build_mae(hp, images.shape[1], images.shape[-2:])
    d = load_cache(path, "MAE cache entry", check=require_keys("state_dict", "loss"))
    if d is not None:
        mae.load_state_dict(d["state_dict"])
        log.info("MAE from the cache %s (loss %.4f)", path, d["loss"])
        return mae.eval(), {"mae/loss": float(d["loss"]), "mae/train_s": 0.0}
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    module = MAETraining(mae, hp, seed)
    loader = DataLoader(TensorDataset(images), batch_size=hp.mae_batch, shuffle=True, drop_last=len(images) > hp.mae_batch,
                        generator=torch.Generator().manual_seed(seed))
    trainer = make_trainer("mae", max_epochs=hp.mae_epochs, logger=False, enable_checkpointing=False)
    trainer.fit(module, loader)
    loss = float(trainer.callback_metrics.get("mae/loss", float("nan")))
    save_cache({"state_dict": mae.state_dict(), "loss": loss, "spec": json.dumps(spec, default=str)}, path)
    info = {"mae/loss": loss, "mae/train_s": time.perf_counter() - t0}
    log.info("MAE trained in %.0fs (final loss %.4f) -> %s", info["mae/train_s"], loss, path)
    return mae.eval(), info


@torch.no_grad()
def quantize_pixels(images: torch.Tensor, labels: torch.Tensor, net: nn.Module, mae: MAE,
                    hp: PixelQuantizationConfig, chunk: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """DQ's pixel step on selected images: GradCAM++ importance -> drop the least important
    ``drop_ratio`` of patches -> MAE reconstruction.

    Shapes: ``images (N, C, H, W)``, ``labels (N,)`` -> ``(reconstructed (N, C, H, W),
    dropped (N, L) bool)``.
    """
    cam = gradcam_pp(net, images, labels if hp.cam_class == "label" else None, chunk)
    mask = drop_mask(patch_importance(cam, hp.patch), hp.drop_ratio)
    out = torch.cat([mae.reconstruct(images[i:i + chunk], mask[i:i + chunk]) for i in range(0, len(images), chunk)])
    return out, mask


def pixel_step_panels(original: torch.Tensor, dropped: torch.Tensor, reconstructed: torch.Tensor,
                      labels: torch.Tensor, preprocessing, patch: int) -> tuple[list[int], list[torch.Tensor]]:
    """What :func:`save_pixel_step_figure` draws: the index of the first image of every class present,
    and for those images three pixel-space rows in ``[0, 1]``: selected, the same with the dropped
    patches set to gray (0.5), and the MAE reconstruction.

    Shapes: ``original``, ``reconstructed`` ``(N, C, H, W)`` model space; ``dropped (N, L)`` bool,
    ``L = (H / patch) * (W / patch)`` row-major; ``labels (N,)`` -> ``first`` (K,) and three
    ``(K, C, H, W)`` tensors.
    """
    first = [int(torch.nonzero(labels == c)[0]) for c in range(int(labels.max()) + 1) if (labels == c).any()]
    x = preprocessing.inverse(original[first].float().cpu()).clamp(0, 1)
    r = preprocessing.inverse(reconstructed[first].float().cpu()).clamp(0, 1)
    h, w = x.shape[-2:]
    m = dropped[first].cpu().view(len(first), 1, h // patch, w // patch).float()
    m = F.interpolate(m, scale_factor=patch, mode="nearest").bool()  # (K, 1, H, W)
    return first, [x, torch.where(m, torch.full_like(x, 0.5), x), r]


def save_pixel_step_figure(original: torch.Tensor, dropped: torch.Tensor, reconstructed: torch.Tensor,
                           labels: torch.Tensor, classes: list[str], preprocessing, patch: int, path: str | Path,
                           tile: int = 96) -> Path:
    """A picture of the pixel step: for the first image of every class (columns, class names
    above), the selected image, the same with its dropped patches grayed out, and the MAE's
    reconstruction (rows; :func:`pixel_step_panels`), mapped back to pixels by
    ``preprocessing.inverse``.

    Shapes: as :func:`pixel_step_panels`.

    Returns: ``path`` (a PNG).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first, panels = pixel_step_panels(original, dropped, reconstructed, labels, preprocessing, patch)
    names = ["selected", f"{float(dropped.float().mean()):.0%} of patches\ndropped", "MAE\nreconstruction"]
    fig, axes = plt.subplots(3, len(first), figsize=(1.1 * len(first) + 1.6, 3.9), squeeze=False)
    for i, (name, imgs) in enumerate(zip(names, panels)):
        for j in range(len(first)):
            ax = axes[i][j]
            ax.imshow(F.interpolate(imgs[j:j + 1], size=(tile, tile), mode="nearest")[0].permute(1, 2, 0).squeeze(-1)
                      .numpy(), cmap="gray" if imgs.shape[1] == 1 else None, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_title(classes[int(labels[first[j]])], fontsize=9)
            if j == 0:
                ax.set_ylabel(name, fontsize=9)
    fig.suptitle("Dataset Quantization pixel step (GradCAM++ importance, MAE trained here)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
