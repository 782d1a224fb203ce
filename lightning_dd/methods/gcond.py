"""GCond: graph condensation by gradient matching (Jin et al., ICLR 2022, arXiv 2110.07580),
transductive setting.

Learn ``N'`` synthetic nodes ``X'`` (initialized from real training nodes of each class) and a
structure generator (PGE, Sec. 3.3) ``A' = g(X')``: an MLP on node pairs, symmetrized, sigmoid,
no self loops. Each epoch (Alg. 1):

1. re-initialize a 2-layer GCN ``theta``;
2. ``outer_loop`` times: for every class ``c``, the gradient of the GCN loss on the real training
   nodes of ``c`` (on the real graph) and on the synthetic nodes of ``c`` (on ``(X', A')``) are
   matched (Eq. 6, GCond's distance: one minus the cosine per weight row, summed); the matching
   loss updates ``A'``'s generator during the first 10 of every 50 epochs and ``X'`` otherwise
   (alternating optimization, Sec. 3.4); then ``theta`` takes ``inner_loop`` Adam steps on the
   synthetic graph.

Speed (our own, not in the paper): the real-graph gradients use the receptive field only. With
``AX = A_hat X`` precomputed once, a 2-layer GCN's outputs on the training nodes ``T`` need the
hidden states of their 1-hop neighbourhood ``S`` only: ``out_T = A_hat[T, S] relu(AX[S] W1 + b1) W2
+ b2``, exactly. All classes' real gradients come from one batched ``torch.func.vmap`` of
``grad`` over per-class node weights.

Status: work in progress -- not yet wired into ``train.py`` (no ``experiment=gcond_cora`` yet) and
its Cora accuracy not yet reproduced; one epoch takes ~5-10 s on 2 CPU cores (profiled: the PGE
pair MLP and the batched real-graph gradients dominate).

Reduction rate follows GCond: ``N' = rate x`` (number of labeled training nodes) in the
transductive setting (Cora, rate 0.5 -> 70 nodes = 2.6% of the graph).
"""
from __future__ import annotations

import time

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from lightning_dd.results import CondensedGraph


class PGE(nn.Module):
    """GCond's parametrized graph generator: ``A'_ij = sigmoid((f([x_i; x_j]) + f([x_j; x_i])) / 2)``,
    zero diagonal; ``f`` is an MLP (``nlayers`` linear layers, ``hidden`` wide, batch norm + ReLU).

    Shapes: ``x (N', F) -> (N', N')`` symmetric, entries in ``(0, 1)``, zero diagonal.
    """

    def __init__(self, in_dim: int, hidden: int = 128, nlayers: int = 3):
        super().__init__()
        self.first_i = nn.Linear(in_dim, hidden)
        self.first_j = nn.Linear(in_dim, hidden, bias=False)
        self.bns = nn.ModuleList([nn.BatchNorm1d(hidden) for _ in range(nlayers - 1)])
        self.mids = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(nlayers - 2)])
        self.out = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        # first layer on the concatenation [x_i; x_j] = W_i x_i + W_j x_j, for all pairs at once
        h = (self.first_i(x)[:, None, :] + self.first_j(x)[None, :, :]).reshape(n * n, -1)
        h = F.relu(self.bns[0](h))
        for lin, bn in zip(self.mids, self.bns[1:]):
            h = F.relu(bn(lin(h)))
        logits = self.out(h).view(n, n)
        adj = torch.sigmoid((logits + logits.T) / 2)
        return adj * (1 - torch.eye(n, device=x.device))


def gcn_norm_dense(adj: torch.Tensor) -> torch.Tensor:
    """``D^-1/2 (A + I) D^-1/2`` of a dense ``(N, N)`` adjacency (Kipf & Welling)."""
    a = adj + torch.eye(len(adj), device=adj.device)
    d = a.sum(1).rsqrt()
    return d[:, None] * a * d[None, :]


