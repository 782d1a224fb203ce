"""Graph readers on the real Cora raw files and on tiny files in the GraphSAINT and .mat formats;
the LED shift (SGDD) is zero against itself, positive for a perturbed graph, and the sparse (KPM)
approximation agrees with the exact one."""
import json

import numpy as np
import pytest
import torch

from lightning_dd.data import DataNotFoundError
from lightning_dd.data.graphs import read_fraud_mat, read_graphsaint, read_planetoid
from lightning_dd.evaluate.led import led_cdf, led_cdf_kpm, led_shift


def test_real_cora_raw_files(shared_data):
    d = read_planetoid(shared_data / "planetoid", "cora")
    assert d.x.shape == (2708, 1433) and d.y.shape == (2708,) and int(d.y.max()) == 6
    assert d.edge_index.shape == (2, 10556)  # 5278 undirected edges, both directions
    assert int(d.train_mask.sum()) == 140 and int(d.val_mask.sum()) == 500 and int(d.test_mask.sum()) == 1000
    assert torch.bincount(d.y[d.train_mask]).tolist() == [20] * 7  # the public split
    assert not (d.edge_index[0] == d.edge_index[1]).any()


def test_missing_planetoid_files_are_named(tmp_path):
    with pytest.raises(DataNotFoundError, match=r"ind\.citeseer\.graph"):
        read_planetoid(tmp_path, "citeseer")


def test_graphsaint_layout(tmp_path):
    import scipy.sparse as sp

    n = 6
    rows, cols = [0, 1, 2, 3, 4], [1, 2, 3, 4, 5]
    sp.save_npz(tmp_path / "adj_full.npz", sp.csr_matrix((np.ones(5), (rows, cols)), shape=(n, n)))
    np.save(tmp_path / "feats.npy", np.arange(n * 3, dtype=np.float32).reshape(n, 3))
    (tmp_path / "class_map.json").write_text(json.dumps({str(i): i % 2 for i in range(n)}))
    (tmp_path / "role.json").write_text(json.dumps({"tr": [0, 1, 2], "va": [3], "te": [4, 5]}))
    d = read_graphsaint(tmp_path, "flickr")
    assert d.x.shape == (6, 3) and d.y.tolist() == [0, 1, 0, 1, 0, 1]
    assert d.edge_index.shape == (2, 10)  # symmetrized
    assert d.train_mask.tolist() == [True, True, True, False, False, False] and d.test_mask[5]
    (tmp_path / "role.json").unlink()
    with pytest.raises(DataNotFoundError, match="role.json"):
        read_graphsaint(tmp_path)


def test_fraud_mat(tmp_path):
    import scipy.sparse as sp
    from scipy.io import savemat

    n = 50
    rng = np.random.default_rng(0)
    adj = sp.random(n, n, density=0.1, random_state=0, format="csc")
    adj.data[:] = 1
    savemat(tmp_path / "YelpChi.mat", {"features": sp.csc_matrix(rng.random((n, 4))), "label": (np.arange(n) % 5 == 0)[None].astype(float),
                                       "homo": adj})
    d = read_fraud_mat(tmp_path / "YelpChi.mat")
    assert d.x.shape == (50, 4) and int(d.y.sum()) == 10 and d.name == "YelpChi"
    assert (d.train_mask | d.val_mask | d.test_mask).all() and not (d.train_mask & d.test_mask).any()
    assert int(d.y[d.train_mask].sum()) == 4  # stratified 40%
    with pytest.raises(DataNotFoundError, match="Amazon.mat"):
        read_fraud_mat(tmp_path / "Amazon.mat")


def _ring(n, chords=0, seed=0):
    i = torch.arange(n)
    ei = torch.stack([i, (i + 1) % n])
    if chords:
        g = torch.Generator().manual_seed(seed)
        ei = torch.cat([ei, torch.randint(0, n, (2, chords), generator=g)], 1)
    ei = ei[:, ei[0] != ei[1]]
    return torch.cat([ei, ei.flip(0)], 1)


def test_led_shift_zero_against_itself_positive_when_perturbed():
    x = torch.randn(60, 5, generator=torch.Generator().manual_seed(0))
    g = _ring(60, chords=30)
    assert led_shift(g, x, g, x) == 0.0
    assert led_shift(g, x, _ring(60, chords=30, seed=1), x) > 0.01
    # dense adjacency input gives the same LED as the edge list
    adj = torch.zeros(60, 60)
    adj[g[0], g[1]] = 1
    assert led_shift(adj, x, g, x) < 1e-9


def test_kpm_led_approximates_the_exact_one():
    x = torch.randn(300, 4, generator=torch.Generator().manual_seed(1))
    g = _ring(300, chords=400)
    grid = torch.linspace(0, 2, 801, dtype=torch.float64)
    exact, approx = led_cdf(g, x, grid), led_cdf_kpm(g, 300, x, grid, moments=300)
    w1 = torch.trapezoid((exact - approx).abs(), grid)
    other = led_cdf(_ring(300, chords=100, seed=3), x, grid)
    assert w1 < 0.01 and w1 < 0.2 * torch.trapezoid((exact - other).abs(), grid)


