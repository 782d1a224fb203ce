"""GCond (arXiv 2110.07580) against the authors' code: ``fixtures/gcond.pt`` from
``gen_gcond.py`` (``utils.match_loss``, ``models/parametrized_adj.PGE``, ``GCond.train`` of
``gcond_agent_transduct.py`` with ``models/sgc.SGC``), fed to :mod:`lightning_dd.methods.graphs.gcond`.

Tolerances: float32 throughout; ``1e-5`` relative (``1e-6`` absolute) for single evaluations, ``1e-4``
after 11 epochs of Adam steps (summation order differs: closed-form gradients vs autograd)."""
from __future__ import annotations

import pytest
import torch
from configs import method
from fixture_io import load_fixture
from torch_geometric.data import Data

from lightning_dd.core.trainer import TrainerFactory
from lightning_dd.methods.graphs.gcond import PGE, match_distance
from lightning_dd.methods.graphs.graph_run import fit_condenser

pytestmark = pytest.mark.parity

FIX = load_fixture("gcond")["cases"]


def load_pge(ours: PGE, ref_state: dict) -> None:
    """Reference ``layers.0`` (``Linear(2F, H)`` on ``[x_i; x_j]``) -> ``first_i`` / ``first_j``."""
    f = ours.first_i.in_features
    sd = {"first_i.weight": ref_state["layers.0.weight"][:, :f], "first_i.bias": ref_state["layers.0.bias"],
          "first_j.weight": ref_state["layers.0.weight"][:, f:], "out.weight": ref_state["layers.2.weight"],
          "out.bias": ref_state["layers.2.bias"], "mids.0.weight": ref_state["layers.1.weight"],
          "mids.0.bias": ref_state["layers.1.bias"]}
    sd.update({k: v for k, v in ref_state.items() if k.startswith("bns.")})
    ours.load_state_dict(sd)


def pge_as_reference(ours: PGE, grads: bool = False) -> dict:
    """Our PGE's parameters (or their gradients) in the reference's naming."""
    get = (lambda p: p.grad) if grads else (lambda p: p.detach())
    out = {"layers.0.weight": torch.cat([get(ours.first_i.weight), get(ours.first_j.weight)], 1),
           "layers.0.bias": get(ours.first_i.bias), "layers.1.weight": get(ours.mids[0].weight),
           "layers.1.bias": get(ours.mids[0].bias), "layers.2.weight": get(ours.out.weight),
           "layers.2.bias": get(ours.out.bias)}
    for i, bn in enumerate(ours.bns):
        out[f"bns.{i}.weight"], out[f"bns.{i}.bias"] = get(bn.weight), get(bn.bias)
    return out


def condenser(case, **hp):
    """Our GCond module on the fixture's graph, its synthetic features and PGE set to the fixture's."""
    a = case["adj"]
    mask = torch.zeros(len(case["y"]), dtype=torch.bool)
    mask[case["train"]] = True
    data = Data(x=case["x"], y=case["y"], edge_index=a.nonzero().T.contiguous(), train_mask=mask)
    gcond = method("gcond", reduction_rate=0.5, pge_hidden=16, pge_layers=3, nlayers=2, lr_feat=case["lr_feat"],
                   lr_adj=case["lr_adj"], lr_model=case["lr_model"], **hp)
    module = gcond.condenser(data, 0)
    with torch.no_grad():
        module.feat.copy_(case["feat_syn"])
    load_pge(module.generator_net, case["pge_state"])
    return module


