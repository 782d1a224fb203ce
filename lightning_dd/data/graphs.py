"""Graph data sets in their original on-disk formats, as :class:`torch_geometric.data.Data`, served by
:class:`GraphDataModule` (a :class:`lightning_dd.data.protocols.GraphData`). One reader module per format:

* :mod:`lightning_dd.data.planetoid` -- Planetoid (Cora, CiteSeer, PubMed; arXiv 1603.08861): the raw
  files ``ind.<name>.*`` under ``root/<Name>/raw/``, the public split.
* :mod:`lightning_dd.data.graphsaint` -- the GraphSAINT layout (ogbn-arxiv, Flickr, Reddit as
  GraphSAINT / GCond distribute them): ``adj_full.npz``, ``feats.npy``, ``class_map.json``, ``role.json``
  under ``root/<name>/``.
* :mod:`lightning_dd.data.fraud_mat` -- fraud graphs (YelpChi, Amazon; arXiv 2008.08692): one ``.mat``
  file with ``features``, ``label`` and the homogeneous adjacency ``homo``; a random per-class split.

Every reader raises :class:`lightning_dd.data.DataNotFoundError` naming the files it expected, and
:class:`lightning_dd.data.readers.DataFormatError` (a ValueError) naming the file and the problem
when a file is truncated, corrupt, of the wrong dtype or shape, holds NaN/inf, labels out of range
or an empty class; Planetoid's pickles are read with a restricted unpickler (no code can run).
All graphs come back undirected, without self loops, with ``train_mask``/``val_mask``/``test_mask``.
"""
from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from lightning_dd.data.fraud_mat import read_fraud_mat
from lightning_dd.data.graphsaint import read_graphsaint
from lightning_dd.data.planetoid import read_planetoid, read_planetoid_files

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


__all__ = ["GRAPH_FORMATS", "GraphDataModule", "read_fraud_mat", "read_graphsaint", "read_planetoid",
           "read_planetoid_files"]
