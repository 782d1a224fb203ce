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

Every reader raises :class:`lightning_dd.data.DataNotFoundError` naming the files it expected, and
:class:`lightning_dd.data.readers.DataFormatError` (a ValueError) naming the file and the problem
when a file is truncated, corrupt, of the wrong dtype or shape, holds NaN/inf, labels out of range
or an empty class; Planetoid's pickles are read with a restricted unpickler (no code can run).
All graphs come back undirected, without self loops, with ``train_mask``/``val_mask``/``test_mask``.
"""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import torch

from lightning_dd.data.readers import DataFormatError, DataNotFoundError, numpy_pickle_globals, restricted_unpickle

PLANETOID = {"cora": "Cora", "citeseer": "CiteSeer", "pubmed": "PubMed"}
PLANETOID_FILES = ("x", "tx", "allx", "y", "ty", "ally", "graph", "test.index")
SAINT_FILES = ("adj_full.npz", "feats.npy", "class_map.json", "role.json")


def _undirected(edge_index: torch.Tensor, n: int) -> torch.Tensor:
    from torch_geometric.utils import remove_self_loops, to_undirected

    return remove_self_loops(to_undirected(edge_index, num_nodes=n))[0]


#: the most values a feature/label matrix may hold densified (PubMed: 19,717 x 500 = 1e7)
MAX_DENSE_VALUES = 2 ** 30


def _numeric(path: Path, a, what: str, ndim: int = 2) -> np.ndarray:
    """``a`` as a finite, native-byte-order int/float ndarray of ``ndim`` dims (``what`` in messages).

    Raises:
        DataFormatError: another type, dtype (bool, complex, object, strings) or shape, NaN/inf, or
            floats beyond the float32 range (the readers' tensors are float32).
    """
    if not isinstance(a, np.ndarray) or a.ndim != ndim or a.dtype == np.bool_ or not (
            np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        got = f"{a.dtype} array of shape {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
        raise DataFormatError(f"{path}: {what} must be a {ndim}-D integer or float array, got a {got}")
    a = a.astype(a.dtype.newbyteorder("="), copy=False)
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise DataFormatError(f"{path}: {what} holds {int((~np.isfinite(a)).sum())} NaN/inf values")
    if a.dtype.kind == "f" and a.size and np.abs(a).max() > np.finfo(np.float32).max:  # read as float32
        raise DataFormatError(f"{path}: {what} holds values up to {np.abs(a).max():.3g}, beyond float32")
    return a


def _checked_sparse(path: Path, m, what: str):
    """A scipy sparse matrix rebuilt from its arrays (a pickled object's other attributes are not
    trusted) and checked by scipy's full format check *before* anything converts it: sparsetools'
    C++ routines (``tocsr``, ``tocoo``, ``toarray``) do not check bounds, so a corrupt file (an index
    out of range, a bad ``indptr``) would crash the process instead of raising.

    Raises:
        DataFormatError: an inconsistent structure, or a format other than CSR/CSC/COO.
    """
    import scipy.sparse as sp

    try:
        shape = tuple(int(v) for v in m.shape)
        if m.format in ("csr", "csc"):
            cls = sp.csr_matrix if m.format == "csr" else sp.csc_matrix
            out = cls((np.asarray(m.data), np.asarray(m.indices), np.asarray(m.indptr)), shape=shape)
            out.check_format(full_check=True)
        elif m.format == "coo":  # the constructor checks the coordinates' bounds
            out = sp.coo_matrix((np.asarray(m.data), (np.asarray(m.row), np.asarray(m.col))), shape=shape)
        else:
            raise ValueError(f"sparse format {m.format!r} is not supported here (csr, csc, coo)")
    except Exception as e:
        raise DataFormatError(f"{path}: {what} is not a valid sparse matrix: {type(e).__name__}: "
                              f"{str(e)[:200]}") from None
    return out


def _matrix(path: Path, obj, what: str) -> np.ndarray:
    """A 2-D numeric matrix from a scipy sparse matrix or an ndarray, densified and checked.

    Raises:
        DataFormatError: an inconsistent sparse matrix (indices out of range, ...), another type,
            more than :data:`MAX_DENSE_VALUES` values, a non-numeric dtype or NaN/inf.
    """
    import scipy.sparse as sp

    if sp.issparse(obj):
        m = _checked_sparse(path, obj, what)
        shape = m.shape
        if shape[0] * shape[1] > MAX_DENSE_VALUES:
            raise DataFormatError(f"{path}: {what} of shape {shape} is larger than {MAX_DENSE_VALUES} values")
        _numeric(path, m.data, f"{what} (its stored values)", 1)
        obj = m.toarray()
    return _numeric(path, obj, what)


def _check_classes(path: Path, counts: np.ndarray, what: str) -> None:
    """Every class ``0..K-1`` has a node and there are at least 2. Raises DataFormatError."""
    empty = np.flatnonzero(counts == 0)
    if len(counts) < 2 or len(empty):
        raise DataFormatError(f"{path}: {what} must cover classes 0..K-1 (K >= 2) with a node each; got K="
                              f"{len(counts)}" + (f", empty classes {empty[:10].tolist()}" if len(empty) else ""))


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
    m = {n: _matrix(f[n], restricted_unpickle(f[n], g, "Planetoid file", "latin1"), n)
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
    _check_classes(f["ally"], np.vstack([m["ally"], m["ty"]]).sum(0), "ally/ty")
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
    data.edge_index = _undirected(data.edge_index, data.num_nodes)
    data.name = PLANETOID[key]
    return data


def _load(path: Path, what: str, fn):
    """``fn()``, with any error but a DataFormatError re-raised as one naming ``path`` and ``what``."""
    try:
        return fn()
    except DataFormatError:
        raise
    except Exception as e:  # zipfile/zlib/json/scipy.io errors, UnicodeDecodeError, MemoryError, ...
        raise DataFormatError(f"{path}: not a readable {what} (truncated or corrupt?): {type(e).__name__}: "
                              f"{str(e)[:200]}") from None


def _edges(path: Path, adj, n: int) -> torch.Tensor:
    """``(2, E)`` edges of an ``(n, n)`` sparse or dense adjacency (every stored entry is an edge).

    Raises:
        DataFormatError: not a matrix, not ``(n, n)``, an inconsistent sparse structure.
    """
    import scipy.sparse as sp

    adj = _checked_sparse(path, adj, "the adjacency") if sp.issparse(adj) else _numeric(path, adj, "adjacency")
    if tuple(adj.shape) != (n, n):
        raise DataFormatError(f"{path}: the adjacency is {tuple(adj.shape)}, expected ({n}, {n}) for the {n} nodes")
    coo = sp.coo_matrix(adj)  # safe: checked above
    return torch.from_numpy(np.vstack([coo.row, coo.col]).astype(np.int64))


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
    cmap = _load(path, "UTF-8 JSON file", lambda: json.loads(path.read_bytes().decode("utf-8")))
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
    _check_classes(path, np.bincount(y.numpy()), "labels")
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
    x = _numeric(fx, _load(fx, "npy file", lambda: np.load(fx, allow_pickle=False)), "features")
    n = x.shape[0]
    if n == 0:
        raise DataFormatError(f"{fx}: no nodes")
    ei = _edges(fa, _load(fa, "scipy sparse npz file", lambda: sp.load_npz(fa)), n)
    y = _class_map(root / "class_map.json", n)
    role = _load(fr, "UTF-8 JSON file", lambda: json.loads(fr.read_bytes().decode("utf-8")))
    if not isinstance(role, dict) or not role.get("tr"):
        raise DataFormatError(f"{fr}: expected a JSON object with a non-empty 'tr' list (and 'va', 'te')")
    masks = {}
    for key, split in (("tr", "train"), ("va", "val"), ("te", "test")):
        m = torch.zeros(n, dtype=torch.bool)
        m[_node_ids(fr, role.get(key, []), n, repr(key))] = True
        masks[f"{split}_mask"] = m
    return Data(x=torch.from_numpy(x).float(), y=y, edge_index=_undirected(ei, n), name=name, **masks)


def _mat_payload(v):
    """A loadmat value as plain data the parent process can receive: numeric/char ndarrays, the
    arrays of a sparse matrix, or a description of anything else (cells, structs, objects)."""
    import scipy.sparse as sp

    if sp.issparse(v) and v.format in ("csc", "csr"):
        return ("sparse", v.format, np.asarray(v.data), np.asarray(v.indices), np.asarray(v.indptr), tuple(v.shape))
    if isinstance(v, np.ndarray) and v.dtype.kind in "biufcUS":
        return ("array", v)
    return ("other", f"{type(v).__name__} {getattr(v, 'dtype', '')} {getattr(v, 'shape', '')}".strip())


def _mat_value(payload):
    import scipy.sparse as sp

    kind = payload[0]
    if kind == "sparse":
        _, fmt, data, indices, indptr, shape = payload
        cls = sp.csc_matrix if fmt == "csc" else sp.csr_matrix
        return cls((data, indices, indptr), shape=shape)  # fully checked later (_checked_sparse)
    return payload[1] if kind == "array" else f"<{payload[1]}>"


def _loadmat_payload(path: Path) -> tuple:
    try:
        from scipy.io import loadmat

        return "ok", {k: _mat_payload(v) for k, v in loadmat(path).items() if not k.startswith("__")}
    except Exception as e:  # noqa: BLE001 - reported to the caller
        return "error", f"{type(e).__name__}: {str(e)[:200]}"


def load_mat(path: Path) -> dict:
    """``scipy.io.loadmat(path)`` run in a forked child process (where ``os.fork`` exists): scipy's
    MAT-v5 reader (1.17) crashes the process with a segmentation fault on some corrupt files (found
    by tests/test_fuzz_readers.py: one byte of a variable-name length changed), which no ``except``
    can catch. The child pickles back numeric/char arrays and the arrays of sparse matrices (read
    here with a restricted unpickler); cells, structs and objects come back as ``"<description>"``
    strings (the readers need none of them). Costs one fork (~30 ms of CPU) per file.

    Raises:
        DataFormatError: loadmat raised, or the child died (the message names ``path``).
    """
    if not hasattr(os, "fork"):  # Windows: read in this process
        status, payload = _loadmat_payload(path)
    else:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns into the caller's code
            try:
                os.close(r)
                with os.fdopen(w, "wb") as fh:
                    fh.write(pickle.dumps(_loadmat_payload(path), protocol=4))
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r, "rb") as fh:
            data = fh.read()
        _, wait_status = os.waitpid(pid, 0)
        if not data:
            raise DataFormatError(f"{path}: not a readable MATLAB .mat file: scipy.io.loadmat crashed reading it "
                                  f"(wait status {wait_status}; corrupt or truncated file)")
        status, payload = restricted_unpickle(path, numpy_pickle_globals(), "loadmat result", data=data)
    if status != "ok":
        raise DataFormatError(f"{path}: not a readable MATLAB .mat file (truncated or corrupt?): {payload}")
    return {k: _mat_value(v) for k, v in payload.items()}


def read_fraud_mat(path: str | Path, name: str | None = None, train_frac: float = 0.4, val_frac: float = 0.2,
                   seed: int = 0):
    """Read a YelpChi/Amazon ``.mat`` (``features``, ``label``, ``homo``); stratified random split
    ``train_frac``/``val_frac``/rest (the CARE-GNN protocol uses 40% training).

    Raises:
        DataNotFoundError: no file. DataFormatError (a ValueError): naming the file: not a readable
            MATLAB file, a key missing, ``features`` not a finite 2-D numeric matrix, ``label`` not
            one integer class per node (classes ``0..K-1``, K >= 2, each with a node), ``homo`` not
            an ``(N, N)`` matrix.
    """
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"fraud graph file not found: {path} (expected YelpChi.mat or Amazon.mat with keys "
                                f"features, label, homo; from the CARE-GNN data release)")
    m = load_mat(path)
    missing = [k for k in ("features", "label", "homo") if k not in m]
    if missing:
        found = sorted(k for k in m if not k.startswith("__"))
        raise DataFormatError(f"{path}: keys {missing} missing (found {found})")
    from torch_geometric.data import Data

    x = torch.from_numpy(_matrix(path, m["features"], "'features'")).float()
    n = x.shape[0]
    lab = m["label"]
    if not isinstance(lab, np.ndarray) or lab.ndim > 2:
        raise DataFormatError(f"{path}: 'label' must be a (1, N) or (N,) array, got {type(lab).__name__} "
                              f"{getattr(lab, 'shape', '')}")
    lab = _numeric(path, lab, "'label'", lab.ndim).reshape(-1)
    if len(lab) != n or (lab != np.round(lab)).any() or (len(lab) and (lab.min() < 0 or lab.max() >= n)):
        raise DataFormatError(f"{path}: 'label' must hold one integer class in [0, N) per node (N = {n} rows of "
                              f"'features'), got {len(lab)} values" + (f" in [{lab.min()}, {lab.max()}]" if len(lab)
                                                                        else ""))
    y = torch.from_numpy(lab.astype(np.int64))
    _check_classes(path, np.bincount(lab.astype(np.int64)), "'label'")
    ei = _edges(path, m["homo"], n)
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
