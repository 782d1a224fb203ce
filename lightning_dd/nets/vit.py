"""A small ViT / DeiT (Dosovitskiy et al., arXiv 2010.11929; DeiT, Touvron et al., arXiv 2012.12877)
whose attention has separate q/k/v projections and named activation hooks, so that a quantizer can
be put on every tensor the quantized-ViT papers quantize (QAT-ViT, arXiv 2307.00331).

The parameter names follow timm's ``VisionTransformer`` (``patch_embed.proj``, ``cls_token``,
``pos_embed``, ``blocks.<i>.norm1``, ``blocks.<i>.attn.proj``, ``blocks.<i>.mlp.fc1``, ``norm``,
``head``) except that timm's fused ``attn.qkv`` is three Linears ``attn.q``, ``attn.k``,
``attn.v``: :func:`split_fused_qkv` converts a timm/DeiT state dict, and :func:`load_vit_state`
loads it strictly (a missing or unexpected key is an error, unlike the reference code's
``strict=False``).

Deviations from timm: timm is not a dependency of this project, so the blocks are plain
``torch.nn`` (LayerNorm eps 1e-6 as timm's ViT, exact GELU, drop path as timm's ``DropPath``);
the attention forward is ours (explicit ``softmax(q k^T / sqrt(d)) v``, not
``scaled_dot_product_attention``) because a quantizer must see q, k, v, the softmax output and
``attn @ v``. No dropout except drop path; no distillation token.
"""
from __future__ import annotations

import re

import torch
import torch.nn as nn


