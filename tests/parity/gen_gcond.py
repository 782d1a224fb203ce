"""Parity fixture ``fixtures/gcond.pt`` from GCond's code (Jin et al., arXiv 2110.07580;
github.com/ChandlerBang/GCond).

Exercised in the checkout (imported, run, never copied):

* ``utils.py``: ``match_loss`` with ``dis_metric='ours'`` (``distance_wb``), on fixed gradient tensors
  of an SGC layer (weight ``(F, K)``, bias ``(K,)``), one case with a zero column;
* ``models/sgc.py``: ``SGC.initialize`` (``GraphConvolution.reset_parameters``) at a fixed seed;
* ``models/parametrized_adj.py``: ``PGE.forward`` (train mode: batch statistics) on fixed features;
* ``gcond_agent_transduct.py``: ``GCond.train`` on a 16-node graph with ``models/sgc.py``'s ``SGC``
  (``--sgc=1 --nlayers=2``): (a) one outer step (``get_loops`` -> ``(1, 0)``): each class's
  matching distance, the loss, and the gradients of the loss w.r.t. the synthetic features and the
  PGE parameters; (b) ``--epochs 10`` (11 epochs: ``range(epochs + 1)``) with 2 outer x 3 inner
  steps: the synthetic features and PGE parameters at the end (structure updated in epochs 0-9,
  features in epoch 10; the inner loop trains on ``pge.inference``'s adjacency).

Fixed inputs: the graph, the synthetic features (``get_sub_adj_feat`` patched to return them), the
SGC weights (``SGC.initialize`` patched to copy them), PGE built with ``nhid=16``. The real-side
neighbour sampler returns the full neighbourhood; see ``graph_reference_stubs.py`` for what else
is replaced (deeprobust, torch_sparse).

    python tests/parity/gen_gcond.py --reference /tmp/ref/gcond
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import scipy.sparse as sp
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixture_io import add_reference_to_path, save_fixture  # noqa: E402
import graph_reference_stubs as stubs  # noqa: E402

N, F_IN, K, HID = 16, 8, 3, 16


def tiny_graph(seed: int = 0) -> dict:
    """16 nodes, 8 features, 3 classes; 12 training nodes (3 / 4 / 5 per class)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(N, F_IN, generator=g)
    x = x / x.sum(1, keepdim=True)                       # row-normalized, as GCond's data
    y = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 0, 1, 2, 1])
    a = (torch.rand(N, N, generator=g) < 0.25).float().triu(1)
    ring = torch.arange(N)
    a[ring, (ring + 1) % N] = 1                          # connected, no self loops
    a = ((a + a.T) > 0).float()
    a.fill_diagonal_(0)
    train = torch.arange(12)
    return {"x": x, "y": y, "adj": a, "train": train}


def reference_args(**kw) -> SimpleNamespace:
    base = dict(dataset="cora", reduction_rate=0.5, lr_feat=1e-2, lr_adj=1e-2, lr_model=1e-2, epochs=0,
                nlayers=2, hidden=256, dropout=0.0, sgc=1, alpha=0.0, dis_metric="ours", one_step=0,
                debug=0, save=0, inner=0, outer=20)
    base.update(kw)
    return SimpleNamespace(**base)


