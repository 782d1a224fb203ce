"""Checks shared by the graph readers (:mod:`lightning_dd.data.planetoid`,
:mod:`lightning_dd.data.graphsaint`, :mod:`lightning_dd.data.fraud_mat`): a value read from a file
becomes a finite numeric array, a scipy sparse matrix is rebuilt and fully checked before scipy's C++
routines touch it, labels cover their classes, an adjacency becomes undirected ``edge_index``. Each
raises :class:`lightning_dd.data.readers.DataFormatError` naming the file and the problem.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lightning_dd.data.readers import DataFormatError

#: the most values a feature/label matrix may hold densified (PubMed: 19,717 x 500 = 1e7)
MAX_DENSE_VALUES = 2 ** 30


def undirected(edge_index: torch.Tensor, n: int) -> torch.Tensor:
    """``edge_index (2, E)`` made undirected on ``n`` nodes, without self loops."""
    from torch_geometric.utils import remove_self_loops, to_undirected

    return remove_self_loops(to_undirected(edge_index, num_nodes=n))[0]




def numeric_array(path: Path, a, what: str, ndim: int = 2) -> np.ndarray:
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


def checked_sparse(path: Path, m, what: str):
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


def dense_matrix(path: Path, obj, what: str) -> np.ndarray:
    """A 2-D numeric matrix from a scipy sparse matrix or an ndarray, densified and checked.

    Raises:
        DataFormatError: an inconsistent sparse matrix (indices out of range, ...), another type,
            more than :data:`MAX_DENSE_VALUES` values, a non-numeric dtype or NaN/inf.
    """
    import scipy.sparse as sp

    if sp.issparse(obj):
        m = checked_sparse(path, obj, what)
        shape = m.shape
        if shape[0] * shape[1] > MAX_DENSE_VALUES:
            raise DataFormatError(f"{path}: {what} of shape {shape} is larger than {MAX_DENSE_VALUES} values")
        numeric_array(path, m.data, f"{what} (its stored values)", 1)
        obj = m.toarray()
    return numeric_array(path, obj, what)


def check_classes(path: Path, counts: np.ndarray, what: str) -> None:
    """Every class ``0..K-1`` has a node and there are at least 2. Raises DataFormatError."""
    empty = np.flatnonzero(counts == 0)
    if len(counts) < 2 or len(empty):
        raise DataFormatError(f"{path}: {what} must cover classes 0..K-1 (K >= 2) with a node each; got K="
                              f"{len(counts)}" + (f", empty classes {empty[:10].tolist()}" if len(empty) else ""))



def read_or_raise(path: Path, what: str, fn):
    """``fn()``, with any error but a DataFormatError re-raised as one naming ``path`` and ``what``."""
    try:
        return fn()
    except DataFormatError:
        raise
    except Exception as e:  # zipfile/zlib/json/scipy.io errors, UnicodeDecodeError, MemoryError, ...
        raise DataFormatError(f"{path}: not a readable {what} (truncated or corrupt?): {type(e).__name__}: "
                              f"{str(e)[:200]}") from None


def adjacency_edges(path: Path, adj, n: int) -> torch.Tensor:
    """``(2, E)`` edges of an ``(n, n)`` sparse or dense adjacency (every stored entry is an edge).

    Raises:
        DataFormatError: not a matrix, not ``(n, n)``, an inconsistent sparse structure.
    """
    import scipy.sparse as sp

    adj = checked_sparse(path, adj, "the adjacency") if sp.issparse(adj) else numeric_array(path, adj, "adjacency")
    if tuple(adj.shape) != (n, n):
        raise DataFormatError(f"{path}: the adjacency is {tuple(adj.shape)}, expected ({n}, {n}) for the {n} nodes")
    coo = sp.coo_matrix(adj)  # safe: checked above
    return torch.from_numpy(np.vstack([coo.row, coo.col]).astype(np.int64))


__all__ = ["MAX_DENSE_VALUES", "adjacency_edges", "check_classes", "checked_sparse", "dense_matrix", "numeric_array",
           "read_or_raise", "undirected"]