def test_graph_datamodule_reads_each_format(shared_data, tmp_path):
    """The DataModule behind conf/data/cora.yaml: real Cora (row-normalized features), and tiny
    GraphSAINT-layout and .mat files; unknown formats and missing files are named."""
    import scipy.sparse as sp
    from scipy.io import savemat

    from lightning_dd.data.graphs import GraphDataModule

    dm = GraphDataModule("cora", root=str(shared_data / "planetoid"))
    dm.setup()
    assert dm.num_classes == 7 and torch.allclose(dm.data.x.sum(1)[dm.data.x.sum(1) > 0], torch.tensor(1.0))
    saint = tmp_path / "flickr"
    saint.mkdir()
    sp.save_npz(saint / "adj_full.npz", sp.csr_matrix((np.ones(3), ([0, 1, 2], [1, 2, 3])), shape=(4, 4)))
    np.save(saint / "feats.npy", np.ones((4, 2), dtype=np.float32))
    (saint / "class_map.json").write_text(json.dumps({str(i): i % 2 for i in range(4)}))
    (saint / "role.json").write_text(json.dumps({"tr": [0, 1], "va": [2], "te": [3]}))
    dm = GraphDataModule("flickr", format="graphsaint", root=str(tmp_path), normalize_features=False)
    dm.setup()
    assert dm.data.edge_index.shape == (2, 6) and dm.num_classes == 2
    adj = sp.csc_matrix((np.ones(2), ([0, 1], [1, 2])), shape=(4, 4))
    savemat(tmp_path / "Amazon.mat", {"features": sp.csc_matrix(np.eye(4)), "label": np.array([[0, 1, 0, 1.]]), "homo": adj})
    dm = GraphDataModule("Amazon", format="fraud_mat", root=str(tmp_path), task="anomaly")
    dm.setup()
    assert dm.data.x.shape == (4, 4) and dm.task == "anomaly"
    with pytest.raises(ValueError, match="data.format"):
        GraphDataModule("cora", format="npz")
    with pytest.raises(ValueError, match="unknown keys"):
        GraphDataModule("cora", train_per_class=20)
    with pytest.raises(DataNotFoundError, match="YelpChi.mat"):
        GraphDataModule("YelpChi", format="fraud_mat", root=str(tmp_path)).setup()


def test_sparse_laplacian_eigenpairs_equal_dense_eigh(shared_data):
    """SGDD's OT term takes the real graph's smallest non-zero Laplacian eigenpairs from the sparse
    solver above ``dense_max`` nodes; they equal a dense float64 eigh's: eigenvalues to 1e-9, and
    the rank-r pseudo-inverse they build, invariant to eigenvector signs / rotations, to 1e-6.
    At most ``dense_max`` nodes, the pairs are exactly the dense eigh's (bitwise)."""
    from lightning_dd.data.graph_ops import dense_adjacency, laplacian_eigenpairs, normalized_laplacian_dense

    d = read_planetoid(shared_data / "planetoid", "cora")
    n = d.num_nodes
    lam, u = torch.linalg.eigh(normalized_laplacian_dense(dense_adjacency(d.edge_index, n, torch.float64)))
    nz = (lam > 1e-6).nonzero().squeeze(1)[:128]
    ref = (u[:, nz] / lam[nz]) @ u[:, nz].T
    l2, u2 = laplacian_eigenpairs(d.edge_index, n, 128, dense_max=0)   # the sparse solver
    assert l2.shape == (128,) and u2.shape == (n, 128)
    assert torch.allclose(l2, lam[nz], atol=1e-9)
    assert torch.allclose((u2 / l2) @ u2.T, ref, atol=1e-6)
    l3, u3 = laplacian_eigenpairs(d.edge_index, n, 128)
    assert torch.equal(l3, lam[nz]) and torch.equal(u3, u[:, nz])


def test_link_prediction_negatives_are_exactly_as_many_distinct_non_edges():
    """negative_sampling (seeded) gives exactly num_neg distinct non-edges; same seed, same AUC."""
    from torch_geometric.data import Data

    from lightning_dd.evaluate.graph import link_prediction_auc
    from lightning_dd.nets.gnn import GNN

    g = _ring(80, chords=60)
    real = Data(x=torch.randn(80, 5, generator=torch.Generator().manual_seed(0)), edge_index=g, num_nodes=80)
    net = GNN("GCN", 5, 3, hidden=8).eval()
    a, b = link_prediction_auc(net, real, seed=3), link_prediction_auc(net, real, seed=3)
    assert a == b  # same seed, same negatives, same AUC
    import random

    from torch_geometric.utils import negative_sampling

    random.seed(0)
    neg = negative_sampling(g, num_nodes=80, num_neg_samples=200, force_undirected=True)
    neg = neg[:, neg[0] < neg[1]]
    existing = set(map(tuple, g.T.tolist()))
    assert neg.shape[1] == 100 and len(set(map(tuple, neg.T.tolist()))) == 100
    assert not any(tuple(p) in existing for p in neg.T.tolist())
