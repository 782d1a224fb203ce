"""Planetoid (Cora, CiteSeer, PubMed; Yang et al., ICML 2016, arXiv 1603.08861): the eight raw files
``ind.<name>.{x,tx,allx,y,ty,ally,graph,test.index}`` under ``root/<Name>/raw/`` (the layout
``torch_geometric.datasets.Planetoid`` reads) or ``root/raw/``, parsed as torch_geometric's reader
does without writing anything next to them, with a restricted unpickler (no code can run). Split:
the public Planetoid split (20 labeled nodes per class for training, 500 validation, 1000 test).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lightning_dd.data.graph_checks import check_classes, dense_matrix, undirected
from lightning_dd.data.readers import DataFormatError, DataNotFoundError, numpy_pickle_globals, restricted_unpickle

PLANETOID = {"cora": "Cora", "citeseer": "CiteSeer", "pubmed": "PubMed"}
PLANETOID_FILES = ("x", "tx", "allx", "y", "ty", "ally", "graph", "test.index")


def _planetoid_globals() -> dict:
    import collections

    import scipy.sparse as sp

    g = numpy_pickle_globals()
    for mod in ("scipy.sparse.csr", "scipy.sparse._csr", "scipy.sparse"):
        g[(mod, "csr_matrix")] = sp.csr_matrix
    g[("collections", "defaultdict")] = collections.defaultdict
    g[("__builtin__", "list")] = g[("builtins", "list")] = list
    return g


def _planetoid_edges(path: Path, graph, n: int) -> torch.Tensor:
    """The ``graph`` dict (node -> neighbour list) as torch_geometric's ``edge_index_from_dict``
    builds it, after checking every id is an int in ``[0, n)``. Raises DataFormatError."""
    from torch_geometric.io.planetoid import edge_index_from_dict

    if not isinstance(graph, dict):
        raise DataFormatError(f"{path}: expected a dict node -> neighbour list, got {type(graph).__name__}")
    clean = {}
    for k, v in graph.items():
        if not isinstance(v, (list, tuple)) or not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool)
                                                       for i in (k, *v)):
            raise DataFormatError(f"{path}: node {k!r}: expected an int node id -> a list of int node ids, "
                                  f"got {type(v).__name__} {str(v)[:80]}")
        bad = [int(i) for i in (k, *v) if not 0 <= int(i) < n]
        if bad:
            raise DataFormatError(f"{path}: node ids must lie in [0, {n}), got {bad[:5]} (node {k})")
        clean[int(k)] = [int(i) for i in v]
    return edge_index_from_dict(clean, num_nodes=n)


def _test_index(path: Path) -> np.ndarray:
    """``ind.<name>.test.index``: one int per line. Raises DataFormatError."""
    try:
        a = np.array([int(t) for t in path.read_bytes().decode("ascii").split()], dtype=np.int64)
    except (UnicodeDecodeError, ValueError, OverflowError) as e:
        raise DataFormatError(f"{path}: expected one integer node index per line: {type(e).__name__}: "
                              f"{str(e)[:120]}") from None
    if len(a) == 0 or len(np.unique(a)) != len(a):
        raise DataFormatError(f"{path}: expected distinct node indices, got {len(a)} with "
                              f"{len(a) - len(np.unique(a))} repeated")
    return a


def read_planetoid_files(raw: Path, key: str):
    """The eight raw files ``raw/ind.<key>.*`` as torch_geometric's ``read_planetoid_data`` reads
    them (same tensors), but unpickled with a restricted unpickler (numpy arrays, scipy CSR
    matrices, dicts and lists only: a crafted file cannot run code) and validated first.

    Raises:
        DataFormatError: naming the file: unsafe/truncated/corrupt pickle, not a numeric matrix,
            NaN/inf, sizes that disagree (x/y, allx/ally, tx/ty, test.index), labels not one-hot
            0/1 rows, a class without nodes, test indices not the nodes after ``allx``, fewer than
            ``len(y) + 500`` nodes in ``allx`` (the public split's validation nodes), graph node ids
            out of range.
    """
    from torch_geometric.utils import index_to_mask

    f = {n: raw / f"ind.{key}.{n}" for n in PLANETOID_FILES}
    g = _planetoid_globals()
    m = {n: dense_matrix(f[n], restricted_unpickle(f[n], g, "Planetoid file", "latin1"), n)
         for n in ("x", "tx", "allx", "y", "ty", "ally")}
    for a, b in (("x", "y"), ("allx", "ally"), ("tx", "ty")):
        if len(m[a]) != len(m[b]):
            raise DataFormatError(f"{f[b]}: {len(m[b])} label rows, but {f[a].name} has {len(m[a])} rows")
    for trio in (("x", "tx", "allx"), ("y", "ty", "ally")):
        widths = {n: m[n].shape[1] for n in trio}
        if len(set(widths.values())) != 1:
            raise DataFormatError(f"{raw}: {' / '.join(f[n].name for n in trio)} have different widths {widths}")
    for n in ("y", "ty", "ally"):
        if not (np.isin(m[n], (0, 1)).all() and (m[n].sum(1) <= 1).all()):
            raise DataFormatError(f"{f[n]}: labels must be one-hot rows of 0/1 (at most one 1 per row)")
    check_classes(f["ally"], np.vstack([m["ally"], m["ty"]]).sum(0), "ally/ty")
    test_index = _test_index(f["test.index"])
    n_all, n_test = len(m["allx"]), len(m["tx"])
    span = int(test_index.max()) - n_all + 1 if key == "citeseer" else n_test  # CiteSeer: isolated test nodes
    if len(test_index) != n_test or int(test_index.min()) != n_all or int(test_index.max()) != n_all + span - 1:
        end = "" if key == "citeseer" else f" and ending at {n_all + n_test - 1}"
        raise DataFormatError(f"{f['test.index']}: expected {n_test} indices (one per row of {f['tx'].name}) starting "
                              f"at {n_all} (after the rows of {f['allx'].name}){end}, got {len(test_index)} in "
                              f"[{test_index.min()}, {test_index.max()}]")
    n_lab = len(m["y"])
    if n_lab + 500 > n_all:
        raise DataFormatError(f"{f['allx']}: {n_all} rows, but the public split needs the {n_lab} labeled training "
                              f"nodes of {f['y'].name} plus 500 validation nodes")
    tx, ty = (torch.from_numpy(m[n]).to(torch.float) for n in ("tx", "ty"))
    ti = torch.from_numpy(test_index)
    st = ti.sort()[0]
    if key == "citeseer":  # as torch_geometric: zero rows for the isolated test nodes
        tx_ext, ty_ext = torch.zeros(span, tx.size(1)), torch.zeros(span, ty.size(1))
        tx_ext[st - st.min()], ty_ext[st - st.min()] = tx, ty
        tx, ty = tx_ext, ty_ext
    x = torch.cat([torch.from_numpy(m["allx"]).to(torch.float), tx])
    x[ti] = x[st]
    y = torch.cat([torch.from_numpy(m["ally"]).to(torch.float), ty]).max(dim=1)[1]
    y[ti] = y[st]
    n = len(y)
    graph = restricted_unpickle(f["graph"], g, "Planetoid graph", "latin1")
    from torch_geometric.data import Data

    return Data(x=x, y=y, edge_index=_planetoid_edges(f["graph"], graph, n),
                train_mask=index_to_mask(torch.arange(n_lab), n),
                val_mask=index_to_mask(torch.arange(n_lab, n_lab + 500), n), test_mask=index_to_mask(ti, n))


def read_planetoid(root: str | Path, name: str):
    """Read Planetoid ``name`` (cora | citeseer | pubmed) from its raw files under ``root``.

    Returns:
        ``Data`` with ``x`` ``(N, F)`` float (row-normalized as stored: Cora's are binary),
        ``y`` ``(N,)``, ``edge_index`` ``(2, E)`` undirected, and the public split masks.

    Raises:
        ValueError: unknown name. DataNotFoundError: a raw file is missing (all expected named).
        DataFormatError: a malformed file (:func:`read_planetoid_files`).
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
    data = read_planetoid_files(raw, key)
    data.edge_index = undirected(data.edge_index, data.num_nodes)
    data.name = PLANETOID[key]
    return data


__all__ = ["PLANETOID", "PLANETOID_FILES", "read_planetoid", "read_planetoid_files"]
