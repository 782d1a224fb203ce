"""Evaluation of several seeds at once (``eval.parallel_seeds=vmap``) against the same seeds one by one.

Both rows run :func:`lightning_dd.evaluate.evaluate_set` in this process on the same set, a random
real CIFAR-10 subset (``--ipc`` images per class from ``<data-dir>/cifar10/train``, normalized with
the usual CIFAR-10 mean/std), with the MTT/DATM protocol (SGD momentum 0.9, lr x0.1 at half, DSA per
batch) and the full real test set (or ``--test-per-class`` images per class). Printed: each row's
seconds, the ratio stacked / sequential (issue 18's goal: at most 0.5), and the per-seed test
accuracies of both (equal per seed, or a few test images apart: float32 reassociation in the
stacked kernels, see lightning_dd/evaluate/ensemble.py), plus the machine load before and after.

    python benchmarks/eval_seeds.py                                  # ConvNet-128, IPC 10, 5 seeds, 300 epochs
    python benchmarks/eval_seeds.py --width 64 --epochs 10 --test-per-class 200   # minutes on 2 CPU cores
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def read_subset(split_dir: Path, per_class: int | None, seed: int):
    """``per_class`` random images per class folder (all when ``None``) -> normalized ``x (N, 3, 32, 32)``,
    labels ``y (N,)`` (class index = position of the folder name in sorted order).

    Raises:
        FileNotFoundError: no class folders under ``split_dir``.
    """
    import numpy as np
    import torch
    from PIL import Image

    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir()) if split_dir.is_dir() else []
    if not classes:
        raise FileNotFoundError(f"no class folders under {split_dir} "
                                f"(expected <data-dir>/cifar10/{split_dir.name}/<class>/*.jpg)")
    g = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for c, name in enumerate(classes):
        files = sorted((split_dir / name).iterdir())
        if per_class is not None:
            files = [files[i] for i in torch.randperm(len(files), generator=g)[:per_class].tolist()]
        xs += [np.asarray(Image.open(f).convert("RGB")) for f in files]
        ys += [c] * len(files)
    x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).float() / 255.0
    mean, std = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    return (x - mean) / std, torch.tensor(ys)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shared = Path(__file__).resolve().parents[2] / "shared" / "data"
    ap.add_argument("--data-dir", default=os.environ.get("LDD_DATA_DIR", str(shared)))
    ap.add_argument("--width", type=int, default=128, help="ConvNet width (128: the evaluator's; 64: the CPU presets')")
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--num-eval", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--test-per-class", type=int, default=None, help="test images per class (default: all 1000)")
    ap.add_argument("--accelerator", default="auto", help="Lightning accelerator (auto: a GPU when there is one)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the sequential runs' ConvNets "
                    "(trainer.compile, on by default in the pipeline; the stacked run stays eager)")
    a = ap.parse_args()

    import torch

    from lightning_dd.augment.dsa import DSA
    from lightning_dd.core.trainer import TrainerFactory
    import yaml

    from lightning_dd.evaluate import evaluate_set
    from lightning_dd.evaluate.student import StudentSettings
    from lightning_dd.quiet import quiet_lightning

    quiet_lightning()
    root = Path(a.data_dir) / "cifar10"
    x, y = read_subset(root / "train", a.ipc, seed=0)
    xt, yt = read_subset(root / "test", a.test_per_class, seed=1)
    make = TrainerFactory(accelerator=a.accelerator, enable_progress_bar=False, compile=a.compile)
    defaults = yaml.safe_load((Path(__file__).resolve().parents[1] / "conf" / "eval" / "default.yaml").read_text())
    net = {"name": "ConvNet", "width": a.width}

    def run(mode: str, epochs: int, num_eval: int):
        t = time.perf_counter()
        settings = StudentSettings.model_validate({**defaults, "epochs": epochs, "batch_size": a.batch_size,
                                                   "num_eval": num_eval, "seed": 0, "augment": "dsa",
                                                   "parallel_seeds": mode})
        r = evaluate_set(x, y, xt, yt, 10, net, settings, lr=a.lr, dsa=DSA(), make_trainer=make)
        return r, time.perf_counter() - t

    load0 = os.getloadavg()
    run("sequential", 1, 1)  # warm-up: Lightning, allocator, kernels (and compilation with --compile)
    run("vmap", 1, 2)
    seq, t_seq = run("sequential", a.epochs, a.num_eval)
    vm, t_vm = run("vmap", a.epochs, a.num_eval)
    load1 = os.getloadavg()
    device = torch.cuda.get_device_name() if make.accelerator != "cpu" and torch.cuda.is_available() else "CPU"
    print(f"ConvNet-{a.width}, IPC {a.ipc} ({len(y)} CIFAR-10 images), {a.num_eval} seeds x {a.epochs} epochs, "
          f"batch {a.batch_size}, DSA, {len(yt)} test images; {device}, {torch.get_num_threads()} threads, "
          f"sequential compile={a.compile}")
    print(f"load average (1/5/15 min) before {load0[0]:.2f}/{load0[1]:.2f}/{load0[2]:.2f}, "
          f"after {load1[0]:.2f}/{load1[1]:.2f}/{load1[2]:.2f}")
    print(f"sequential ({a.num_eval} runs): {t_seq:8.1f} s")
    print(f"stacked (vmap)      : {t_vm:8.1f} s")
    print(f"ratio stacked / sequential: {t_vm / t_seq:.2f}  (goal <= 0.5)")
    n = len(yt)
    diffs = [round(abs(p - q) * n) for p, q in zip(seq.accs, vm.accs)]
    print("per-seed test accuracy (%):")
    print("  seed  sequential  stacked  |diff| (test images)")
    for i, (p, q, d) in enumerate(zip(seq.accs, vm.accs, diffs)):
        print(f"  {i:4d}  {100 * p:10.2f}  {100 * q:7.2f}  {d}")
    print(f"  mean  {100 * seq.mean:10.2f}  {100 * vm.mean:7.2f}  (std {100 * seq.std:.2f} / {100 * vm.std:.2f})")


if __name__ == "__main__":
    main()
