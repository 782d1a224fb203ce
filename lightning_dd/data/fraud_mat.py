"""Fraud graphs (YelpChi, Amazon; Dou et al., CIKM 2020, arXiv 2008.08692): one MATLAB ``.mat`` file
with ``features`` (N x F, sparse), ``label`` (1 x N) and the homogeneous adjacency ``homo``, read in a
forked child process (:func:`load_mat`) and split at random per class.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch

from lightning_dd.data.graph_checks import adjacency_edges, check_classes, dense_matrix, numeric_array, undirected
from lightning_dd.data.readers import DataFormatError, DataNotFoundError, numpy_pickle_globals, restricted_unpickle


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
        return cls((data, indices, indptr), shape=shape)  # fully checked later (checked_sparse)
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

    x = torch.from_numpy(dense_matrix(path, m["features"], "'features'")).float()
    n = x.shape[0]
    lab = m["label"]
    if not isinstance(lab, np.ndarray) or lab.ndim > 2:
        raise DataFormatError(f"{path}: 'label' must be a (1, N) or (N,) array, got {type(lab).__name__} "
                              f"{getattr(lab, 'shape', '')}")
    lab = numeric_array(path, lab, "'label'", lab.ndim).reshape(-1)
    if len(lab) != n or (lab != np.round(lab)).any() or (len(lab) and (lab.min() < 0 or lab.max() >= n)):
        raise DataFormatError(f"{path}: 'label' must hold one integer class in [0, N) per node (N = {n} rows of "
                              f"'features'), got {len(lab)} values" + (f" in [{lab.min()}, {lab.max()}]" if len(lab)
                                                                        else ""))
    y = torch.from_numpy(lab.astype(np.int64))
    check_classes(path, np.bincount(lab.astype(np.int64)), "'label'")
    ei = adjacency_edges(path, m["homo"], n)
    g = torch.Generator().manual_seed(seed)
    masks = {k: torch.zeros(n, dtype=torch.bool) for k in ("train_mask", "val_mask", "test_mask")}
    for c in y.unique():
        idx = (y == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        a, b = int(train_frac * len(idx)), int((train_frac + val_frac) * len(idx))
        masks["train_mask"][idx[:a]] = True
        masks["val_mask"][idx[a:b]] = True
        masks["test_mask"][idx[b:]] = True
    return Data(x=x, y=y, edge_index=undirected(ei, n), name=name or path.stem, **masks)


__all__ = ["load_mat", "read_fraud_mat"]
