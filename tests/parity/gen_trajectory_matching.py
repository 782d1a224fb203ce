"""Generate the trajectory-matching parity fixtures by running the authors' distillation scripts.

Exercised, as scripts (``runpy``, ``__main__``) for one iteration (``--Iteration=0``):

* ``fixtures/trajectory_matching.pt``: MTT's ``distill.py`` (arXiv 2203.11932;
  ``GeorgeCazenavette/mtt-distillation``): real-image init (``pix_init=real``), hard labels, the
  inner loop of ``syn_steps`` SGD steps with the learnable ``syn_lr`` through ``reparam_module.py``'s
  ``ReparamModule``, ``DiffAugment`` (``utils.py``) on or off, the normalized parameter loss and its
  ``backward``; plus ``networks.py``'s ``ConvNet`` forward (and through ``ReparamModule``).
* ``fixtures/trajectory_matching_datm.pt``: DATM's ``distill/DATM.py`` (arXiv 2310.05773;
  ``NUS-HPC-AI-Lab/DATM``): soft labels initialized from the expert's last-epoch logits
  (``pix_init=real``), ``SoftCrossEntropy``, the sequential-generation window, the same inner loop.

Inputs are fixed: a 4-class "training set" of exactly ``ipc`` random 3x8x8 images per class (so the
real init is a permutation of it), one expert trajectory of 4 epochs (a ConvNet-16-2 with instance
norm, the reference's ``get_network``, and fixed random steps), ``batch_syn=5`` over 12 images
(chunks 5, 5, 2), 6 student steps. Recorded: what the scripts' optimizers were built with (images,
soft labels, ``syn_lr``) and the gradients they stepped with, the logged ``Grand_Loss`` and
``Start_Epoch``, and the global RNG state at the inner loop's first ``randperm`` (the script reseeds
from the clock in ``get_network``; the minibatch permutations and DSA draws that follow come from
this state, so the test replays them from a generator in it).

Replaced to run here (no GPU, no W&B, no data): ``wandb`` and ``yacs`` are stubs;
``utils.get_dataset`` returns the fixed set; ``utils.evaluate_synset`` returns 0 without training
(MTT evaluates at iteration 0; its augmentation is switched off in the inner loop with ``--no_aug``, as
``--dsa=False`` fails in its evaluation printout); ``utils.get_default_convnet_setting`` returns width 16, depth 2
(instance norm, ReLU, avg pooling as the default); ``torch.Tensor.cuda`` is the identity (MTT saves
images with ``.cuda()``); ``torch.optim.SGD`` and ``torch.randperm`` are wrapped to record (they
compute as before). DATM runs with ``pix_init=real``: its ``samples_predicted_correctly`` branch
needs ``cuda:0``.

    python tests/parity/gen_trajectory_matching.py --reference /tmp/ref/mtt-distillation --datm /tmp/ref/DATM
"""
from __future__ import annotations

import argparse
import os
import runpy
import sys
import tempfile
import types
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixture_io import add_reference_to_path, save_fixture  # noqa: E402

C, K, IPC, HW = 3, 4, 3, 8
WIDTH, DEPTH = 16, 2
BATCH_SYN, SYN_STEPS, EXPERT_EPOCHS, EPOCHS = 5, 6, 2, 4
LR_TEACHER = 0.05
STRATEGY = "color_crop_cutout_flip_scale_rotate"
REFERENCE_MODULES = ("utils", "utils.utils_baseline", "utils.cfg", "networks", "reparam_module", "wandb", "yacs",
                     "yacs.config")


class Recorder:
    """What the reference's run did: optimizers (init values, lr, the gradients of ``step``), the
    W&B log, and the RNG state / outputs of each ``randperm`` after the last ``get_network``."""

    def __init__(self):
        self.optimizers, self.log, self.perm_states, self.perms = [], [], [], []


def _stubs(rec: Recorder) -> None:
    wandb = types.ModuleType("wandb")

    def init(**kw):
        wandb.config = types.SimpleNamespace(_items=dict(vars(kw["config"])))
        wandb.run = types.SimpleNamespace(name="parity")

    wandb.init, wandb.finish = init, lambda: None
    wandb.log = lambda d, step=None: rec.log.append(dict(d))
    wandb.Histogram = wandb.Image = lambda *a, **k: None
    sys.modules["wandb"] = wandb

    yacs, config = types.ModuleType("yacs"), types.ModuleType("yacs.config")

    class CfgNode(dict):
        def __getattr__(self, k):
            try:
                return self[k]
            except KeyError as e:
                raise AttributeError(k) from e

        def __setattr__(self, k, v):
            self[k] = v

        def merge_from_file(self, path):
            self.update(yaml.safe_load(Path(path).read_text()))

    config.CfgNode, yacs.config = CfgNode, config
    sys.modules["yacs"], sys.modules["yacs.config"] = yacs, config


