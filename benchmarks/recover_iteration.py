"""Seconds per statistics-matching recover iteration (SRe2L arXiv 2306.13092 Sec. 3.2; CDA; G-VBSM;
:mod:`lightning_dd.methods.images.statistics_matching.recover`) against its floor measured in the same run,
ratio printed.

The floor: one forward + backward of the teacher on the same batch (cross-entropy of its logits,
gradient to the images only, no hooks) -- what any recovery of that batch through that teacher must
compute per step. The recover iteration is the real thing, :func:`~.recover.recover_batch` (a
Lightning fit of :class:`~.recover.RecoverModule`), timed by a callback: the step (from
``on_train_batch_start`` to ``on_train_batch_end``: the augmented view, the forward with the BN
hooks, CE + BN losses, backward, Adam, the pixel clip) and the iteration (from one step's start to
the next: the step plus Lightning's loop). Each is the best of ``--repeat`` after one warm-up; the
floor is measured before and after the fit, best of both.

Configurations (the recover settings come from ``conf/``, so they follow the configs):

* ``sre2l_cifar10`` (default): the paper-size CIFAR-10 recovery, ``conf/method/sre2l.yaml`` +
  ``conf/experiment/sre2l_cifar10.yaml``: ResNet18BN teacher, batch 100, 3x32x32;
* ``statsmatch_cpu`` (default): the CPU preset (``conf/scale_preset/statsmatch_cifar10_cpu.yaml``):
  ConvNet-32-3 BN teacher, batch 100, crops 0.5-1 + flips;
* ``--quick``: ConvNet-8-2 BN, batch 10, 3x16x16 (seconds).

Teachers are randomly initialized (running statistics from two training-mode passes over noise):
the time of a step does not depend on the weights.

    python benchmarks/recover_iteration.py [--quick] [--threads 1] [--repeat 3]
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]


def recover_settings_of(*files_and_keys) -> dict:
    """The ``recover`` node merged from ``(yaml file, dotted key of its recover node)`` pairs, later
    ones overriding earlier ones."""
    from omegaconf import OmegaConf

    out = OmegaConf.create({})
    for f, key in files_and_keys:
        node = OmegaConf.select(OmegaConf.load(ROOT / f), key)
        if node is not None:
            out = OmegaConf.merge(out, node)
    return OmegaConf.to_container(out)


CONFIGS = {
    "sre2l_cifar10": dict(net={"name": "ResNet18BN"}, batch=100, size=32, recover=(
        ("conf/method/sre2l.yaml", "recover"), ("conf/experiment/sre2l_cifar10.yaml", "method.recover"))),
    "statsmatch_cpu": dict(net={"name": "ConvNet", "width": 32, "depth": 3, "norm": "batchnorm"}, batch=100, size=32,
                           recover=(("conf/method/sre2l.yaml", "recover"),
                                    ("conf/experiment/sre2l_cifar10.yaml", "method.recover"),
                                    ("conf/scale_preset/statsmatch_cifar10_cpu.yaml", "method.recover"),
                                    ("conf/scale_preset/sre2l_cifar10/cpu.yaml", "method.recover"))),
    "quick": dict(net={"name": "ConvNet", "width": 8, "depth": 2, "norm": "batchnorm"}, batch=10, size=16, recover=(
        ("conf/method/sre2l.yaml", "recover"), ("conf/experiment/sre2l_cifar10.yaml", "method.recover"),
        ("conf/scale_preset/statsmatch_cifar10_cpu.yaml", "method.recover"),
        ("conf/scale_preset/sre2l_cifar10/cpu.yaml", "method.recover"))),
}


def make_timer():
    """A Lightning callback recording ``perf_counter`` at every train batch's start and end."""
    from lightning.pytorch.callbacks import Callback

    class StepTimer(Callback):
        def __init__(self):
            self.starts, self.ends = [], []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.starts.append(time.perf_counter())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.ends.append(time.perf_counter())

    return StepTimer()


def run(name: str, cfg: dict, repeat: int) -> None:
    import torch
    import torch.nn.functional as F

    from lightning_dd.core.trainer import TrainerFactory
    from lightning_dd.methods.images.statistics_matching.config import RecoverConfig
    from lightning_dd.methods.images.statistics_matching.recover import recover_batch
    from lightning_dd.methods.images.statistics_matching.statistics import Backbone
    from lightning_dd.nets import build_net_cfg

    torch.manual_seed(0)
    k, c, s, bsz = 10, 3, cfg["size"], cfg["batch"]
    settings = recover_settings_of(*cfg["recover"])
    settings.update(iterations=1 + repeat, ckpt_every=1000)
    hp = RecoverConfig(**settings)
    teacher = build_net_cfg(cfg["net"], c, k, (s, s))
    with torch.no_grad():                       # non-trivial running statistics
        teacher.train()
        for _ in range(2):
            teacher(torch.randn(bsz, c, s, s))
    teacher.eval().requires_grad_(False)
    plain = copy.deepcopy(teacher)              # the floor's net: no statistics hooks
    backbones = [Backbone(teacher)]
    images = torch.randn(bsz, c, s, s) * hp.init_std
    labels = torch.arange(bsz) % k
    lo, hi = torch.full((c,), -2.5), torch.full((c,), 2.5)

    def floor():
        x = images.clone().requires_grad_()
        F.cross_entropy(plain(x), labels).backward()

    def best_floor():
        floor()
        ts = []
        for _ in range(repeat):
            t = time.perf_counter()
            floor()
            ts.append(time.perf_counter() - t)
        return min(ts)

    f0 = best_floor()
    timer = make_timer()
    recover_batch(images, labels, backbones, hp, lo, hi, seed=0, batch_index=0, ckpt_dir=None,
                  trainer=TrainerFactory(accelerator="cpu", enable_progress_bar=False), callbacks=[timer])
    f1 = best_floor()
    backbones[0].remove()
    t_floor = min(f0, f1)
    step = min(e - b for b, e in list(zip(timer.starts, timer.ends))[1:])
    it = min(b1 - b0 for b0, b1 in list(zip(timer.starts, timer.starts[1:]))[1:]) if len(timer.starts) > 2 else step
    net = cfg["net"].get("name") + "".join(f"-{cfg['net'][key]}" for key in ("width", "depth") if key in cfg["net"])
    print(f"{name}: {net} teacher, batch {bsz}, {c}x{s}x{s}, jitter {hp.jitter}, crop {list(hp.crop_scale)}, "
          f"flip {hp.flip}, r_bn {hp.r_bn}")
    print(f"  floor (teacher forward + backward, same batch)        {t_floor:.4f} s")
    print(f"  recover step (view, hooks, losses, backward, Adam)    {step:.4f} s | ratio {step / t_floor:.2f}x")
    print(f"  recover iteration (step + Lightning loop)             {it:.4f} s | ratio {it / t_floor:.2f}x")


def main(argv=None):
    import torch

    from lightning_dd.quiet import quiet_lightning

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="ConvNet-8 BN teacher, batch 10, 16x16 (seconds)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet_lightning()
    print(f"torch threads {args.threads}")
    for name in (["quick"] if args.quick else ["sre2l_cifar10", "statsmatch_cpu"]):
        run(name, CONFIGS[name], args.repeat)


if __name__ == "__main__":
    main()
