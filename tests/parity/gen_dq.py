"""Parity fixture of Dataset Quantization (arXiv 2308.10524) and its GraphCut selection, from the
authors' code (``magic-research/Dataset_Quantization``).

Exercised, as the README's CIFAR pipeline runs them:

* ``quantize_sample.py`` ``main()`` (``--selection Submodular --submodular GraphCut
  --submodular_greedy NaiveGreedy``, ``--fraction 1/num_bins --num_exp num_bins``): the bins, i.e.
  ``dq/methods/submodular.py`` ``Submodular.calc_gradient`` (the last-layer gradient embedding) and
  ``finish_run`` (per class), ``dq/methods/methods_utils/cossim.py`` ``cossim_np``,
  ``submodular_function.py`` ``GraphCut`` and ``submodular_optimizer.py`` ``NaiveGreedy``; the greedy
  order inside each bin is read from the calls of ``GraphCut.update_state`` (the optimizer itself
  returns the bin as a sorted index set);
* ``quantize_bin.py`` ``main()`` (``dq/methods/uniform.py`` ``Uniform``, balanced): the per-bin
  uniform sampling at two keep ratios (0.2: exact per-bin counts; 0.15: per-bin rounding of 1.5);
* ``GraphCut`` + ``NaiveGreedy`` directly on fixed random features (``cossim_np`` similarity) with
  lambda 1 and 0.5: the similarity matrix and the greedy order of 20 picks of 30.

Inputs: 3 classes x 40 "images" of 3x4x4 (seeded normal), a fixed two-layer network (48 -> 16 ->
ReLU -> 3 classes; the reference's model interface: ``embedding_recorder`` before the last layer,
``get_last_layer``, ``no_grad``) registered in ``dq.nets`` under the name ``Tiny``; 4 bins of 10
images per class. The network is given its fixed weights at construction, so every bin's pass
(the reference builds a fresh model per bin) sees the same one.

Usage: ``python tests/parity/gen_dq.py --reference /tmp/ref/Dataset_Quantization``
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixture_io import add_reference_to_path, save_fixture  # noqa: E402

CLASSES, PER_CLASS, BINS, SHAPE = 3, 40, 4, (3, 4, 4)
REPLACED = ("prefetch_generator (imported by util/utils.py, unused here) stubbed; dq.datasets.CIFAR10 "
            "replaced by a fixed in-memory dataset and the selection model by a fixed two-layer network "
            "with the reference models' interface (both are inputs, not the code under test)")


def inputs() -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(CLASSES * PER_CLASS, *SHAPE, generator=g)
    y = torch.arange(CLASSES).repeat_interleave(PER_CLASS)
    perm = torch.randperm(len(y), generator=g)  # classes interleaved, as in a real training set
    w1 = torch.randn(16, int(np.prod(SHAPE)), generator=g) * 0.3
    b1 = torch.randn(16, generator=g) * 0.1
    w2 = torch.randn(CLASSES, 16, generator=g) * 0.5
    b2 = torch.randn(CLASSES, generator=g) * 0.1
    feats = torch.randn(30, 8, generator=g)
    return {"images": x[perm], "labels": y[perm], "w1": w1, "b1": b1, "w2": w2, "b2": b2, "features": feats}


def reference_pipeline(inp: dict, ref: Path) -> dict:
    sys.modules.setdefault("prefetch_generator", types.SimpleNamespace(BackgroundGenerator=object))
    import dq.datasets as datasets
    import dq.methods.methods_utils.submodular_function as sf
    import dq.nets as nets
    import quantize_bin
    import quantize_sample
    from dq.nets.nets_utils import EmbeddingRecorder

    class Tiny(nn.Module):
        def __init__(self, channel, num_classes, pretrained=False, im_size=None, record_embedding=False,
                     no_grad=False):
            super().__init__()
            self.fc1 = nn.Linear(int(np.prod(SHAPE)), 16)
            self.linear = nn.Linear(16, num_classes)
            with torch.no_grad():
                self.fc1.weight.copy_(inp["w1"]), self.fc1.bias.copy_(inp["b1"])
                self.linear.weight.copy_(inp["w2"]), self.linear.bias.copy_(inp["b2"])
            self.embedding_recorder = EmbeddingRecorder(record_embedding)
            self.no_grad = no_grad

        def get_last_layer(self):
            return self.linear

        def forward(self, x):
            with torch.set_grad_enabled(not self.no_grad):
                return self.linear(self.embedding_recorder(torch.relu(self.fc1(x.flatten(1)))))

    class Data(torch.utils.data.Dataset):
        classes = [f"c{c}" for c in range(CLASSES)]

        def __init__(self):
            self.x, self.targets = inp["images"], inp["labels"].clone()

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i], self.targets[i]

    nets.Tiny = Tiny
    datasets.CIFAR10 = lambda path: (SHAPE[0], SHAPE[1:], CLASSES, Data.classes, None, None, Data(), Data())

    # record the greedy order (GraphCut.update_state is called once per pick, in order) and the embeddings
    order, grads = [], []
    sf.GraphCut.update_state = lambda self, new, total, **kw: order[-1].append(int(new[0]))
    from dq.methods.submodular import Submodular
    calc = Submodular.calc_gradient

    def calc_gradient(self, index=None):
        order.append([])
        out = calc(self, index)
        grads.append((np.asarray(self.dst_train.indices)[index], out))
        return out

    Submodular.calc_gradient = calc_gradient
    out: dict = {}
    argv = sys.argv  # the reference scripts read their arguments from sys.argv; save_fixture reads ours
    with tempfile.TemporaryDirectory() as tmp:
        bins_dir, data_dir = Path(tmp) / "bins", Path(tmp) / "data"
        sys.argv = ["quantize_sample.py", "--fraction", str(1 / BINS), "--dataset", "CIFAR10", "--data_path",
                    str(data_dir), "--num_exp", str(BINS), "--workers", "0", "-se", "0", "--selection", "Submodular",
                    "--model", "Tiny", "-sp", str(bins_dir), "--batch", "16", "--submodular", "GraphCut",
                    "--submodular_greedy", "NaiveGreedy", "--seed", "0"]
        quantize_sample.main()
        bins = [torch.from_numpy(np.load(bins_dir / f"select_indices_CIFAR10_exp{e}.npy")).long() for e in range(BINS)]
        out["bins"] = bins  # training-set indices, sorted, all classes
        # greedy order of bins 0..BINS-2, per class: training-set indices in the order picked
        out["bin_order"] = [[torch.from_numpy(idx[o]).long() for (idx, _), o in zip(grads[b * CLASSES:(b + 1) * CLASSES],
                                                                                   order[b * CLASSES:(b + 1) * CLASSES])]
                            for b in range(BINS - 1)]
        out["class_gradients"] = [torch.from_numpy(g) for _, g in grads[:CLASSES]]  # bin 0: every image of the class
        out["class_gradient_index"] = [torch.from_numpy(idx).long() for idx, _ in grads[:CLASSES]]
        for frac in (0.2, 0.15):
            sample_dir = Path(tmp) / f"sample_{frac}"
            sys.argv = ["quantize_bin.py", "--fraction", str(frac), "--dataset", "CIFAR10", "--data_path",
                        str(data_dir), "--workers", "0", "--selection_path", str(bins_dir), "-sp", str(sample_dir),
                        "--seed", "0"]
            quantize_bin.main()
            out[f"sample_{frac}"] = torch.from_numpy(np.load(sample_dir / f"select_indices_CIFAR10_{frac}.npy")).long()
    sys.argv = argv
    return out


def reference_graph_cut(feats: np.ndarray, lam: float, k: int) -> dict:
    import dq.methods.methods_utils.submodular_function as sf
    from dq.methods.methods_utils.cossim import cossim_np
    from dq.methods.methods_utils.submodular_optimizer import NaiveGreedy

    n = len(feats)
    idx = np.arange(n)
    fn = sf.GraphCut(index=idx, similarity_kernel=lambda a, b: cossim_np(feats[a], feats[b]), lam=lam)
    picked = []
    fn.update_state = lambda new, total, **kw: picked.append(int(new[0]))
    NaiveGreedy(args=None, index=idx, budget=k).select(gain_function=fn.calc_gain, update_state=fn.update_state)
    return {"order": torch.tensor(picked), "sim": torch.from_numpy(fn.sim_matrix.copy())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference", required=True, help="checkout of magic-research/Dataset_Quantization")
    args = ap.parse_args()
    ref = add_reference_to_path(args.reference)
    torch.manual_seed(0)
    inp = inputs()
    cases = {"pipeline": {**{k: inp[k] for k in ("images", "labels", "w1", "b1", "w2", "b2")},
                          "num_bins": BINS, **reference_pipeline(inp, ref)}}
    feats = inp["features"].numpy()
    for lam in (1.0, 0.5):
        cases[f"graph_cut_lam{lam}"] = {"features": inp["features"], "lam": lam, "k": 20,
                                        **reference_graph_cut(feats, lam, 20)}
    save_fixture("dq", cases, reference=ref, repo="magic-research/Dataset_Quantization", replaced=REPLACED)


if __name__ == "__main__":
    main()
