"""Graph neural networks for condensation and its cross-architecture evaluation (GCond,
arXiv 2110.07580, Sec. 5; SGDD, arXiv 2310.09192): GCN, SGC, APPNP, ChebNet, GraphSAGE and an MLP,
built on torch_geometric's layers.

All take ``forward(x (N, F), edge_index (2, E), edge_weight (E,) | None) -> (N, K)`` logits, so the
same network runs on a weighted condensed graph (dense adjacency turned into weighted edges by
:func:`dense_to_edges`) and on the real sparse graph.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def dense_to_edges(adj: torch.Tensor, threshold: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, N)`` weighted adjacency -> ``edge_index (2, E)``, ``edge_weight (E,)`` of entries
    above ``threshold``, row-major (``torch_geometric.utils.dense_to_sparse``; differentiable in
    the kept weights)."""
    from torch_geometric.utils import dense_to_sparse

    return dense_to_sparse(torch.where(adj > threshold, adj, torch.zeros_like(adj)))


class GNN(nn.Module):
    """A node classifier of kind ``GCN`` | ``SGC`` | ``APPNP`` | ``ChebNet`` | ``GraphSAGE`` | ``MLP``.

    Args:
        in_dim, num_classes: F and K.
        hidden: hidden width (256 in GCond); nlayers: message-passing layers (2);
        dropout: on hidden features (0.5 for evaluation, 0 for condensation);
        K: SGC propagation steps (2) / APPNP steps (10) / Chebyshev order (2); alpha: APPNP teleport (0.1).

    Raises:
        ValueError: unknown kind.
    """

    KINDS = ("GCN", "SGC", "APPNP", "ChebNet", "GraphSAGE", "MLP")

    def __init__(self, kind: str, in_dim: int, num_classes: int, hidden: int = 256, nlayers: int = 2,
                 dropout: float = 0.5, K: int | None = None, alpha: float = 0.1):
        super().__init__()
        from torch_geometric.nn import APPNP, ChebConv, GCNConv, SAGEConv

        if kind not in self.KINDS:
            raise ValueError(f"GNN kind must be one of {self.KINDS}, got {kind!r}")
        self.kind, self.dropout = kind, dropout
        dims = [in_dim] + [hidden] * (nlayers - 1) + [num_classes]
        self.prop = None
        if kind == "SGC":
            # SGC (Wu et al. 2019): A_hat^K X W + b, computed as A_hat^K (X W) + b -- the same
            # function (propagation is linear), propagating K-dim logits instead of F-dim
            # features: ~200x less work on Cora than SGConv's order.
            self.layers = nn.ModuleList([nn.Linear(in_dim, num_classes, bias=False)])
            self.sgc_bias = nn.Parameter(torch.zeros(num_classes))
            self.prop = APPNP(K=K or 2, alpha=0.0)
        elif kind in ("MLP", "APPNP"):
            self.layers = nn.ModuleList([nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:])])
            if kind == "APPNP":
                self.prop = APPNP(K=K or 10, alpha=alpha)
        elif kind == "GCN":
            self.layers = nn.ModuleList([GCNConv(a, b, cached=False) for a, b in zip(dims[:-1], dims[1:])])
        elif kind == "ChebNet":
            self.layers = nn.ModuleList([ChebConv(a, b, K=K or 2) for a, b in zip(dims[:-1], dims[1:])])
        else:
            self.layers = nn.ModuleList([SAGEConv(a, b) for a, b in zip(dims[:-1], dims[1:])])

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, edge_weight: torch.Tensor | None = None):
        for i, layer in enumerate(self.layers):
            if self.kind in ("MLP", "APPNP", "SGC"):
                x = layer(x)
            elif self.kind == "GraphSAGE":
                x = sage_weighted(layer, x, edge_index, edge_weight)
            else:
                x = layer(x, edge_index, edge_weight)
            if i < len(self.layers) - 1:
                x = F.dropout(F.relu(x), self.dropout, self.training)
        if self.prop is not None:
            x = self.prop(x, edge_index, edge_weight)
        if self.kind == "SGC":
            x = x + self.sgc_bias
        return x


def sage_weighted(layer, x: torch.Tensor, edge_index: torch.Tensor, edge_weight: torch.Tensor | None) -> torch.Tensor:
    """A ``SAGEConv`` (mean aggregation, root weight) whose neighbour mean is weighted by
    ``edge_weight`` ``(E,)``: ``lin_l(sum_j w_ij x_j / sum_j w_ij) + lin_r(x_i)``. Equal to
    ``layer(x, edge_index)`` for unit weights; SAGEConv itself ignores weights, which on a dense
    weighted condensed graph would average over all nodes. Projects before aggregating (the
    mean is linear): ``(N, out)`` messages instead of ``(N, F)``."""
    from torch_geometric.utils import scatter

    src, dst = edge_index
    w = torch.ones(src.shape[0], dtype=x.dtype, device=x.device) if edge_weight is None else edge_weight
    msg = F.linear(x, layer.lin_l.weight)[src] * w[:, None]
    num = scatter(msg, dst, 0, dim_size=x.shape[0], reduce="sum")
    den = scatter(w, dst, 0, dim_size=x.shape[0], reduce="sum").clamp(min=1e-12)
    out = num / den[:, None] + layer.lin_l.bias
    return out + layer.lin_r(x)
