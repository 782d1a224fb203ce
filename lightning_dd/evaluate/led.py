"""Laplacian Energy Distribution (LED) and the LED shift between two graphs (SGDD, Yang et al.,
NeurIPS 2023, arXiv 2310.09192, Sec. 3).

For a graph with symmetric normalized Laplacian ``L = I - D^-1/2 A D^-1/2 = U diag(lambda) U^T``
(eigenvalues in ``[0, 2]``) and node features ``X`` (N x F), the energy of the features at
eigenvalue ``lambda_k`` is ``e_k = sum_f (u_k^T x_f)^2``; the LED is the distribution
``p_k = e_k / sum_j e_j`` over the spectrum. Smooth (low-frequency) features put their energy at
small ``lambda``. The LED shift between an original graph and a condensed one compares their
LEDs as distributions on ``[0, 2]``; we use the 1-Wasserstein distance (the area between the two
cumulative distributions), which is zero for a graph against itself, positive otherwise, and
defined for graphs of different sizes.

The normalized Laplacian is :func:`lightning_dd.data.graph_ops.normalized_laplacian_dense`
(the one dense helper), the sparse normalized adjacency PyG's ``gcn_norm``.

Eigen-decomposition: exact (dense ``torch.linalg.eigh``) up to ``dense_max`` nodes. Beyond it the
LED is approximated without any eigenvector: its Chebyshev moments ``x^T T_j(L - I) x`` are exact
sparse matrix-vector products (the kernel polynomial method, Jackson damping), and the density is
evaluated on a grid -- O(moments x edges x F) time, O(N x F) memory.
"""
from __future__ import annotations

import math

import torch

from lightning_dd.data.graph_ops import dense_adjacency, normalized_laplacian_dense


def led_dense(adj: torch.Tensor, x: torch.Tensor, with_basis: bool = False) -> tuple[torch.Tensor, ...]:
    """Exact LED: ``(eigenvalues (N,), energy fractions (N,))`` for ``adj`` ``(N, N)``, ``x`` ``(N, F)``;
    ``with_basis``: also the eigenvectors ``(N, N)`` (columns, in the eigenvalues' order)."""
    lam, u = torch.linalg.eigh(normalized_laplacian_dense(adj.double()))
    e = (u.T @ x.double()).pow(2).sum(1)
    out = (lam.clamp(0, 2), e / e.sum().clamp(min=1e-300))
    return (*out, u) if with_basis else out


def _sparse_norm_adj(edge_index: torch.Tensor, n: int, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Sparse float64 ``D^-1/2 A D^-1/2`` ``(n, n)`` (PyG's ``gcn_norm`` without self loops)."""
    from torch_geometric.nn.conv.gcn_conv import gcn_norm

    w = torch.ones(edge_index.shape[1], dtype=torch.float64) if weight is None else weight.double()
    ei, vals = gcn_norm(edge_index, w, n, add_self_loops=False)
    return torch.sparse_coo_tensor(ei, vals, (n, n), check_invariants=True).coalesce()


def led_cdf_kpm(edge_index: torch.Tensor, n: int, x: torch.Tensor, grid: torch.Tensor, moments: int = 200,
                weight: torch.Tensor | None = None) -> torch.Tensor:
    """Approximate LED cumulative distribution on ``grid`` (points in ``[0, 2]``) by the kernel
    polynomial method, from sparse products only. ``L - I = -A_norm`` has spectrum in ``[-1, 1]``.

    Returns:
        ``(G,)`` CDF values (monotone, ending at 1).
    """
    a = _sparse_norm_adj(edge_index, n, weight)
    x = x.double()
    total = x.pow(2).sum()
    # mu_j = sum_f x_f^T T_j(M) x_f, M = L - I = -A_norm
    t_prev, t_cur = x, -(a @ x)
    mu = [total, (x * t_cur).sum()]
    for _ in range(2, moments):
        t_next = -2 * (a @ t_cur) - t_prev
        mu.append((x * t_next).sum())
        t_prev, t_cur = t_cur, t_next
    mu = torch.stack(mu) / total.clamp(min=1e-300)
    j = torch.arange(moments, dtype=torch.float64)
    jackson = ((moments - j + 1) * torch.cos(math.pi * j / (moments + 1))
               + torch.sin(math.pi * j / (moments + 1)) / math.tan(math.pi / (moments + 1))) / (moments + 1)
    c = mu * jackson
    # CDF of sum_j c_j g_j T_j(t) / (pi sqrt(1 - t^2)) on t = lambda - 1:
    # F(t) = (acos(-t)... ) using int T_j / sqrt(1-t^2) = -sin(j acos t) / j
    t = (grid.double() - 1).clamp(-1, 1)
    theta = torch.acos(t)
    cdf = (math.pi - theta) / math.pi * c[0]
    jj = j[1:, None]
    cdf = cdf - (2 / math.pi) * (c[1:, None] * torch.sin(jj * theta[None, :]) / jj).sum(0)
    cdf = torch.cummax(cdf.clamp(0, 1), 0).values
    return cdf / cdf[-1].clamp(min=1e-12)


def led_cdf(adj_or_edges, x: torch.Tensor, grid: torch.Tensor, dense_max: int = 4000, moments: int = 200) -> torch.Tensor:
    """LED cumulative distribution on ``grid``; ``adj_or_edges`` is a dense ``(N, N)`` adjacency or
    an ``edge_index`` ``(2, E)`` (sparse). Dense eigh when ``N <= dense_max``, else KPM."""
    n = x.shape[0]
    if adj_or_edges.dim() == 2 and adj_or_edges.shape == (n, n) and adj_or_edges.is_floating_point():
        adj = adj_or_edges
        if n > dense_max:
            ei = adj.nonzero().T
            return led_cdf_kpm(ei, n, x, grid, moments, weight=adj[ei[0], ei[1]])
    else:
        if n > dense_max:
            return led_cdf_kpm(adj_or_edges, n, x, grid, moments)
        adj = dense_adjacency(adj_or_edges, n, torch.float64)
    return spectrum_cdf(*led_dense(adj, x), grid)


def spectrum_cdf(lam: torch.Tensor, p: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """CDF ``(G,)`` on ``grid`` of the discrete distribution with mass ``p (N,)`` at ``lam (N,)``
    (e.g. :func:`led_dense`'s output)."""
    return (p[None, :] * (lam[None, :] <= grid.double()[:, None])).sum(1)


def led_shift(graph_a, x_a: torch.Tensor, graph_b, x_b: torch.Tensor, grid_points: int = 2001,
              dense_max: int = 4000, moments: int = 200) -> float:
    """1-Wasserstein distance between the LEDs of two graphs (each a dense adjacency or an
    ``edge_index``, with its node features), in eigenvalue units (``0 .. 2``)."""
    grid = torch.linspace(0, 2, grid_points, dtype=torch.float64)
    fa = led_cdf(graph_a, x_a, grid, dense_max, moments)
    fb = led_cdf(graph_b, x_b, grid, dense_max, moments)
    return w1_between_cdfs(fa, fb, grid)


def w1_between_cdfs(fa: torch.Tensor, fb: torch.Tensor, grid: torch.Tensor) -> float:
    """1-Wasserstein distance of two distributions on ``grid`` ``(G,)`` from their CDFs ``(G,)``
    (the area between them); lets a run compute the original graph's LED once."""
    return float(torch.trapezoid((fa - fb).abs(), grid))
