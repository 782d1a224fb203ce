"""Parity of Dataset Quantization (arXiv 2308.10524) and GraphCut with the authors' code
(``magic-research/Dataset_Quantization``; fixture written by ``gen_dq.py``, which runs the reference's
``quantize_sample.py`` and ``quantize_bin.py`` on a fixed 3-class set with a fixed two-layer network,
and its ``GraphCut`` + ``NaiveGreedy`` on fixed features).

Tolerances: the similarity matrices to 1e-5 absolute (the reference computes them in float32 numpy,
ours in float64), every selection (greedy order, bins) exactly. The
uniform draws cannot share a random stream (the reference reseeds numpy's legacy generator per bin,
ours is a torch generator), so the sampling is compared by its rule: counts per bin and class,
membership, no repeats.
"""
import pytest
import torch
import torch.nn as nn
from fixture_io import load_fixture

from lightning_dd.methods.images.dataset_quantization import (cosine_similarity, graph_cut, last_layer_embeddings,
                                                       quantize_bins, sample_bins)

pytestmark = pytest.mark.parity

FIX = load_fixture("dq")["cases"]
P = FIX["pipeline"]


class _Tiny(nn.Module):
    """The fixture's fixed network (48 -> 16 -> ReLU -> K) with the ``classifier`` our embedding reads."""

    def __init__(self):
        super().__init__()
        self.fc1, self.classifier = nn.Linear(*P["w1"].T.shape), nn.Linear(*P["w2"].T.shape)
        with torch.no_grad():
            self.fc1.weight.copy_(P["w1"]), self.fc1.bias.copy_(P["b1"])
            self.classifier.weight.copy_(P["w2"]), self.classifier.bias.copy_(P["b2"])

    def forward(self, x):
        return self.classifier(torch.relu(self.fc1(x.flatten(1))))


def _class_similarity(c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Our gradient-embedding similarity of class ``c`` and its training-set indices (ascending)."""
    i = torch.nonzero(P["labels"] == c)[:, 0]
    e, g = last_layer_embeddings(_Tiny(), P["images"][i], P["labels"][i])
    return cosine_similarity(e, g), i


@pytest.mark.parametrize("case", ["graph_cut_lam1.0", "graph_cut_lam0.5"])
def test_graph_cut_gain_and_greedy_order_equal_the_reference(case):
    """Pins the similarity ``0.5 + 0.5 cos`` (``cossim_np``), GraphCut's gain ``lam * sum_j S[i, j] -
    2 * sum_{s in selected} S[i, s]`` (``GraphCut.calc_gain``, pinned through what it picks) and the
    NaiveGreedy order of 20 picks of 30, at two lambdas.
    Mutation checked: the factor 2 of the selected term set to 1 -> the order differs."""
    f = FIX[case]
    sim = cosine_similarity(f["features"])
    torch.testing.assert_close(sim, f["sim"].double(), atol=1e-5, rtol=0)
    order = graph_cut(sim, f["k"], f["lam"])
    assert order.tolist() == f["order"].tolist()


def test_gradient_embedding_similarity_equals_the_reference():
    """Pins the last-layer gradient embedding ``[dL/db, dL/dW]`` of ``CE(softmax(z), y)``
    (``Submodular.calc_gradient``) through its cosine similarity, per class, on every image of the
    class (the reference's first-bin pass). Mutation checked: ``gradient_loss`` ``softmax_ce`` -> plain
    ``CE(z, y)`` inside :func:`last_layer_embeddings` -> the similarities differ (> 1e-2)."""
    for c in range(len(P["class_gradients"])):
        sim, i = _class_similarity(c)
        assert torch.equal(i, P["class_gradient_index"][c].sort().values)
        ref = P["class_gradients"][c].double()
        ref = ref[P["class_gradient_index"][c].argsort()]  # our class order: ascending training index
        ref_sim = cosine_similarity(ref)
        torch.testing.assert_close(sim, ref_sim, atol=1e-5, rtol=0)


def test_bins_equal_the_reference():
    """Pins DQ's bins (``quantize_sample.py``): per class, ``num_bins - 1`` successive GraphCut
    selections of ``round(n / num_bins)`` from what the previous bins left, the last bin the
    remainder; each bin's greedy order and its members equal the reference's exactly.
    Mutation checked: a bin's picks left in the pool of the next bins inside :func:`quantize_bins`
    -> bins 1.. differ."""
    nb = P["num_bins"]
    for c in range(len(P["class_gradients"])):
        sim, i = _class_similarity(c)
        bins = [i[b] for b in quantize_bins(sim, nb)]
        assert len(bins) == nb
        for b in range(nb - 1):
            assert bins[b].tolist() == P["bin_order"][b][c].tolist(), (c, b)
        ref_last = P["bins"][nb - 1]
        assert bins[-1].sort().values.tolist() == ref_last[P["labels"][ref_last] == c].sort().values.tolist()
        for b in range(nb):  # the reference's bin files hold all classes, sorted
            ref = P["bins"][b]
            assert bins[b].sort().values.tolist() == ref[P["labels"][ref] == c].sort().values.tolist()


@pytest.mark.parametrize("frac", [0.2, 0.15])
def test_bin_sampling_follows_the_reference_rule(frac):
    """Pins DQ's sampling (``quantize_bin.py`` + ``Uniform``, balanced): per bin and class
    ``round(ratio * |bin|)`` distinct images of that bin (0.15 of bins of 10: 2 each, 8 per class,
    not round(0.15 * 40) = 6), nothing outside the bins. Mutation checked: ``bin_quota`` rule
    ``exact`` as the default of :func:`sample_bins` -> 2, 2, 1, 1 at 0.15."""
    ref = P[f"sample_{frac}"]
    nb = P["num_bins"]
    g = torch.Generator().manual_seed(0)
    for c in range(len(P["class_gradients"])):
        sim, i = _class_similarity(c)
        bins = [i[b] for b in quantize_bins(sim, nb)]
        k = round(frac * len(i))
        ours = sample_bins(bins, k, g)
        assert len(set(ours.tolist())) == len(ours)
        ref_c = ref[P["labels"][ref] == c]
        assert len(set(ref_c.tolist())) == len(ref_c)
        counts = [int(torch.isin(ours, b).sum()) for b in bins]
        ref_counts = [int(torch.isin(ref_c, b).sum()) for b in bins]
        assert counts == ref_counts and sum(counts) == len(ours), (c, counts, ref_counts)