def gcn_norm_sparse(edge_index: torch.Tensor, n: int) -> torch.Tensor:
    """Sparse COO ``D^-1/2 (A + I) D^-1/2`` of an unweighted graph."""
    loops = torch.arange(n).repeat(2, 1)
    ei = torch.cat([edge_index, loops], 1)
    deg = torch.zeros(n).index_add_(0, ei[0], torch.ones(ei.shape[1]))
    w = deg[ei[0]].rsqrt() * deg[ei[1]].rsqrt()
    return torch.sparse_coo_tensor(ei, w, (n, n)).coalesce()


class GCN2(nn.Module):
    """Two-layer GCN ``A relu(A X W1 + b1) W2 + b2`` on a dense normalized adjacency (the
    condensation model; no dropout)."""

    def __init__(self, in_dim: int, hidden: int, num_classes: int):
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(in_dim, hidden), nn.Linear(hidden, num_classes)

    def forward(self, x, adj_norm):
        return _gcn_dense(dict(self.named_parameters()), x, adj_norm)


def _gcn_dense(params, x, a):
    """``GCN2`` with bias after propagation: ``A relu(A X W1^T + b1) W2^T + b2``."""
    h = F.relu(a @ (x @ params["lin1.weight"].T) + params["lin1.bias"])
    return a @ (h @ params["lin2.weight"].T) + params["lin2.bias"]


def match_distance(gs: torch.Tensor, gr: torch.Tensor) -> torch.Tensor:
    """GCond's gradient distance for one parameter: ``sum_rows (1 - cos(gs_row, gr_row))`` for
    matrices (rows = output units of ``nn.Linear``), 0 for biases."""
    if gs.dim() == 1:
        return gs.new_zeros(())
    return (1 - (gs * gr).sum(-1) / (gs.norm(dim=-1) * gr.norm(dim=-1) + 1e-6)).sum()