def test_match_distance_equals_gcond_match_loss():
    """Pins GCond's gradient distance (``match_loss``, ``dis_metric='ours'``): per class the sum over
    output units of ``1 - cos`` with ``+1e-6`` in the denominator (a zero column gives 1), bias
    gradients ignored, classes weighted by ``coeff``."""
    c = FIX["distance"]
    per = torch.stack([match_distance(c["gs_w"][i:i + 1], c["gr_w"][i:i + 1], torch.ones(1))
                       for i in range(len(c["coeff"]))])
    torch.testing.assert_close(per, c["per_class"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(match_distance(c["gs_w"], c["gr_w"], c["coeff"]), c["total"], rtol=1e-5, atol=1e-6)


def test_condensation_model_init_equals_gcond_sgc_initialize():
    """Pins the SGC's re-initialization each epoch: ``W`` then ``b``, uniform in ``+-1/sqrt(F)`` (the
    fan-in, GCond's ``GraphConvolution``), the same draws from the same seed."""
    c = FIX["sgc_init"]
    m = condenser(FIX["step"])
    torch.manual_seed(c["seed"])
    w, b = m.init_model()
    torch.testing.assert_close(w.detach(), c["w"], rtol=0, atol=0)
    torch.testing.assert_close(b.detach(), c["b"], rtol=0, atol=0)


def test_pge_adjacency_equals_gcond_pge():
    """Pins PGE (Sec. 3.3): the MLP on ``[x_i; x_j]`` (our split first layer), batch norm with batch
    statistics, ``sigmoid((f + f^T) / 2)``, zero diagonal."""
    c = FIX["pge"]
    pge = PGE(c["feat"].shape[1], hidden=16, nlayers=3)
    load_pge(pge, c["state"])
    pge.train()
    torch.testing.assert_close(pge(c["feat"]), c["adj"], rtol=1e-5, atol=1e-6)


def test_one_outer_step_loss_and_gradients_equal_gcond():
    """Pins one outer step of GCond's Alg. 1 on a 16-node graph: the synthetic labels, each class's
    matching distance of the SGC gradients (real side on the whole graph, synthetic side on
    ``PGE(X')``), the class weights, and the gradients of the summed loss w.r.t. ``X'`` and every PGE
    parameter."""
    c = FIX["step"]
    m = condenser(c)
    torch.testing.assert_close(m.y_syn, c["labels_syn"])
    torch.testing.assert_close(m.coeff, c["coeff"])
    m.generator_net.train()
    h_syn = m.propagate(m.adjacency(m.feat), m.feat)
    per = torch.stack([match_distance(*g, torch.ones(1)) for g in zip(*m_class_grads(m, h_syn, c))])
    torch.testing.assert_close(per, c["per_class"], rtol=1e-5, atol=1e-6)
    loss = m.match_loss(h_syn, c["w"], c["b"])
    torch.testing.assert_close(loss, c["loss"], rtol=1e-5, atol=1e-6)
    loss.backward()
    torch.testing.assert_close(m.feat.grad, c["grad_feat"], rtol=1e-4, atol=1e-7)
    ours = pge_as_reference(m.generator_net, grads=True)
    for k, g in c["grad_pge"].items():
        torch.testing.assert_close(ours[k], g, rtol=1e-4, atol=1e-7, msg=k)


def m_class_grads(m, h_syn, c):
    """Per-class ``(synthetic, real)`` SGC weight gradients of our module, one class per row."""
    from lightning_dd.methods.graphs.gcond import class_gradients

    gs = class_gradients(h_syn, c["w"], c["b"], m.onehot_syn, m.cw_syn)
    gr = class_gradients(m.h_real, c["w"], c["b"], m.onehot_real, m.cw_real)
    return gs.unsqueeze(1), gr.unsqueeze(1)


def test_eleven_epochs_end_where_gcond_ends():
    """Pins GCond's epoch loop over 11 epochs of 2 outer x 3 inner steps (the reference's
    ``--epochs 10`` runs ``range(epochs + 1)``): structure updated in epochs 0-9, features in epoch
    10, the model re-initialized each epoch, the inner loop's Adam on the synthetic graph built by
    ``pge.inference`` -- in train mode, batch statistics (GCond's PGE is never put in eval mode)."""
    c, e = FIX["step"], FIX["epochs"]
    m = condenser(c, outer_loop=e["outer_loop"], inner_loop=e["inner_loop"])
    m.init_model = lambda: (c["w"].clone().requires_grad_(), c["b"].clone().requires_grad_())
    fit_condenser(m, e["epochs"], TrainerFactory(accelerator="cpu", enable_progress_bar=False))
    torch.testing.assert_close(m.feat.detach(), e["feat_syn"], rtol=1e-4, atol=1e-6)
    ours = pge_as_reference(m.generator_net)
    for k, v in ours.items():
        if k in ("layers.0.bias", "layers.1.bias"):
            continue  # followed by batch norm: gradient 0 up to round-off, which Adam scales to lr-size steps
        torch.testing.assert_close(v, e["pge"][k], rtol=1e-4, atol=1e-6, msg=k)
    ref_mean = (e["per_class"] * c["coeff"]).sum(-1).mean(-1)
    torch.testing.assert_close(torch.tensor(m.epoch_losses), ref_mean, rtol=1e-4, atol=1e-6)
