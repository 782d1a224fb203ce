"""Parity fixture for distribution matching (DM; Zhao & Bilen, arXiv 2110.04181) from the authors' code.

Runs ``main()`` of ``main_DM.py`` in VICO-UoE/DatasetCondensation (the per-class DM loop for a
ConvNet without BatchNorm, SGD lr_img 1.0 momentum 0.5 on the synthetic pixels, ``init=real``) for
``--Iteration 1`` (two image updates, so momentum acts) on a small fixed data set, with
``--dsa_strategy none``. What the loop draws at random is pinned so that our code can be fed the
same inputs:

* ``get_dataset`` returns seeded 8x8 images of 3 classes, 16 per class; ``--batch_real 64`` is more
  than a class has, so every iteration's real batch is the whole class (the class mean does not
  depend on the order ``np.random.permutation`` chose);
* ``get_network`` returns the reference ``networks.ConvNet`` (width 8, depth 3, instance norm, ReLU,
  average pooling) with seeded weights, a different network per call; which network each update
  used is recorded;
* ``evaluate_synset`` (the periodic evaluation at iteration 0) is skipped; ``save_image`` and the
  result file go to a temporary folder.

Recorded per update: the loss ``main_DM`` back-propagates, the
gradient w.r.t. the synthetic images, and the images after both updates (from the result file the
script saves). Inputs: the real images and labels, the initial synthetic images the script drew,
each update's network weights.

Usage: ``python tests/parity/gen_dm.py --reference /tmp/ref/DatasetCondensation``
"""
import argparse
import os
import sys
import tempfile

import torch

from fixture_io import add_reference_to_path, save_fixture

C, PER_CLASS, IPC, SIZE, WIDTH = 3, 16, 10, 8, 8


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference", required=True, help="checkout of VICO-UoE/DatasetCondensation")
    args = p.parse_args()
    root = add_reference_to_path(args.reference)
    import main_DM  # noqa: the authors' script (imports their utils and networks)
    from networks import ConvNet

    g = torch.Generator().manual_seed(0)
    real = torch.randn(C * PER_CLASS, 3, SIZE, SIZE, generator=g)
    labels = torch.arange(C).repeat(PER_CLASS)  # interleaved: the class table must be built, not assumed
    dst = [(real[i], int(labels[i])) for i in range(len(labels))]

    def get_dataset(dataset, data_path):
        return 3, (SIZE, SIZE), C, [f"c{i}" for i in range(C)], [0.0] * 3, [1.0] * 3, dst, dst, None

    nets = []

    def get_network(model, channel, num_classes, im_size=(32, 32)):
        torch.manual_seed(100 + len(nets))
        net = ConvNet(channel, num_classes, WIDTH, 3, "relu", "instancenorm", "avgpooling", im_size)
        nets.append(net)
        return net

    steps = []
    sgd = torch.optim.SGD

    class RecordingSGD(sgd):
        def step(self, closure=None):
            img = self.param_groups[0]["params"][0]
            steps[-1].update(before=img.detach().clone(), grad=img.grad.detach().clone(), net=len(nets) - 1,
                             lr=self.param_groups[0]["lr"], momentum=self.param_groups[0]["momentum"])
            return super().step(closure)

    backward = torch.Tensor.backward

    def recording_backward(self, *a, **k):
        steps.append({"loss": self.detach().clone()})
        return backward(self, *a, **k)

    main_DM.get_dataset, main_DM.get_network = get_dataset, get_network
    main_DM.evaluate_synset = lambda it_eval, net, *a, **k: (net, 0.0, 0.0)
    torch.optim.SGD, torch.Tensor.backward = RecordingSGD, recording_backward
    cwd, argv = os.getcwd(), sys.argv
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        sys.argv = ["main_DM.py", "--dataset", "CIFAR10", "--model", "ConvNet", "--ipc", str(IPC), "--Iteration", "1",
                    "--batch_real", "64", "--dsa_strategy", "none", "--num_exp", "1", "--num_eval", "1",
                    "--eval_mode", "S", "--init", "real"]
        main_DM.np.random.seed(0)
        try:
            main_DM.main()
            res = torch.load(os.path.join(tmp, "result", f"res_DM_CIFAR10_ConvNet_{IPC}ipc.pt"), weights_only=False)
        finally:
            os.chdir(cwd)
            sys.argv, torch.optim.SGD, torch.Tensor.backward = argv, sgd, backward
    final_images, final_labels = res["data"][0]
    assert len(steps) == 2, f"expected 2 updates, recorded {len(steps)}"
    cases = {"dm_two_updates": {
        "real_images": real, "real_labels": labels, "num_classes": C, "ipc": IPC, "width": WIDTH, "depth": 3,
        "batch_real": 64, "init_images": steps[0]["before"], "syn_labels": final_labels,
        "nets": [nets[s["net"]].state_dict() for s in steps], "losses": torch.stack([s["loss"] for s in steps]),
        "grads": torch.stack([s["grad"] for s in steps]),
        "final_images": final_images, "lr_img": steps[0]["lr"], "momentum": steps[0]["momentum"]}}
    save_fixture("dm", cases, reference=root, repo="VICO-UoE/DatasetCondensation",
                 replaced="main_DM's get_dataset (seeded 8x8 tensors), get_network (seeded reference ConvNet-8-3) and "
                          "evaluate_synset (skipped) patched in the script's namespace; torch.optim.SGD and "
                          "Tensor.backward wrapped to record the loss, gradient and images of each update")


if __name__ == "__main__":
    main()
