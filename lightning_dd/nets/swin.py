"""Swin Transformer (Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted
Windows", ICCV 2021, arXiv 2103.14030) with separate q/k/v projections and the activation hooks of
:mod:`lightning_dd.nets.vit`, so that QAT-ViT (arXiv 2307.00331) can quantize Swin-T as it does DeiT.

Parameter names follow the official code (microsoft/Swin-Transformer, the layout of its released
``swin_tiny_patch4_window7_224.pth``): ``patch_embed.{proj,norm}``,
``layers.<i>.blocks.<j>.{norm1,attn,norm2,mlp}``, ``layers.<i>.downsample.{norm,reduction}`` (patch
merging at the *end* of stages 0..n-2), ``norm``, ``head``; except that the fused ``attn.qkv`` is
three Linears ``attn.q``, ``attn.k``, ``attn.v`` (:func:`lightning_dd.nets.vit.split_fused_qkv`
converts, :func:`lightning_dd.nets.vit.load_vit_state` loads strictly). The relative-position
index and the shifted-window attention mask are recomputed, non-persistent buffers (the official
checkpoints' copies are dropped on load).

Deviations from the official code: the attention forward is ours (explicit softmax, q/k/v and
softmax-output hooks); no absolute position embedding (the official default ``ape=False``); no
dropout except drop path. A test checks the forward against timm's ``SwinTransformer`` loaded
with the same weights through timm's own converter of official checkpoints.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from lightning_dd.nets.vit import Attention, DropPath, Mlp, _init_weights


def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """Non-overlapping ``ws x ws`` windows. Shapes: ``(B, H, W, C)`` -> ``(B * H/ws * W/ws, ws*ws, C)``."""
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, c)


def window_reverse(windows: torch.Tensor, ws: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`. Shapes: ``(B * nW, ws*ws, C)`` -> ``(B, H, W, C)``."""
    c = windows.shape[-1]
    x = windows.view(-1, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def relative_position_index(ws: int) -> torch.Tensor:
    """``(ws*ws, ws*ws)`` index into the ``((2 ws - 1)^2, heads)`` bias table (Swin Sec. 3.2)."""
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)  # (2, ws*ws)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)                           # (N, N, 2)
    return rel[..., 0] * (2 * ws - 1) + rel[..., 1]


def shifted_window_mask(h: int, w: int, ws: int, shift: int) -> torch.Tensor:
    """Additive mask ``(nW, ws*ws, ws*ws)`` (0 or -100) of the cyclically shifted windows: tokens
    from different regions of the shifted map do not attend to each other (Swin Sec. 3.2)."""
    region = torch.zeros(1, h, w, 1)
    cuts = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
    for n, (hs, wsl) in enumerate((a, b) for a in cuts for b in cuts):
        region[:, hs, wsl, :] = n
    r = window_partition(region, ws).squeeze(-1)                  # (nW, N)
    return (r[:, None, :] != r[:, :, None]).float() * -100.0


