"""Stand-ins for the packages GCond's and SGDD's code (arXiv 2110.07580, 2310.09192) import but that
are not installed here, so that ``gen_gcond.py`` / ``gen_sgdd.py`` can import the authors' modules.

What is replaced (each generator writes this into its fixture's ``meta.replaced``):

* ``deeprobust.graph.utils``: the four helpers the agents call, re-written from deeprobust 0.2's
  documented behaviour: ``to_tensor`` (numpy / scipy -> torch, positional), ``is_sparse_tensor``,
  ``normalize_adj_tensor`` (dense: ``D^-1/2 (A + I) D^-1/2`` with ``inf -> 0``; sparse: ``I`` added when
  ``A[0, 0] == 0``, then the same normalization) and ``tensor2onehot``. The rest of deeprobust, ``ogb``,
  ``torchmeta`` and, when not installed, ``pandas`` / ``networkx`` / ``matplotlib`` (SGDD's
  ``utils_copt.py`` plotting) are empty modules (imported at module level, never called here).
* ``torch_sparse``: ``SparseTensor`` holding a dense matrix (``t()``, ``to_dense()``, ``size()``) and
  ``matmul`` as a dense product -- the same numbers as the sparse kernels up to summation order.
* ``torch_geometric.data.NeighborSampler`` (gone from PyG 2.x): a placeholder; the generators give
  the agents a ``retrieve_class_sampler`` that returns the *full* neighbourhood (what PyG's sampler
  returns when its fan-outs exceed the largest degree), see :func:`full_neighbourhood_sampler`.
* ``torch.symeig`` (torch 2 keeps the name, raising an error): ``torch.linalg.eigh(A, UPLO='U')`` -- ``symeig``'s default
  ``upper=True``, the same eigenpairs.
"""
from __future__ import annotations

import sys
import types

import numpy as np
import scipy.sparse as sp
import torch


class _Empty(types.ModuleType):
    """A module whose every attribute is a harmless placeholder class."""

    __all__: list[str] = []

    def __init__(self, name):
        import importlib.machinery

        super().__init__(name)
        self.__spec__ = importlib.machinery.ModuleSpec(name, None)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {"__init__": lambda self, *a, **k: None})


class SparseTensor:
    """``torch_sparse.SparseTensor`` on a dense matrix."""

    def __init__(self, row=None, col=None, value=None, sparse_sizes=None, dense=None):
        if dense is None:
            dense = torch.zeros(*sparse_sizes, dtype=value.dtype)
            dense.index_put_((row, col), value, accumulate=True)
        self.dense = dense

    def t(self):
        return SparseTensor(dense=self.dense.T.contiguous())

    def to_dense(self):
        return self.dense

    def size(self, dim=None):
        return self.dense.size() if dim is None else self.dense.size(dim)

    def to(self, *a, **k):
        return self

    def __getitem__(self, idx):
        return SparseTensor(dense=self.dense[idx])


def _matmul(a, x):
    return (a.dense if isinstance(a, SparseTensor) else a) @ x


def _to_tensor(a, b, labels=None, device="cpu"):
    def conv(m):
        if sp.issparse(m):
            m = m.tocoo()
            idx = torch.from_numpy(np.vstack([m.row, m.col]).astype(np.int64))
            return torch.sparse_coo_tensor(idx, torch.from_numpy(m.data).float(), m.shape).coalesce()
        return torch.FloatTensor(np.array(m))
    out = (conv(a), conv(b))
    return out if labels is None else (*out, torch.LongTensor(labels))


def _normalize_adj_tensor(adj, sparse=False):
    if sparse:
        mx = adj.to_dense()
        if mx[0, 0] == 0:
            mx = mx + torch.eye(mx.shape[0])
        r = mx.sum(1).pow(-0.5)
        r[torch.isinf(r)] = 0.0
        return (r[:, None] * mx * r[None, :]).to_sparse().coalesce()
    mx = adj + torch.eye(adj.shape[0])
    r = mx.sum(1).pow(-0.5).flatten()
    r[torch.isinf(r)] = 0.0
    d = torch.diag(r)
    return d @ mx @ d


def _tensor2onehot(labels):
    return torch.eye(int(labels.max()) + 1)[labels]


def install() -> None:
    """Register the stand-ins in ``sys.modules`` (idempotent)."""
    for name in ("deeprobust", "deeprobust.graph", "deeprobust.graph.data", "ogb", "ogb.nodeproppred",
                 "torchmeta", "torchmeta.modules", "torchmeta.modules.utils"):
        sys.modules.setdefault(name, _Empty(name))
    import importlib.util

    for name in ("pandas", "networkx", "matplotlib", "matplotlib.pyplot"):  # utils_copt.py's plotting imports
        if name not in sys.modules and importlib.util.find_spec(name.split(".")[0]) is None:
            sys.modules[name] = _Empty(name)
    du = _Empty("deeprobust.graph.utils")
    du.to_tensor, du.normalize_adj_tensor, du.tensor2onehot = _to_tensor, _normalize_adj_tensor, _tensor2onehot
    du.is_sparse_tensor = lambda t: t.layout == torch.sparse_coo
    du.__all__ = ["to_tensor", "normalize_adj_tensor", "tensor2onehot", "is_sparse_tensor"]
    sys.modules["deeprobust.graph.utils"] = du
    for name in ("deeprobust.graph", "deeprobust.graph.data", "deeprobust.graph.utils", "ogb.nodeproppred",
                 "torchmeta.modules", "torchmeta.modules.utils"):
        parent, _, child = name.rpartition(".")
        setattr(sys.modules[parent], child, sys.modules[name])
    ts = types.ModuleType("torch_sparse")
    ts.SparseTensor, ts.matmul = SparseTensor, _matmul
    ts.tensor = types.SimpleNamespace(SparseTensor=SparseTensor)
    sys.modules["torch_sparse"] = ts
    import torch_geometric.data as pyg_data
    import torch_geometric.utils as pyg_utils

    if not hasattr(pyg_data, "NeighborSampler"):
        pyg_data.NeighborSampler = type("NeighborSampler", (), {})
    if not hasattr(pyg_utils, "train_test_split_edges"):
        pyg_utils.train_test_split_edges = None
    torch.symeig = lambda a, eigenvectors=True: torch.linalg.eigh(a, UPLO="U")  # torch 2: raises


class _Hop(tuple):
    def to(self, *a, **k):
        return self


def full_neighbourhood_sampler(idx_train: np.ndarray, labels_train: np.ndarray, nlayers: int):
    """A ``retrieve_class_sampler(c, adj, transductive, num, args)`` for the agents: the class's
    training nodes (GCond's order: ``np.random.permutation`` of them, ``[:num]``) with every node of
    the graph as neighbours, ``nlayers`` hops -- ``(batch_size, n_id, adjs)`` as PyG's sampler
    returns them, each hop ``(adj_t, None, size)``."""
    def sample(c, adj, transductive=True, num=256, args=None):
        a = adj.to_dense()
        batch = np.random.permutation(idx_train[labels_train == c])[:num]
        rest = np.setdiff1d(np.arange(a.shape[0]), batch)
        n_id = torch.from_numpy(np.concatenate([batch, rest]).astype(np.int64))
        a = a[n_id][:, n_id]
        hops = [_Hop((a, None, (len(n_id), len(n_id)))) for _ in range(nlayers - 1)]
        hops.append(_Hop((a[: len(batch)], None, (len(n_id), len(batch)))))
        return len(batch), n_id, hops
    return sample
