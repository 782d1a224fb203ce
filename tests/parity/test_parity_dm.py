"""Distribution matching (arXiv 2110.04181) against the authors' ``main_DM.py`` (fixture: ``gen_dm.py``).

Tolerance: losses ``rtol 1e-5``; pixel gradients and updated images ``rtol 1e-4, atol 1e-6``
(float32; our loop embeds all classes in one forward, the reference one class at a time, so the
sums are ordered differently).
"""
import pytest
import torch

from fixture_io import load_fixture
from lightning_dd.methods.images.distribution_matching import DistributionMatching
from lightning_dd.nets import build_net
from configs import method

pytestmark = pytest.mark.parity


def _module(case):
    hp = method("dm", ipc=case["ipc"], batch_real=case["batch_real"])  # lr_img, momentum: conf/method/dm.yaml
    net_cfg = {"name": "ConvNet", "width": case["width"], "depth": case["depth"]}
    module = DistributionMatching(case["init_images"], case["syn_labels"], case["real_images"], case["real_labels"],
                                  case["num_classes"], net_cfg, hp, dsa=None)
    size = tuple(case["real_images"].shape[-2:])

    def reference_net(iteration):  # the network main_DM drew for this update, in our ConvNet
        net = build_net("ConvNet", 3, case["num_classes"], size, width=case["width"], depth=case["depth"])
        net.load_state_dict(case["nets"][iteration])
        return net.train().requires_grad_(False)

    module.embedding_net = reference_net
    return module


def test_dm_loss_gradient_and_two_image_updates_equal_main_dm():
    """Pins, for two iterations of DistributionMatching.dm_step_loss + its configured optimizer: the
    loss ``sum_c ||mean embed(real_c) - mean embed(syn_c)||^2`` over the penultimate (``net.embed``)
    features, its gradient w.r.t. the synthetic pixels, and the SGD step (lr_img 1, momentum 0.5)
    including the momentum carried into the second update.
    Mutations checked: mean -> sum over the synthetic images in ``dm_loss`` (loss and gradient
    differ); DMMethod's default momentum 0.5 -> 0.9 (second update differs)."""
    case = load_fixture("dm")["cases"]["dm_two_updates"]
    module = _module(case)
    opt = module.configure_optimizers()
    for it in range(2):
        loss, _ = module.dm_step_loss(it)
        opt.zero_grad()
        loss.backward()
        assert loss.item() == pytest.approx(case["losses"][it].item(), rel=1e-5)
        assert torch.allclose(module.images.grad, case["grads"][it], rtol=1e-4, atol=1e-6)
        opt.step()
    assert torch.allclose(module.images.detach(), case["final_images"], rtol=1e-4, atol=1e-6)