class GCond(L.LightningModule):
    """GCond condensation loop (manual optimization, one training step = one epoch of Alg. 1).

    Args:
        data: the real graph (``torch_geometric`` ``Data`` with ``train_mask``).
        hp: the ``method`` config (reduction_rate, hidden, outer_loop, inner_loop, lr_feat,
            lr_adj, lr_model, adj_epochs/period, pge_hidden, pge_layers).
        seed: RNG seed of the initialization.
    """

    def __init__(self, data, hp, seed: int = 0):
        super().__init__()
        self.automatic_optimization = False
        self.hp = hp
        g = torch.Generator().manual_seed(seed)
        y, train = data.y, data.train_mask.nonzero().squeeze(1)
        k = int(y.max()) + 1
        counts = torch.bincount(y[train], minlength=k)
        n_syn = (counts.float() * hp.reduction_rate).long().clamp(min=1)
        self.y_syn = torch.repeat_interleave(torch.arange(k), n_syn)
        init = torch.cat([train[y[train] == c][torch.randperm(int(counts[c]), generator=g)[: int(n_syn[c])]]
                          for c in range(k)])
        self.feat = nn.Parameter(data.x[init].clone())
        self.pge = PGE(data.x.shape[1], hp.pge_hidden, hp.pge_layers)
        self.model = GCN2(data.x.shape[1], hp.hidden, k)
        self.k, self.coeff = k, (n_syn.float() / n_syn.max()).tolist()
        # receptive field of the training nodes (exact for a 2-layer GCN)
        a = gcn_norm_sparse(data.edge_index, data.num_nodes)
        self.ax = torch.sparse.mm(a, data.x)                     # (N, F): A_hat X, once
        s = torch.unique(torch.cat([train, a.indices()[1][torch.isin(a.indices()[0], train)]]))
        pos = torch.full((data.num_nodes,), -1, dtype=torch.long)
        pos[s] = torch.arange(len(s))
        dense_a = a.to_dense()
        self.a_ts = dense_a[train][:, s]                         # (|T|, |S|)
        self.ax_s = self.ax[s]                                   # (|S|, F)
        self.class_w = torch.stack([(y[train] == c).float() / max(1, int(counts[c])) for c in range(k)])
        self.y_train = y[train]

    def configure_optimizers(self):
        hp = self.hp
        return [torch.optim.Adam([self.feat], lr=hp.lr_feat), torch.optim.Adam(self.pge.parameters(), lr=hp.lr_adj)]

    def _real_grads(self, params):
        def loss(p, w):
            h = F.relu(self.ax_s @ p["lin1.weight"].T + p["lin1.bias"])
            out = self.a_ts @ (h @ p["lin2.weight"].T) + p["lin2.bias"]
            return (F.cross_entropy(out, self.y_train, reduction="none") * w).sum()

        return vmap(grad(loss), in_dims=(None, 0))(params, self.class_w)   # each (k, *shape)

    def training_step(self, batch, batch_idx):
        hp = self.hp
        opt_feat, opt_adj = self.optimizers()
        it = batch_idx  # one batch = one epoch of Alg. 1
        for m in self.model.modules():
            if isinstance(m, nn.Linear):
                m.reset_parameters()
        opt_model = torch.optim.Adam(self.model.parameters(), lr=hp.lr_model)
        update_adj = it % hp.adj_period < hp.adj_epochs
        total = 0.0
        for ol in range(hp.outer_loop):
            params = {n: p.detach() for n, p in self.model.named_parameters()}
            gr = self._real_grads(params)
            adj = self.pge(self.feat)
            a_syn = gcn_norm_dense(adj)

            def syn_loss(p, w):
                out = _gcn_dense(p, self.feat, a_syn)
                return (F.cross_entropy(out, self.y_syn, reduction="none") * w).sum()

            w_syn = torch.stack([(self.y_syn == c).float() / (self.y_syn == c).sum() for c in range(self.k)])
            gs = vmap(grad(syn_loss), in_dims=(None, 0))(params, w_syn)
            loss = sum(self.coeff[c] * sum(match_distance(gs[n][c], gr[n][c]) for n in params) for c in range(self.k))
            opt_feat.zero_grad()
            opt_adj.zero_grad()
            self.manual_backward(loss)
            (opt_adj if update_adj else opt_feat).step()
            total += float(loss.detach())
            if ol == hp.outer_loop - 1:
                break
            with torch.no_grad():
                self.pge.eval()
                a_in = gcn_norm_dense(self.pge(self.feat))
                self.pge.train()
            x_in = self.feat.detach()
            for _ in range(hp.inner_loop):
                opt_model.zero_grad()
                F.cross_entropy(self.model(x_in, a_in), self.y_syn).backward()
                opt_model.step()
        self.log_dict({"condense/match_loss": total / hp.outer_loop, "condense/epoch": float(it)})

    @torch.no_grad()
    def condensed(self) -> CondensedGraph:
        """The current ``(X', A', y')``; ``A'`` from the generator in eval mode."""
        self.pge.eval()
        adj = self.pge(self.feat.detach())
        self.pge.train()
        adj = (adj + adj.T) / 2
        adj.fill_diagonal_(0)
        return CondensedGraph(self.feat.detach().cpu().clone(), adj.cpu(), self.y_syn.clone(), method="gcond",
                              reduction_rate=float(self.hp.reduction_rate))


def condense(data, hp, epochs: int, seed: int = 0, accelerator: str = "cpu") -> tuple[CondensedGraph, float]:
    """Run GCond for ``epochs`` epochs; returns the condensed graph and the seconds taken."""
    from torch.utils.data import DataLoader

    L.seed_everything(seed, verbose=False)
    module = GCond(data, hp, seed)
    t = time.perf_counter()
    trainer = L.Trainer(max_epochs=1, accelerator=accelerator, devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, DataLoader(range(epochs), batch_size=None))
    return module.condensed(), time.perf_counter() - t


__all__ = ["PGE", "GCond", "GCN2", "condense", "functional_call"]
