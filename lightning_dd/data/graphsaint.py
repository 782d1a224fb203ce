"""The GraphSAINT layout (ogbn-arxiv, Flickr, Reddit as distributed by GraphSAINT, Zeng et al., ICLR
2020, arXiv 1907.04931, and GCond): ``adj_full.npz`` (scipy CSR adjacency), ``feats.npy`` (N x F),
``class_map.json`` (node id -> class, or multi-hot list), ``role.json``
(``{"tr": [...], "va": [...], "te": [...]}``).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from lightning_dd.data.graph_checks import adjacency_edges, check_classes, numeric_array, read_or_raise, undirected
from lightning_dd.data.readers import DataFormatError, DataNotFoundError

SAINT_FILES = ("adj_full.npz", "feats.npy", "class_map.json", "role.json")


def _node_ids(path: Path, ids, n: int, what: str) -> torch.Tensor:
    """Int node ids in ``[0, n)``. Raises DataFormatError naming ``what``."""
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise DataFormatError(f"{path}: {what} must be a list of int node ids, got {str(ids)[:80]}")
    bad = [i for i in ids if not 0 <= i < n]
    if bad:
        raise DataFormatError(f"{path}: {what}: node ids out of range [0, {n}): {bad[:5]}")
    return torch.tensor(ids, dtype=torch.long)


def _class_map(path: Path, n: int) -> torch.Tensor:
    """GraphSAINT's ``class_map.json``: every node id ``"0".."n-1"`` -> a class index (``(n,)``
    int64, classes ``0..K-1`` each non-empty) or a 0/1 multi-hot list of one length (``(n, C)``).

    Raises:
        DataFormatError: not a JSON dict, ids not ``0..n-1`` each once, mixed or invalid labels.
    """
    cmap = read_or_raise(path, "UTF-8 JSON file", lambda: json.loads(path.read_bytes().decode("utf-8")))
    if not isinstance(cmap, dict) or not cmap:
        raise DataFormatError(f"{path}: expected a JSON object node id -> class, got {type(cmap).__name__}")
    try:
        ids = sorted(int(k) for k in cmap)
    except ValueError as e:
        raise DataFormatError(f"{path}: node ids must be integers: {e}") from None
    if ids != list(range(n)):
        raise DataFormatError(f"{path}: expected a label for each node id 0..{n - 1} (feats.npy rows), got "
                              f"{len(ids)} ids in [{ids[0]}, {ids[-1]}]")
    vals = [cmap[k] for k in sorted(cmap, key=int)]
    if isinstance(vals[0], list):
        width = len(vals[0])
        if width == 0 or not all(isinstance(v, list) and len(v) == width and
                                 all(type(b) is int and b in (0, 1) for b in v) for v in vals):
            raise DataFormatError(f"{path}: multi-label entries must be 0/1 lists of one length ({width})")
        return torch.tensor(vals, dtype=torch.float)
    bad = [v for v in vals if type(v) is not int or v < 0]
    if bad:
        raise DataFormatError(f"{path}: labels must be class indices >= 0 (or 0/1 lists), got e.g. {bad[0]!r}")
    y = torch.tensor(vals, dtype=torch.long)
    check_classes(path, np.bincount(y.numpy()), "labels")
    return y


def read_graphsaint(root: str | Path, name: str = "graph"):
    """Read a graph in the GraphSAINT layout (see module docstring) from ``root``.

    Multi-label ``class_map`` entries (lists) become a ``(N, C)`` float ``y``; single labels ``(N,)``.

    Raises:
        DataNotFoundError: a file is missing. DataFormatError (a ValueError): naming the file:
            unreadable npz/npy/JSON, features not a finite 2-D numeric array, adjacency not
            ``(N, N)``, a node without a label, labels out of range or an empty class, split ids
            out of range, no training nodes.
    """
    import scipy.sparse as sp

    root = Path(root)
    missing = [f for f in SAINT_FILES if not (root / f).is_file()]
    if missing:
        raise DataNotFoundError(f"{name}: GraphSAINT-layout files missing in {root}: {missing} (expected "
                                f"{', '.join(SAINT_FILES)}; e.g. from the GraphSAINT / GCond data release)")
    from torch_geometric.data import Data

    fx, fa, fr = root / "feats.npy", root / "adj_full.npz", root / "role.json"
    x = numeric_array(fx, read_or_raise(fx, "npy file", lambda: np.load(fx, allow_pickle=False)), "features")
    n = x.shape[0]
    if n == 0:
        raise DataFormatError(f"{fx}: no nodes")
    ei = adjacency_edges(fa, read_or_raise(fa, "scipy sparse npz file", lambda: sp.load_npz(fa)), n)
    y = _class_map(root / "class_map.json", n)
    role = read_or_raise(fr, "UTF-8 JSON file", lambda: json.loads(fr.read_bytes().decode("utf-8")))
    if not isinstance(role, dict) or not role.get("tr"):
        raise DataFormatError(f"{fr}: expected a JSON object with a non-empty 'tr' list (and 'va', 'te')")
    masks = {}
    for key, split in (("tr", "train"), ("va", "val"), ("te", "test")):
        m = torch.zeros(n, dtype=torch.bool)
        m[_node_ids(fr, role.get(key, []), n, repr(key))] = True
        masks[f"{split}_mask"] = m
    return Data(x=torch.from_numpy(x).float(), y=y, edge_index=undirected(ei, n), name=name, **masks)


__all__ = ["SAINT_FILES", "read_graphsaint"]