class DropPath(nn.Module):
    """Stochastic depth per sample (Huang et al. 2016; timm's ``DropPath``): in training, zero the
    residual branch of a sample with probability ``p`` and scale the others by ``1/(1-p)``.

    Shapes: ``(B, ...)`` -> same."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Attention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections.

    Hooks (``nn.Identity`` in the FP net, replaced by quantizers in the quantized one):
    ``in_act`` (the input, shared by the q/k/v projections), ``q_act``, ``k_act``, ``v_act`` (after
    the projections), ``attn_act`` (softmax output). The
    input of ``proj`` is ``attn @ v`` (quantized by ``proj``'s own input quantizer when ``proj``
    is a quantized Linear). The pre-softmax logits stay in floating point.

    Shapes: ``(B, N, D)`` -> ``(B, N, D)``; ``D`` divisible by ``num_heads``.

    Raises:
        ValueError: ``dim`` not divisible by ``num_heads``.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"ViT: embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.in_act = nn.Identity()
        self.q_act, self.k_act, self.v_act, self.attn_act = nn.Identity(), nn.Identity(), nn.Identity(), nn.Identity()

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``bias``: added to the pre-softmax logits ``(B, heads, N, N)`` (broadcast; e.g. Swin's
        relative position bias and window mask), ``None`` for plain attention."""
        b, n, d = x.shape
        x = self.in_act(x)
        q = self._heads(self.q_act(self.q(x)))
        k = self._heads(self.k_act(self.k(x)))
        v = self._heads(self.v_act(self.v(x)))
        logits = q @ k.transpose(-2, -1) * self.scale
        if bias is not None:
            logits = logits + bias
        attn = self.attn_act(logits.softmax(-1))
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """``fc2(act_out(GELU(fc1(x))))``; ``act_out`` is the GELU-output hook (``nn.Identity`` in FP).

    Shapes: ``(B, N, D)`` -> ``(B, N, D)``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)
        self.act_out = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act_out(self.act(self.fc1(x))))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + dp(attn(norm1(x)))``, then ``x + dp(mlp(norm2(x)))``.

    Shapes: ``(B, N, D)`` -> ``(B, N, D)``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, num_heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ViT(nn.Module):
    """ViT / DeiT classifier: conv patch embedding, class token, learned position embedding,
    ``depth`` pre-norm blocks, final LayerNorm, linear head on the class token.

    Built like every framework net: ``ViT(channel, num_classes, im_size, **kwargs)`` (a net config
    ``{_target_: lightning_dd.nets.vit.ViT, patch_size: 4, embed_dim: 192, ...}``). DeiT-Tiny is
    ``patch_size=16, embed_dim=192, depth=12, num_heads=3`` at 224 px; DeiT-Small ``embed_dim=384,
    num_heads=6``.

    Args:
        patch_size: square patches; must divide both sides of ``im_size``.
        mlp_ratio: MLP hidden width / ``embed_dim``. drop_path: the last block's rate (linear
            from 0 over the blocks, as timm/DeiT).

    Shapes: ``(B, channel, H, W)`` -> ``(B, num_classes)`` logits.

    Raises:
        ValueError: a patch size that does not divide the image, or ``embed_dim`` not divisible
            by ``num_heads``.
    """

    def __init__(self, channel: int, num_classes: int, im_size=(32, 32), patch_size: int = 4, embed_dim: int = 192,
                 depth: int = 6, num_heads: int = 3, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        h, w = int(im_size[0]), int(im_size[1])
        if h % patch_size or w % patch_size:
            raise ValueError(f"ViT: patch_size {patch_size} does not divide the image size {h}x{w}")
        self.config = {"patch_size": patch_size, "embed_dim": embed_dim, "depth": depth, "num_heads": num_heads,
                       "mlp_ratio": mlp_ratio, "drop_path": drop_path}
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(channel, embed_dim, patch_size, stride=patch_size)
        n = (h // patch_size) * (w // patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, embed_dim))
        rates = torch.linspace(0, drop_path, depth).tolist() if depth > 1 else [drop_path]
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, r) for r in rates)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The head's input: ``(B, C, H, W)`` -> ``(B, embed_dim)`` (normalized class token)."""
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _init_weights(m: nn.Module) -> None:
    """timm's ViT init: Linear weights truncated normal (std 0.02), zero biases; LayerNorm 1/0."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


_QKV = re.compile(r"^(.*\.attn)\.qkv\.(weight|bias)$")


def split_fused_qkv(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm/DeiT state dict with fused ``<block>.attn.qkv.{weight,bias}`` rewritten to this
    module's ``<block>.attn.{q,k,v}.{weight,bias}`` (timm stacks them in the order q, k, v along
    the output dimension); other keys unchanged. A state dict without ``qkv`` keys comes back as is.

    Shapes: ``qkv.weight (3D, D)`` -> three ``(D, D)``; ``qkv.bias (3D,)`` -> three ``(D,)``.

    Raises:
        ValueError: a ``qkv`` tensor whose first dimension is not divisible by 3.
    """
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        m = _QKV.match(key)
        if m is None:
            out[key] = t
            continue
        if t.shape[0] % 3:
            raise ValueError(f"{key}: fused qkv of shape {tuple(t.shape)} is not 3 stacked projections")
        for name, part in zip("qkv", t.chunk(3, 0)):
            out[f"{m.group(1)}.{name}.{m.group(2)}"] = part.clone()
    return out


_RECOMPUTED = re.compile(r"\.(relative_position_index|attn_mask)$")  # official Swin buffers, rebuilt here


def load_vit_state(net: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Load ``state`` (this module's layout, or timm's / the official Swin code's with fused qkv,
    see :func:`split_fused_qkv`) into ``net`` (a :class:`ViT` or :class:`lightning_dd.nets.swin.Swin`)
    strictly; a ``module.``/``model.`` prefix (DDP / EMA wrappers) is dropped, and so are Swin's
    ``relative_position_index`` / ``attn_mask`` buffers (deterministic; the net recomputes them).

    Raises:
        ValueError: missing or unexpected keys, or shapes that do not fit (the message names them).
    """
    state = {re.sub(r"^(module|model)\.", "", k): v for k, v in state.items() if not _RECOMPUTED.search(k)}
    try:
        net.load_state_dict(split_fused_qkv(state), strict=True)
    except RuntimeError as e:
        raise ValueError(f"ViT checkpoint does not fit the net {net.config}: {str(e)[:500]}") from None
    return net