def run_agent(mod, PGE, graph, feat_syn, w, b, pge_state, args, loops):
    """GCond.train with the fixed inputs; returns the agent and the per-class distances seen."""
    x, y, adj, train = graph["x"].numpy(), graph["y"].numpy(), graph["adj"].numpy(), graph["train"].numpy()
    data = SimpleNamespace(
        feat_train=x[train], feat_full=x, adj_full=sp.csr_matrix(adj), labels_full=y, labels_train=y[train],
        idx_train=train, nclass=K,
        retrieve_class_sampler=stubs.full_neighbourhood_sampler(train, y[train], args.nlayers))
    agent = mod.GCond(data, args, device="cpu")
    agent.pge = PGE(nfeat=F_IN, nnodes=len(feat_syn), nhid=HID, nlayers=3, device="cpu", args=args)
    agent.pge.load_state_dict(pge_state)
    agent.optimizer_pge = torch.optim.Adam(agent.pge.parameters(), lr=args.lr_adj)
    agent.get_sub_adj_feat = lambda features: (feat_syn.clone(), None)

    def init(self):
        self.conv.weight.data.copy_(w)
        self.conv.bias.data.copy_(b)

    mod.SGC.initialize = init
    mod.get_loops = lambda a: loops
    seen = []
    orig = mod.match_loss

    def recording(gs, gr, a, device):
        d = orig(gs, gr, a, device)
        seen.append(float(d))
        return d

    mod.match_loss = recording
    np.random.seed(0)
    agent.train(verbose=False)
    mod.match_loss = orig
    return agent, seen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", required=True, help="checkout of github.com/ChandlerBang/GCond")
    ref = ap.parse_args().reference
    stubs.install()
    add_reference_to_path(ref)
    import gcond_agent_transduct as mod
    from models.parametrized_adj import PGE
    from utils import match_loss

    torch.manual_seed(0)
    cases = {}

    # 1. the gradient distance on fixed gradients: per class, [weight (F, K), bias (K,)]
    gs_w, gr_w = torch.randn(K, F_IN, K), torch.randn(K, F_IN, K)
    gr_w[1, :, 2] = 0                                   # a zero column: the 1e-6 in the denominator
    gs_b, gr_b = torch.randn(K, K), torch.randn(K, K)
    coeff = torch.tensor([1 / 3, 2 / 3, 1.0])
    args = reference_args()
    per_class = torch.stack([match_loss([gs_w[c], gs_b[c]], [gr_w[c], gr_b[c]], args, "cpu") for c in range(K)])
    cases["distance"] = {"gs_w": gs_w, "gr_w": gr_w, "gs_b": gs_b, "gr_b": gr_b, "coeff": coeff,
                         "per_class": per_class, "total": (coeff * per_class).sum()}

    # 1b. the condensation model's initialization (models/sgc.py GraphConvolution.reset_parameters)
    from models.sgc import SGC

    sgc = SGC(nfeat=F_IN, nhid=256, nclass=K, nlayers=2, dropout=0.0, with_bn=False, device="cpu")
    torch.manual_seed(1)
    sgc.initialize()
    cases["sgc_init"] = {"seed": 1, "in_dim": F_IN, "num_classes": K, "w": sgc.conv.weight.detach().clone(),
                         "b": sgc.conv.bias.detach().clone()}
    torch.manual_seed(0)

    # 2. PGE's adjacency on fixed features (train mode, batch statistics) and its initial weights
    graph = tiny_graph()
    n_syn = 6
    feat_syn = torch.rand(n_syn, F_IN) / F_IN
    pge = PGE(nfeat=F_IN, nnodes=n_syn, nhid=HID, nlayers=3, device="cpu", args=args)
    pge_state = {k: v.clone() for k, v in pge.state_dict().items()}
    cases["pge"] = {"feat": feat_syn, "state": pge_state, "adj": pge(feat_syn).detach()}

    # 3. one outer step of GCond.train: per-class distances, the loss, the gradients
    w = torch.empty(F_IN, K).uniform_(-F_IN ** -0.5, F_IN ** -0.5)   # GraphConvolution's init scale
    b = torch.empty(K).uniform_(-F_IN ** -0.5, F_IN ** -0.5)
    agent, seen = run_agent(mod, PGE, graph, feat_syn, w, b, pge_state, args, (1, 0))
    labels_syn = agent.labels_syn.clone()
    coeffs = torch.tensor([agent.num_class_dict[c] / max(agent.num_class_dict.values()) for c in range(K)])
    cases["step"] = {**graph, "feat_syn": feat_syn, "w": w, "b": b, "pge_state": pge_state,
                     "labels_syn": labels_syn, "coeff": coeffs, "per_class": torch.tensor(seen),
                     "loss": (coeffs * torch.tensor(seen)).sum(),
                     "grad_feat": agent.feat_syn.grad.clone(),
                     "grad_pge": {k: p.grad.clone() for k, p in agent.pge.named_parameters()},
                     "lr_feat": args.lr_feat, "lr_adj": args.lr_adj, "lr_model": args.lr_model}

    # 4. 11 epochs (--epochs 10) of 2 outer x 3 inner steps: structure epochs 0-9, a feature epoch 10
    args = reference_args(epochs=10)
    agent, seen = run_agent(mod, PGE, graph, feat_syn, w, b, pge_state, args, (2, 3))
    cases["epochs"] = {"epochs": 11, "outer_loop": 2, "inner_loop": 3, "per_class": torch.tensor(seen).view(11, 2, K),
                       "feat_syn": agent.feat_syn.detach().clone(),
                       "pge": {k: v.clone() for k, v in agent.pge.state_dict().items()}}

    save_fixture("gcond", cases, reference=ref, repo="ChandlerBang/GCond", replaced=(
        "deeprobust.graph.utils (to_tensor, normalize_adj_tensor, tensor2onehot, is_sparse_tensor) and "
        "torch_sparse (SparseTensor, matmul: dense) re-written after their documented behaviour; ogb empty; "
        "the real side's NeighborSampler ([10, 5] fan-outs) replaced by the full neighbourhood (the sampler's "
        "output when fan-outs exceed the degrees); fixed inputs injected by patching get_sub_adj_feat, "
        "SGC.initialize and get_loops; PGE built with nhid=16 (tests/parity/graph_reference_stubs.py)"))


if __name__ == "__main__":
    main()