def _problem():
    """The fixed training set, the expert's start parameters' net and the trajectory ``(EPOCHS, P)``."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(K * IPC, C, HW, HW, generator=g)
    labels = torch.arange(K).repeat_interleave(IPC)
    return g, images, labels


def _patch_utils(utils, rec: Recorder, images, labels):
    dst_train = [(images[i], int(labels[i])) for i in range(len(labels))]

    def get_dataset(*a, **k):
        return (C, (HW, HW), K, [str(c) for c in range(K)], [0.0] * C, [1.0] * C, dst_train, None, None, None,
                {c: c for c in range(K)}, {c: c for c in range(K)})

    get_network = utils.get_network

    def recording_get_network(*a, **k):
        rec.perm_states.clear()
        rec.perms.clear()
        return get_network(*a, **k)

    utils.get_dataset = get_dataset
    utils.evaluate_synset = lambda *a, **k: (None, 0.0, 0.0)
    utils.get_default_convnet_setting = lambda: (WIDTH, DEPTH, "relu", "instancenorm", "avgpooling")
    utils.get_network = recording_get_network


def _patch_torch(rec: Recorder):
    sgd, randperm, cuda = torch.optim.SGD, torch.randperm, torch.Tensor.cuda

    class RecordingSGD(sgd):
        def __init__(self, params, *a, **k):
            params = list(params)
            super().__init__(params, *a, **k)
            self.rec = {"init": [p.detach().clone() for p in params], "lr": k.get("lr"), "grad": None}
            rec.optimizers.append(self.rec)

        def step(self, closure=None):
            self.rec["grad"] = [p.grad.detach().clone() for g in self.param_groups for p in g["params"]]
            return super().step(closure)

    def recording_randperm(*a, **k):
        rec.perm_states.append(torch.get_rng_state())
        out = randperm(*a, **k)
        rec.perms.append(out.clone())
        return out

    torch.optim.SGD, torch.randperm, torch.Tensor.cuda = RecordingSGD, recording_randperm, lambda self, *a, **k: self
    return lambda: setattr(torch.optim, "SGD", sgd) or setattr(torch, "randperm", randperm) or \
        setattr(torch.Tensor, "cuda", cuda)


def _expert(networks):
    """One trajectory ``(EPOCHS, P)`` from the reference ConvNet's init, and the net's parameter shapes."""
    torch.manual_seed(1)
    net = networks.ConvNet(channel=C, num_classes=K, net_width=WIDTH, net_depth=DEPTH, net_act="relu",
                           net_norm="instancenorm", net_pooling="avgpooling", im_size=(HW, HW))
    theta0 = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    g = torch.Generator().manual_seed(2)
    steps = torch.randn(EPOCHS - 1, theta0.numel(), generator=g) * 0.02 * theta0.abs().mean()
    traj = torch.cat([theta0[None], theta0 + steps.cumsum(0)])
    shapes = [p.shape for p in net.parameters()]
    return net, traj, shapes


def _write_buffer(root: Path, traj, shapes):
    d = root / "buffers" / "CIFAR10_NO_ZCA" / "ConvNet"
    d.mkdir(parents=True)
    numels = [int(torch.Size(s).numel()) for s in shapes]
    epochs = [[t.view(s).clone() for t, s in zip(theta.split(numels), shapes)] for theta in traj]
    torch.save([epochs], d / "replay_buffer_0.pt")


def _run(script: Path, argv: list[str]):
    old = sys.argv
    sys.argv = [str(script), *argv]
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = old


def _result(rec: Recorder, labels_opt: bool) -> dict:
    img, lr = rec.optimizers[0], rec.optimizers[1]
    loss = [e for e in rec.log if "Grand_Loss" in e][-1]
    out = {"images": img["init"][0], "syn_lr": lr["init"][0], "lr_img": img["lr"], "lr_lr": lr["lr"],
           "grad_images": img["grad"][0], "grad_syn_lr": lr["grad"][0], "loss": loss["Grand_Loss"],
           "start_epoch": int(loss["Start_Epoch"]), "rng_state": rec.perm_states[0], "perms": rec.perms}
    if labels_opt:
        y = rec.optimizers[2]
        out.update(labels=y["init"][0], grad_labels=y["grad"][0], lr_y=y["lr"])
    return out


def _clear_reference_modules(root: Path):
    for name in (*REFERENCE_MODULES, "distill"):
        sys.modules.pop(name, None)
    for p in list(sys.path):
        if p.startswith(str(root)):
            sys.path.remove(p)


def run_mtt(checkout: str) -> dict:
    root = add_reference_to_path(checkout)
    rec = Recorder()
    _stubs(rec)
    import networks  # noqa: PLC0415  (the reference's)
    import utils  # noqa: PLC0415
    _, images, labels = _problem()
    _patch_utils(utils, rec, images, labels)
    net, traj, shapes = _expert(networks)
    cases = {"expert": {"trajectory": traj, "labels": labels}}

    # ConvNet forward: the reference net with its own init, then through ReparamModule with a flat vector
    import reparam_module  # noqa: PLC0415
    x = torch.randn(5, C, HW, HW, generator=torch.Generator().manual_seed(3))
    cases["convnet"] = {"x": x, "state_dict": dict(net.state_dict()), "logits": net(x).detach(),
                        "flat": traj[-1], "logits_flat": reparam_module.ReparamModule(net)(x, flat_param=traj[-1]).detach()}

    restore = _patch_torch(rec)
    cwd = os.getcwd()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            _write_buffer(Path(tmp), traj, shapes)
            os.chdir(tmp)
            for name, no_aug in (("mtt_no_dsa", "1"), ("mtt_dsa", "")):  # argparse bool: "" is False
                rec.__init__()
                torch.manual_seed(0)
                _run(root / "distill.py", ["--dataset=CIFAR10", f"--ipc={IPC}", f"--syn_steps={SYN_STEPS}",
                                           f"--expert_epochs={EXPERT_EPOCHS}", "--max_start_epoch=2", "--lr_img=1000",
                                           "--lr_lr=1e-05", f"--lr_teacher={LR_TEACHER}", f"--batch_syn={BATCH_SYN}",
                                           "--Iteration=0", "--eval_it=100", "--num_eval=1", f"--no_aug={no_aug}",
                                           f"--dsa_strategy={STRATEGY}", "--buffer_path=buffers", "--data_path=."])
                cases[name] = {**_result(rec, labels_opt=False), "dsa": not no_aug}
    finally:
        os.chdir(cwd)
        restore()
        _clear_reference_modules(root)
    return cases


def run_datm(checkout: str) -> dict:
    root = add_reference_to_path(checkout)
    rec = Recorder()
    _stubs(rec)
    import networks  # noqa: PLC0415  (the reference's)
    import utils.utils_baseline as utils  # noqa: PLC0415
    _, images, labels = _problem()
    _patch_utils(utils, rec, images, labels)
    _, traj, shapes = _expert(networks)
    cases = {"expert": {"trajectory": traj, "labels": labels}}
    restore = _patch_torch(rec)
    cwd = os.getcwd()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            _write_buffer(Path(tmp), traj, shapes)
            os.chdir(tmp)
            for name, dsa in (("datm_no_dsa", False), ("datm_dsa", True)):
                cfg = {"dataset": "CIFAR10", "device": [0], "ipc": IPC, "syn_steps": SYN_STEPS,
                       "expert_epochs": EXPERT_EPOCHS, "lr_img": 100, "lr_teacher": LR_TEACHER, "lr_lr": 1e-5,
                       "lr_y": 2.0, "Momentum_y": 0.9, "buffer_path": "buffers", "data_path": ".", "Iteration": 0,
                       "batch_syn": BATCH_SYN, "eval_it": 100, "skip_first_eva": True, "num_eval": 1,
                       "threshold": 100.0, "pix_init": "real", "zca": False, "dsa": dsa, "dsa_strategy": STRATEGY,
                       "min_start_epoch": 0, "current_max_start_epoch": 1, "max_start_epoch": 2,
                       "expansion_end_epoch": 1000, "Sequential_Generation": True, "project": "parity"}
                Path("cfg.yaml").write_text(yaml.safe_dump(cfg))
                rec.__init__()
                _run(root / "distill" / "DATM.py", ["--cfg", "cfg.yaml"])
                cases[name] = {**_result(rec, labels_opt=True), "dsa": dsa}
    finally:
        os.chdir(cwd)
        restore()
        _clear_reference_modules(root)
    return cases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", required=True, help="checkout of GeorgeCazenavette/mtt-distillation")
    ap.add_argument("--datm", required=True, help="checkout of NUS-HPC-AI-Lab/DATM")
    a = ap.parse_args()
    replaced = ("stubs: wandb, yacs; utils.get_dataset (fixed 4-class 3x8x8 set), utils.evaluate_synset (no "
                "training), utils.get_default_convnet_setting (width 16, depth 2), torch.Tensor.cuda (identity); "
                "torch.optim.SGD and torch.randperm wrapped to record")
    save_fixture("trajectory_matching", run_mtt(a.reference), reference=a.reference,
                 repo="GeorgeCazenavette/mtt-distillation", replaced=replaced)
    save_fixture("trajectory_matching_datm", run_datm(a.datm), reference=a.datm, repo="NUS-HPC-AI-Lab/DATM",
                 replaced=replaced + "; pix_init=real (samples_predicted_correctly needs cuda:0)")


if __name__ == "__main__":
    main()
