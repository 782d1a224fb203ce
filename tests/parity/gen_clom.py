"""Parity fixture for the CLoM terms (Lu et al., arXiv 2310.03295) from the authors' code.

Builds the ``CLoM`` object of ``utils_clom/CLoM.py`` in yaolu-zjut/DDInterpreter with its own
constructor (which loads the pooled model from ``./pretrained_model/<dataset>/original/<arch>/index_0/
<dataset>_<arch>_original_epoch<E>.pth``, written here into a temporary folder from a seeded
``utils_clom.model.ConvNet``) and evaluates ``calculating_CLoM(syn_image, syn_label)``, the call the
authors' ``methods/DC_DSA_DM/main_DM.py`` adds to the DM loss every iteration:

* ``ce``: ``alpha * CrossEntropy(model(S), y_S)``;
* ``cos``: ``alpha * sum(M * D) / sum(D)``, ``D = 1 - cos(embed(S), embed(R))`` against
  ``CLoM_batch_size`` real images drawn uniformly (``np.random.randint``) from the data set given
  to ``set_real_data``; the drawn indices are recorded so our code can be fed the same batch.

Recorded per case: the value and its gradient w.r.t. the synthetic images. Inputs: seeded 8x8
images (4 classes, 3 synthetic per class, 40 real), the pooled model's weights, alpha.

Replaced to run here: ``utils_clom.model_pool.get_network`` (as imported by ``CLoM.py``) builds
the authors' ``ConvNet`` at width 8 instead of their fixed 128 (fixture size); ``Tensor.cuda`` is the
identity (the cosine term moves its one-hot labels with ``.cuda()``).

Usage: ``python tests/parity/gen_clom.py --reference /tmp/ref/DDInterpreter``
"""
import argparse
import os
import tempfile
from types import SimpleNamespace

import numpy as np
import torch

from fixture_io import add_reference_to_path, save_fixture

C, IPC, N_REAL, SIZE, WIDTH, EPOCH = 4, 3, 40, 8, 8, 150


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference", required=True, help="checkout of yaolu-zjut/DDInterpreter")
    args = p.parse_args()
    root = add_reference_to_path(args.reference)
    import utils_clom.CLoM as ref  # noqa: the authors' module
    from utils_clom.model import ConvNet

    def get_network(model, channel, num_classes, im_size=(32, 32)):
        return ConvNet(channel, num_classes, WIDTH, 3, "relu", "instancenorm", "avgpooling", im_size)

    ref.get_network = get_network
    cuda = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    g = torch.Generator().manual_seed(0)
    syn = torch.randn(C * IPC, 3, SIZE, SIZE, generator=g)
    syn_labels = torch.arange(C).repeat_interleave(IPC)
    real = torch.randn(N_REAL, 3, SIZE, SIZE, generator=g)
    real_labels = torch.randint(C, (N_REAL,), generator=g)
    torch.manual_seed(7)
    state = get_network("ConvNet", 3, C, (SIZE, SIZE)).state_dict()

    cases = {}
    cwd = os.getcwd()
    randint = np.random.randint
    try:
        with tempfile.TemporaryDirectory() as tmp:
            os.chdir(tmp)
            folder = os.path.join(ref.get_pretrained_model_root("CIFAR10", "ConvNet"), "index_0")
            os.makedirs(folder)
            torch.save(state, os.path.join(folder, f"CIFAR10_ConvNet_original_epoch{EPOCH}.pth"))
            for distance, alpha, batch in (("ce", 2.0, None), ("cos", 3.0, 25)):
                clom = ref.CLoM(SimpleNamespace(device="cpu"), IPC, batch, distance, "CIFAR10", 3, C, (SIZE, SIZE),
                                ["ConvNet"], 1, [alpha], EPOCH)
                drawn = []
                if distance == "cos":
                    clom.set_real_data(real, real_labels, C)
                    np.random.seed(0)
                    np.random.randint = lambda *a, **k: drawn.append(randint(*a, **k)) or drawn[-1]
                x = syn.clone().requires_grad_(True)
                loss = clom.calculating_CLoM(x, syn_labels)
                np.random.randint = randint
                (grad,) = torch.autograd.grad(loss, x)
                cases[distance] = {"alpha": alpha, "loss": loss, "grad": grad,
                                   "real_idx": torch.as_tensor(drawn[0]) if drawn else torch.zeros(0, dtype=torch.long)}
    finally:
        os.chdir(cwd)
        np.random.randint, torch.Tensor.cuda = randint, cuda
    inputs = {"syn": syn, "syn_labels": syn_labels, "real": real, "real_labels": real_labels, "state": state,
              "num_classes": C, "width": WIDTH, "depth": 3, "epoch": EPOCH}
    save_fixture("clom", {"inputs": inputs, **cases}, reference=root, repo="yaolu-zjut/DDInterpreter",
                 replaced="utils_clom.model_pool.get_network as imported by CLoM.py builds the authors' ConvNet at width "
                          "8 (not 128); Tensor.cuda is the identity (CPU); np.random.randint wrapped to record the "
                          "real batch the cosine term draws")


if __name__ == "__main__":
    main()
