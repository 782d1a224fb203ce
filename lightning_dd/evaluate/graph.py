"""Node-classification evaluation of a condensed graph (GCond, arXiv 2110.07580, Sec. 5; SGDD,
arXiv 2310.09192): train a fresh GNN on the condensed graph ``(X', A', y')``, select the epoch by
accuracy on the real graph's validation nodes, report accuracy on its test nodes; several seeds,
mean ± std, across architectures.
"""
from __future__ import annotations

import time

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lightning_dd.evaluate.student import EvalResult
from lightning_dd.nets.gnn import GNN, dense_to_edges
from lightning_dd.quiet import quiet_lightning
from lightning_dd.results import CondensedGraph


class GraphStudentModule(L.LightningModule):
    """Full-batch training of ``net`` on a condensed graph; after each epoch (step), accuracy on
    the real graph's val/test nodes; keeps the test accuracy at the best val accuracy.

    Args:
        net: a fresh :class:`GNN`. cond: the condensed graph. real: the real graph
            (``torch_geometric.data.Data`` with masks). lr, weight_decay: Adam settings.
        eval_every: evaluate on the real graph every this many steps.
    """

    def __init__(self, net: GNN, cond: CondensedGraph, real, lr: float = 0.01, weight_decay: float = 5e-4,
                 eval_every: int = 1):
        super().__init__()
        self.net, self.cond, self.real, self.lr, self.weight_decay = net, cond, real, lr, weight_decay
        self.eval_every = eval_every
        self.best_val, self.test_at_best = -1.0, 0.0

    def training_step(self, batch, batch_idx):
        ei, w = dense_to_edges(self.cond.adj.to(self.device))
        out = self.net(self.cond.x.to(self.device), ei, w)
        loss = F.cross_entropy(out, self.cond.y.to(self.device))
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if (self.global_step % self.eval_every) and self.global_step != self.trainer.max_steps:
            return
        self.net.eval()
        with torch.no_grad():
            r = self.real
            pred = self.net(r.x.to(self.device), r.edge_index.to(self.device)).argmax(1).cpu()
            val = (pred[r.val_mask] == r.y[r.val_mask]).float().mean().item()
            test = (pred[r.test_mask] == r.y[r.test_mask]).float().mean().item()
        self.net.train()
        if val > self.best_val:
            self.best_val, self.test_at_best = val, test

    def configure_optimizers(self):
        return torch.optim.Adam(self.net.parameters(), lr=self.lr, weight_decay=self.weight_decay)


def evaluate_graph(cond: CondensedGraph, real, arch: str = "GCN", epochs: int = 600, num_eval: int = 5,
                   seed: int = 0, hidden: int = 256, dropout: float = 0.5, lr: float = 0.01,
                   weight_decay: float = 5e-4, eval_every: int = 1, accelerator: str = "auto") -> EvalResult:
    """Test accuracy (at the best real-validation epoch) of ``num_eval`` fresh ``arch`` networks
    trained on ``cond``; seeds ``seed .. seed+num_eval-1``.

    Raises:
        ValueError: feature or class counts of ``cond`` and ``real`` differ; invalid ``cond``.
    """
    cond.validate()
    if cond.x.shape[1] != real.x.shape[1]:
        raise ValueError(f"condensed features have {cond.x.shape[1]} dims, the real graph {real.x.shape[1]}")
    k = int(real.y.max()) + 1
    if int(cond.y.max()) >= k:
        raise ValueError(f"condensed labels reach {int(cond.y.max())}, the real graph has {k} classes")
    quiet_lightning()
    accs, t0 = [], time.perf_counter()
    for r in range(num_eval):
        L.seed_everything(seed + r, verbose=False)
        net = GNN(arch, real.x.shape[1], k, hidden=hidden, dropout=dropout)
        module = GraphStudentModule(net, cond, real, lr, weight_decay, eval_every)
        trainer = L.Trainer(max_steps=epochs, max_epochs=-1, accelerator=accelerator, devices=1, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            num_sanity_val_steps=0)
        trainer.fit(module, DataLoader(range(epochs), batch_size=None))
        accs.append(module.test_at_best)
    return EvalResult(arch, accs, time.perf_counter() - t0)


def full_graph_condensed(real) -> CondensedGraph:
    """The whole real graph as a 'condensed' graph restricted to nothing: used as the full-data
    reference only through :func:`evaluate_graph` on small graphs (dense adjacency)."""
    n = real.num_nodes
    adj = torch.zeros(n, n)
    adj[real.edge_index[0], real.edge_index[1]] = 1.0
    return CondensedGraph(real.x, adj, real.y, method="full", reduction_rate=1.0)


__all__ = ["GraphStudentModule", "evaluate_graph", "full_graph_condensed", "np"]
