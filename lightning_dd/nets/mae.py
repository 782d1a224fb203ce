"""A small masked autoencoder (MAE; He et al., "Masked Autoencoders Are Scalable Vision Learners",
CVPR 2022, arXiv 2111.06377) for patch reconstruction at the data's own resolution.

Dataset Quantization's pixel step (arXiv 2308.10524, Sec. 3.4) reconstructs dropped patches with
an ImageNet-pretrained MAE; no pretrained weights can be downloaded here, so
:mod:`lightning_dd.methods.images.pixel_quantization` trains this one on the real training pool.

Architecture (the MAE recipe at small size): patches of ``patch x patch`` pixels linearly embedded
with fixed 2-D sine-cosine position embeddings, a pre-norm Transformer encoder over the *visible*
patches only, a lighter decoder over all positions (a learned mask token in the masked ones),
a linear head to the patch pixels. Built from :class:`torch.nn.TransformerEncoderLayer`.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """``(N, C, H, W)`` -> ``(N, L, p*p*C)`` patches in row-major order (``L = H/p * W/p``).

    Raises:
        ValueError: ``H`` or ``W`` not divisible by ``p``.
    """
    n, c, h, w = x.shape
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by the patch size {p}")
    x = x.reshape(n, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(t: torch.Tensor, p: int, c: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``(N, L, p*p*C)`` -> ``(N, C, H, W)``."""
    n = t.shape[0]
    x = t.reshape(n, h // p, w // p, p, p, c).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(n, c, h, w)


def sincos_2d(dim: int, gh: int, gw: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding (MAE, Sec. A.1): ``(gh * gw, dim)``, ``dim % 4 == 0``."""
    if dim % 4:
        raise ValueError(f"MAE embedding dim must be a multiple of 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    yy, xx = torch.meshgrid(torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64),
                            indexing="ij")
    parts = []
    for grid in (yy.flatten(), xx.flatten()):
        arg = grid[:, None] * omega[None]
        parts += [arg.sin(), arg.cos()]
    return torch.cat(parts, 1).float()


def _blocks(dim: int, depth: int, heads: int) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=4 * dim, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True)
    return nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)


class MAE(nn.Module):
    """Masked autoencoder over ``patch x patch`` patches.

    Args:
        channels, image_size: input ``C`` and ``(H, W)``.
        patch: patch side in pixels.
        dim, depth, heads: encoder width, blocks, attention heads.
        decoder_dim, decoder_depth, decoder_heads: the decoder's.

    Shapes:
        ``forward(x (N, C, H, W), mask (N, L) bool)`` -> ``(N, L, p*p*C)`` predicted patches (all
        positions); ``mask`` is True where a patch is hidden, with the same count per image.
    """

    def __init__(self, channels: int = 3, image_size=(32, 32), patch: int = 4, dim: int = 128, depth: int = 4,
                 heads: int = 4, decoder_dim: int = 64, decoder_depth: int = 2, decoder_heads: int = 4):
        super().__init__()
        h, w = image_size
        if h % patch or w % patch:
            raise ValueError(f"image size {h}x{w} is not divisible by the patch size {patch}")
        self.patch, self.channels, self.image_size = patch, channels, (h, w)
        gh, gw = h // patch, w // patch
        self.num_patches = gh * gw
        self.embed = nn.Linear(patch * patch * channels, dim)
        self.register_buffer("pos", sincos_2d(dim, gh, gw), persistent=False)
        self.encoder, self.enc_norm = _blocks(dim, depth, heads), nn.LayerNorm(dim)
        self.to_decoder = nn.Linear(dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(decoder_dim))
        self.register_buffer("dec_pos", sincos_2d(decoder_dim, gh, gw), persistent=False)
        self.decoder, self.dec_norm = _blocks(decoder_dim, decoder_depth, decoder_heads), nn.LayerNorm(decoder_dim)
        self.head = nn.Linear(decoder_dim, patch * patch * channels)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n, L = x.shape[0], self.num_patches
        counts = mask.sum(1)
        if mask.shape != (n, L) or bool((counts != counts[0]).any()):
            raise ValueError(f"mask must be (N, {L}) with the same number of hidden patches per image")
        tokens = self.embed(patchify(x, self.patch)) + self.pos
        order = torch.argsort(mask.to(torch.int8), dim=1, stable=True)  # visible first, in position order
        n_vis = L - int(counts[0])
        vis = torch.gather(tokens, 1, order[:, :n_vis, None].expand(-1, -1, tokens.shape[2]))
        enc = self.to_decoder(self.enc_norm(self.encoder(vis)))
        full = self.mask_token.expand(n, L, -1).clone()
        full.scatter_(1, order[:, :n_vis, None].expand(-1, -1, enc.shape[2]), enc)
        return self.head(self.dec_norm(self.decoder(full + self.dec_pos)))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``x`` with its hidden patches (``mask`` True) replaced by the MAE's prediction; the
        visible patches are returned unchanged (bit for bit). ``(N, C, H, W)`` -> same."""
        p, (h, w) = self.patch, self.image_size
        pred = self(x, mask)
        patches = torch.where(mask[..., None], pred, patchify(x, p))
        return unpatchify(patches, p, self.channels, h, w)


def random_mask(n: int, num_patches: int, ratio: float, generator: torch.Generator | None = None,
                device=None) -> torch.Tensor:
    """``(n, num_patches)`` bool, exactly ``round(ratio * num_patches)`` True (hidden) per row, uniformly."""
    k = int(round(ratio * num_patches))
    noise = torch.rand(n, num_patches, generator=generator).to(device)
    ranks = noise.argsort(1).argsort(1)
    return ranks < k


def mae_loss(pred: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, patch: int) -> torch.Tensor:
    """MAE's loss: mean squared error of the hidden patches' pixels (not normalized per patch, since
    the predictions are pasted back into images). Shapes: ``pred (N, L, D)``, ``x (N, C, H, W)``,
    ``mask (N, L)`` -> scalar."""
    err = ((pred - patchify(x, patch)) ** 2).mean(2)
    return (err * mask).sum() / mask.sum().clamp_min(1)


__all__ = ["MAE", "patchify", "unpatchify", "sincos_2d", "random_mask", "mae_loss"]