class WindowAttention(Attention):
    """Window multi-head self-attention with a learned relative position bias (Swin Sec. 3.2);
    the q/k/v projections and hooks of :class:`lightning_dd.nets.vit.Attention` (the bias is
    added to the pre-softmax logits, which stay in floating point).

    Shapes: ``x (B * nW, ws*ws, D)``, ``mask (nW, ws*ws, ws*ws)`` or ``None`` -> ``(B * nW, ws*ws, D)``.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int):
        super().__init__(dim, num_heads)
        self.window_size = window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(window_size), persistent=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        idx = self.relative_position_index.view(-1)
        bias = self.relative_position_bias_table[idx].view(n, n, -1).permute(2, 0, 1).unsqueeze(0)  # (1, heads, N, N)
        if mask is not None:  # windows are batch-major: window w of image i is row i * nW + w
            nw = mask.shape[0]
            bias = (bias + mask[:, None]).repeat(b // nw, 1, 1, 1)                                    # (B, heads, N, N)
        return super().forward(x, bias)


class SwinBlock(nn.Module):
    """Swin block: (shifted) window attention and MLP, pre-norm, residual with drop path.

    Shapes: ``(B, H*W, D)`` -> ``(B, H*W, D)`` at the block's ``resolution (H, W)``."""

    def __init__(self, dim: int, resolution: tuple[int, int], num_heads: int, window_size: int, shift: int,
                 mlp_ratio: float, drop_path: float):
        super().__init__()
        self.resolution = resolution
        if min(resolution) <= window_size:  # the official rule: one window, no shift
            window_size, shift = min(resolution), 0
        self.window_size, self.shift = window_size, shift
        self.norm1, self.attn = nn.LayerNorm(dim), WindowAttention(dim, num_heads, window_size)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)
        mask = shifted_window_mask(*resolution, window_size, shift) if shift else None
        self.register_buffer("attn_mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (h, w), (b, _, c), ws, s = self.resolution, x.shape, self.window_size, self.shift
        y = self.norm1(x).view(b, h, w, c)
        if s:
            y = torch.roll(y, (-s, -s), (1, 2))
        y = window_reverse(self.attn(window_partition(y, ws), self.attn_mask), ws, h, w)
        if s:
            y = torch.roll(y, (s, s), (1, 2))
        x = x + self.drop_path(y.reshape(b, h * w, c))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 neighbouring tokens concatenated (order x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2],
    x[1::2, 1::2]), LayerNorm, Linear 4D -> 2D without bias (Swin Sec. 3.1).

    Shapes: ``(B, H*W, D)`` -> ``(B, H/2 * W/2, 2D)``."""

    def __init__(self, dim: int, resolution: tuple[int, int]):
        super().__init__()
        self.resolution = resolution
        self.norm, self.reduction = nn.LayerNorm(4 * dim), nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (h, w), (b, _, c) = self.resolution, x.shape
        x = x.view(b, h, w, c)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class SwinStage(nn.Module):
    """``depth`` blocks alternating regular and shifted windows, then optional patch merging."""

    def __init__(self, dim, resolution, depth, num_heads, window_size, mlp_ratio, rates, downsample: bool):
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinBlock(dim, resolution, num_heads, window_size, 0 if j % 2 == 0 else window_size // 2, mlp_ratio,
                      rates[j]) for j in range(depth))
        self.downsample = PatchMerging(dim, resolution) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.downsample(x) if self.downsample is not None else x


class Swin(nn.Module):
    """Swin Transformer classifier (module docstring), built like every framework net:
    ``Swin(channel, num_classes, im_size, **kwargs)``. Swin-T: ``patch_size=4, embed_dim=96,
    depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7`` at 224 px.

    Args:
        patch_size: square patches; ``im_size / patch_size`` must be divisible by the window size
            (at every stage until it is no larger than one window) and by 2 per merging.
        drop_path: the last block's rate (linear from 0 over all blocks, as the official code).

    Shapes: ``(B, channel, H, W)`` -> ``(B, num_classes)`` logits.

    Raises:
        ValueError: an image size the patches, windows or mergings do not divide, or a stage
            width not divisible by its heads.
    """

    def __init__(self, channel: int, num_classes: int, im_size=(224, 224), patch_size: int = 4, embed_dim: int = 96,
                 depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size: int = 7, mlp_ratio: float = 4.0,
                 drop_path: float = 0.0):
        super().__init__()
        depths, num_heads = tuple(int(d) for d in depths), tuple(int(h) for h in num_heads)
        if len(depths) != len(num_heads):
            raise ValueError(f"Swin: depths {depths} and num_heads {num_heads} differ in length")
        self.config = {"patch_size": patch_size, "embed_dim": embed_dim, "depths": list(depths),
                       "num_heads": list(num_heads), "window_size": window_size, "mlp_ratio": mlp_ratio,
                       "drop_path": drop_path}
        res = (int(im_size[0]) // patch_size, int(im_size[1]) // patch_size)
        if int(im_size[0]) % patch_size or int(im_size[1]) % patch_size:
            raise ValueError(f"Swin: patch_size {patch_size} does not divide the image size {tuple(im_size)}")
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(channel, embed_dim, patch_size, stride=patch_size)
        self.patch_embed.norm = nn.LayerNorm(embed_dim)
        rates = torch.linspace(0, drop_path, sum(depths)).tolist()
        self.layers, dim = nn.ModuleList(), embed_dim
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            last = i == len(depths) - 1
            if min(res) > window_size and (res[0] % window_size or res[1] % window_size):
                raise ValueError(f"Swin: stage {i} resolution {res} is not divisible by window_size {window_size}")
            if not last and (res[0] % 2 or res[1] % 2):
                raise ValueError(f"Swin: stage {i} resolution {res} cannot be merged 2x2")
            self.layers.append(SwinStage(dim, res, depth, heads, window_size, mlp_ratio,
                                         rates[sum(depths[:i]):sum(depths[:i + 1])], downsample=not last))
            if not last:
                dim, res = 2 * dim, (res[0] // 2, res[1] // 2)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.apply(_init_weights)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The head's input: ``(B, C, H, W)`` -> ``(B, num_features)`` (token average after the norm)."""
        x = self.patch_embed.norm(self.patch_embed.proj(x).flatten(2).transpose(1, 2))
        for layer in self.layers:
            x = layer(x)
        return self.norm(x).mean(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
