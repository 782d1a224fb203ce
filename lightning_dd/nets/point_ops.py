"""Point-cloud operators in pure, batched PyTorch (no compiled extension: torch-cluster and the
pointnet2 CUDA ops have no wheels here): farthest point sampling, ball query with the pointnet2
semantics, grouping by index, and the Chamfer distance.

Semantics follow the pointnet2 CUDA kernels used by P4Transformer (Fan et al., CVPR 2021) and
MaST-Pre (Shen et al., ICCV 2023):

* :func:`farthest_point_sample` starts at point 0 and repeatedly takes the point farthest (squared
  Euclidean) from the chosen set; ties go to the lowest index.
* :func:`ball_query` returns, per centre, the first ``k`` points *in index order* with squared
  distance ``< r**2`` (strict), the remaining slots filled with the first hit; a centre without any
  point in the ball gets index 0 everywhere (what the CUDA kernel's zero-initialized output holds).
* :func:`chamfer_l2` is Point-MAE's ``ChamferDistanceL2``: mean squared nearest-neighbour distance
  in both directions, summed.

Deviation: FPS is a Python loop over the ``m`` samples with each step vectorized over the batch and
the points (``O(m N)`` work, like the CUDA kernel, but ``m`` kernel launches); ball query builds the
dense ``(B, M, N)`` distance matrix (chunk the centres with ``chunk`` on large clouds).
"""
from __future__ import annotations

import torch


def farthest_point_sample(xyz: torch.Tensor, m: int) -> torch.Tensor:
    """Indices of ``m`` points chosen by farthest point sampling, starting at index 0.

    Shapes:
        xyz: ``(B, N, 3)`` (any float dtype/device). Returns ``(B, m)`` long.

    Raises:
        ValueError: ``m`` not in ``1..N``.
    """
    b, n, _ = xyz.shape
    if not 1 <= m <= n:
        raise ValueError(f"farthest_point_sample: m={m} must be in 1..{n}")
    idx = torch.zeros(b, m, dtype=torch.long, device=xyz.device)
    mind = torch.full((b, n), float("inf"), dtype=xyz.dtype, device=xyz.device)
    last = torch.zeros(b, dtype=torch.long, device=xyz.device)
    ar = torch.arange(b, device=xyz.device)
    for i in range(1, m):
        d = (xyz - xyz[ar, last].unsqueeze(1)).pow(2).sum(-1)
        mind = torch.minimum(mind, d)
        last = mind.argmax(1)  # first maximum: ties go to the lowest index
        idx[:, i] = last
    return idx


def gather_points(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` picked per batch element by ``idx`` (pointnet2's gather / grouping operation).

    Shapes:
        x: ``(B, N, C)``; idx: ``(B, *S)`` long with values in ``0..N-1``. Returns ``(B, *S, C)``.
    """
    b = x.shape[0]
    flat = idx.reshape(b, -1)
    out = torch.gather(x, 1, flat.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return out.reshape(*idx.shape, x.shape[-1])


def ball_query(radius: float, k: int, xyz: torch.Tensor, centers: torch.Tensor,
               chunk: int | None = None) -> torch.Tensor:
    """Indices of up to ``k`` points of ``xyz`` within ``radius`` of each centre, pointnet2 semantics.

    The first ``k`` points in index order with squared distance ``< radius**2``; missing slots repeat
    the first hit; a centre with no point in the ball gets all zeros.

    Shapes:
        xyz: ``(B, N, 3)``; centers: ``(B, M, 3)``. Returns ``(B, M, k)`` long.

    Args:
        chunk: centres per step (bounds the ``(B, chunk, N)`` distance matrix); ``None``: all.

    Raises:
        ValueError: ``k < 1`` or ``radius <= 0``.
    """
    if k < 1 or radius <= 0:
        raise ValueError(f"ball_query: need k >= 1 and radius > 0 (got k={k}, radius={radius})")
    if chunk is not None and centers.shape[1] > chunk:
        return torch.cat([ball_query(radius, k, xyz, c) for c in centers.split(chunk, 1)], 1)
    n = xyz.shape[1]
    d2 = (centers.unsqueeze(2) - xyz.unsqueeze(1)).pow(2).sum(-1)  # exact (cdist rounds near the boundary)
    inside = d2 < radius * radius
    key = torch.where(inside, torch.arange(n, device=xyz.device), n)  # index of a hit, n = miss
    kk = min(k, n)
    first = key.topk(kk, dim=-1, largest=False, sorted=True).values  # (B, M, kk), hits in index order
    if kk < k:
        first = torch.cat([first, first.new_full((*first.shape[:2], k - kk), n)], -1)
    head = first[..., :1]
    first = torch.where(first == n, head, first)  # pad with the first hit
    return torch.where(first == n, 0, first)     # no hit at all: index 0


def chamfer_l2(x: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Chamfer-L2 distance: ``mean_i min_j |x_i - y_j|^2 + mean_j min_i |x_i - y_j|^2`` per pair
    (Point-MAE's ``ChamferDistanceL2``, used by MaST-Pre Sec. 3.3), in squared input units.

    Shapes:
        x: ``(B, N, 3)``; y: ``(B, M, 3)``. Returns ``(B,)`` (``reduction="none"``) or a scalar
        (``"mean"``: the average over the batch, the reference's value).
    """
    d2 = (x.unsqueeze(2) - y.unsqueeze(1)).pow(2).sum(-1)  # (B, N, M)
    per = d2.min(2).values.mean(1) + d2.min(1).values.mean(1)
    return per.mean() if reduction == "mean" else per
