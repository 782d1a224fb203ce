"""Graph data sets in their original on-disk formats, as :class:`torch_geometric.data.Data`.

* Planetoid (Cora, CiteSeer, PubMed; Yang et al. 2016): the eight raw files
  ``ind.<name>.{x,tx,allx,y,ty,ally,graph,test.index}`` under ``root/<Name>/raw/`` (the layout
  ``torch_geometric.datasets.Planetoid`` reads) or ``root/raw/``; parsed with torch_geometric's
  reader without writing anything next to them. Split: the public Planetoid split (20 labeled
  nodes per class for training, 500 validation, 1000 test).
* GraphSAINT layout (ogbn-arxiv, Flickr, Reddit as distributed by GraphSAINT/GCond):
  ``adj_full.npz`` (scipy CSR adjacency), ``feats.npy`` (N x F), ``class_map.json``
  (node id -> class, or multi-hot list), ``role.json`` (``{"tr": [...], "va": [...], "te": [...]}``).
* Fraud graphs (YelpChi, Amazon; Dou et al. 2020): one ``.mat`` file with ``features`` (N x F,
  sparse), ``label`` (1 x N) and the homogeneous adjacency ``homo``.

Every reader raises :class:`lightning_dd.data.DataNotFoundError` naming the files it expected.
All graphs come back undirected, without self loops, with ``train_mask``/``val_mask``/``test_mask``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from lightning_dd.data.readers import DataNotFoundError

PLANETOID = {"cora": "Cora", "citeseer": "CiteSeer", "pubmed": "PubMed"}
PLANETOID_FILES = ("x", "tx", "allx", "y", "ty", "ally", "graph", "test.index")
SAINT_FILES = ("adj_full.npz", "feats.npy", "class_map.json", "role.json")


def _undirected(edge_index: torch.Tensor, n: int) -> torch.Tensor:
    from torch_geometric.utils import remove_self_loops, to_undirected

    return remove_self_loops(to_undirected(edge_index, num_nodes=n))[0]


def read_planetoid(root: str | Path, name: str):
    """Read Planetoid ``name`` (cora | citeseer | pubmed) from its raw files under ``root``.

    Returns:
        ``Data`` with ``x`` ``(N, F)`` float (row-normalized as stored: Cora's are binary),
        ``y`` ``(N,)``, ``edge_index`` ``(2, E)`` undirected, and the public split masks.

    Raises:
        ValueError: unknown name. DataNotFoundError: a raw file is missing (all expected named).
    """
    key = name.lower()
    if key not in PLANETOID:
        raise ValueError(f"Planetoid name must be one of {sorted(PLANETOID)}, got {name!r}")
    root = Path(root)
    candidates = [root / PLANETOID[key] / "raw", root / "raw", root]
    for raw in candidates:
        if all((raw / f"ind.{key}.{f}").is_file() for f in PLANETOID_FILES):
            break
    else:
        files = ", ".join(f"ind.{key}.{f}" for f in PLANETOID_FILES)
        raise DataNotFoundError(f"{PLANETOID[key]}: raw Planetoid files not found. Expected {{{files}}} in "
                                f"{candidates[0]} (or {candidates[1]}). They are the files of "
                                f"https://github.com/kimiyoung/planetoid (data/); point paths.data_dir or "
                                f"LDD_DATA_DIR at the folder holding planetoid/.")
    from torch_geometric.io import read_planetoid_data

    data = read_planetoid_data(str(raw), key)
    data.edge_index = _undirected(data.edge_index, data.num_nodes)
    data.name = PLANETOID[key]
    return data


def read_graphsaint(root: str | Path, name: str = "graph"):
    """Read a graph in the GraphSAINT layout (see module docstring) from ``root``.

    Multi-label ``class_map`` entries (lists) become a ``(N, C)`` float ``y``; single labels ``(N,)``.

    Raises:
        DataNotFoundError: a file is missing. ValueError: inconsistent sizes.
    """
    import scipy.sparse as sp

    root = Path(root)
    missing = [f for f in SAINT_FILES if not (root / f).is_file()]
    if missing:
        raise DataNotFoundError(f"{name}: GraphSAINT-layout files missing in {root}: {missing} (expected "
                                f"{', '.join(SAINT_FILES)}; e.g. from the GraphSAINT / GCond data release)")
    from torch_geometric.data import Data

    adj = sp.load_npz(root / "adj_full.npz").tocoo()
    x = torch.from_numpy(np.load(root / "feats.npy")).float()
    n = x.shape[0]
    if adj.shape != (n, n):
        raise ValueError(f"{root}: adj_full.npz is {adj.shape}, feats.npy has {n} nodes")
    cmap = json.loads((root / "class_map.json").read_text())
    first = next(iter(cmap.values()))
    if isinstance(first, list):
        y = torch.zeros(n, len(first))
        for k, v in cmap.items():
            y[int(k)] = torch.tensor(v, dtype=torch.float)
    else:
        y = torch.full((n,), -1, dtype=torch.long)
        for k, v in cmap.items():
            y[int(k)] = int(v)
    role = json.loads((root / "role.json").read_text())
    masks = {}
    for key, split in (("tr", "train"), ("va", "val"), ("te", "test")):
        m = torch.zeros(n, dtype=torch.bool)
        m[torch.tensor(role.get(key, []), dtype=torch.long)] = True
        masks[f"{split}_mask"] = m
    ei = torch.from_numpy(np.vstack([adj.row, adj.col])).long()
    return Data(x=x, y=y, edge_index=_undirected(ei, n), name=name, **masks)


def read_fraud_mat(path: str | Path, name: str | None = None, train_frac: float = 0.4, val_frac: float = 0.2,
                   seed: int = 0):
    """Read a YelpChi/Amazon ``.mat`` (``features``, ``label``, ``homo``); stratified random split
    ``train_frac``/``val_frac``/rest (the CARE-GNN protocol uses 40% training).

    Raises:
        DataNotFoundError: no file. ValueError: a key is missing.
    """
    from scipy.io import loadmat

    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"fraud graph file not found: {path} (expected YelpChi.mat or Amazon.mat with keys "
                                f"features, label, homo; from the CARE-GNN data release)")
    m = loadmat(path)
    missing = [k for k in ("features", "label", "homo") if k not in m]
    if missing:
        raise ValueError(f"{path}: keys {missing} missing (found {sorted(k for k in m if not k.startswith('__'))})")
    from torch_geometric.data import Data

    feats = m["features"]
    x = torch.from_numpy(feats.toarray() if hasattr(feats, "toarray") else np.asarray(feats)).float()
    y = torch.from_numpy(np.asarray(m["label"]).reshape(-1).astype(np.int64))
    adj = m["homo"].tocoo()
    ei = torch.from_numpy(np.vstack([adj.row, adj.col])).long()
    n = len(y)
    g = torch.Generator().manual_seed(seed)
    masks = {k: torch.zeros(n, dtype=torch.bool) for k in ("train_mask", "val_mask", "test_mask")}
    for c in y.unique():
        idx = (y == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        a, b = int(train_frac * len(idx)), int((train_frac + val_frac) * len(idx))
        masks["train_mask"][idx[:a]] = True
        masks["val_mask"][idx[a:b]] = True
        masks["test_mask"][idx[b:]] = True
    return Data(x=x, y=y, edge_index=_undirected(ei, n), name=name or path.stem, **masks)


import lightning as L  # noqa: E402

GRAPH_FORMATS = ("planetoid", "graphsaint", "fraud_mat")


class GraphDataModule(L.LightningDataModule):
    """One real graph for condensation (GCond/SGDD), read from its own on-disk format.

    Args:
        name: data set name (``cora``, ``citeseer``, ``pubmed``, ``flickr``, ``yelpchi``, ...).
        format: ``planetoid`` (``root/<Name>/raw/ind.*``) | ``graphsaint`` (``root/<name>/``) |
            ``fraud_mat`` (``root/<Name>.mat``).
        root: the folder holding the data set (``${paths.data_dir}/planetoid`` for Cora).
        normalize_features: row-normalize the features (GCond/SGDD's ``NormalizeFeatures``).
        task: ``node`` (node classification) or ``anomaly`` (fraud graphs: binary, AUC / macro-F1).

    After :meth:`setup`: ``data`` (``torch_geometric.data.Data`` with ``x (N, F)``, ``y (N,)``,
    ``edge_index (2, E)`` undirected and the split masks), ``num_classes``, ``classes``.

    Raises:
        ValueError: unknown ``format``/``task`` or config keys. DataNotFoundError: files missing (named).
    """

    def __init__(self, name: str, format: str = "planetoid", root: str = "data/planetoid",
                 normalize_features: bool = True, task: str = "node", cache_dir: str | None = None, **unknown):
        super().__init__()
        if unknown:
            raise ValueError(f"data config: unknown keys {sorted(unknown)} for GraphDataModule (known: name, format, "
                             f"root, normalize_features, task, cache_dir)")
        if format not in GRAPH_FORMATS:
            raise ValueError(f"data.format must be one of {GRAPH_FORMATS}, got {format!r}")
        if task not in ("node", "anomaly"):
            raise ValueError(f"data.task must be 'node' or 'anomaly', got {task!r}")
        self.name, self.format, self.root, self.task = name, format, Path(root), task
        self.normalize_features = normalize_features
        self.preprocessing = None  # the runner's image logger finds no images on graph methods
        self.data = None

    def setup(self, stage: str | None = None) -> None:
        if self.data is not None:
            return
        if self.format == "planetoid":
            data = read_planetoid(self.root, self.name)
        elif self.format == "graphsaint":
            sub = self.root / self.name
            data = read_graphsaint(sub if sub.is_dir() else self.root, self.name)
        else:
            path = self.root if self.root.suffix == ".mat" else self.root / f"{self.name}.mat"
            data = read_fraud_mat(path, self.name)
        if data.y.dim() != 1:
            raise ValueError(f"{self.name}: multi-label graphs are not supported by node-classification condensation")
        if self.normalize_features:
            s = data.x.sum(1, keepdim=True)
            data.x = data.x / torch.where(s == 0, torch.ones_like(s), s)
        self.data = data
        self.num_classes = int(data.y.max()) + 1
        self.classes = [str(c) for c in range(self.num_classes)]
