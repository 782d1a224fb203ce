"""Student-evaluator throughput (training images per second) against a plain PyTorch loop.

Both train the same fresh network on the same in-memory set with the same optimizer, schedule,
augmentation and batch size, in the same process; the ratio is Lightning's (and our module's)
overhead. Goal: under 10%.

    python benchmarks/evaluator_throughput.py                    # ConvNet-128, 100 images (IPC 10), DSA
    python benchmarks/evaluator_throughput.py --net AlexNet --ipc 50 --augment none
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    import lightning as L
    import torch
    import torch.nn.functional as F

    from lightning_dd.augment.dsa import DSA
    from lightning_dd.data.batches import batch_loader
    from lightning_dd.evaluate.student import StudentModule, make_augment
    from lightning_dd.nets import build_net
    from lightning_dd.quiet import quiet_lightning

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--net", default="ConvNet")
    ap.add_argument("--width", type=int, default=128, help="ConvNet width")
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--augment", default="dsa", choices=["dsa", "crop_flip", "none"])
    ap.add_argument("--repeats", type=int, default=3, help="alternating repeats; the best of each is kept")
    a = ap.parse_args()
    quiet_lightning()
    torch.manual_seed(0)
    n = 10 * a.ipc
    x, y = torch.randn(n, 3, 32, 32), torch.arange(n) % 10
    kw = {"width": a.width} if a.net == "ConvNet" else {}
    dsa = DSA()
    steps = a.epochs * -(-n // a.batch_size)

    def plain() -> float:
        L.seed_everything(0, verbose=False)
        net = build_net(a.net, 3, 10, (32, 32), **kw)
        aug = make_augment(a.augment, dsa, (32, 32))
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[steps // 2], gamma=0.1)
        t = time.perf_counter()
        for xb, yb in batch_loader(x, y, a.batch_size, epochs=a.epochs, seed=0):
            if aug is not None:
                xb = aug(xb)
            loss = F.cross_entropy(net(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        return time.perf_counter() - t

    def evaluator() -> float:
        L.seed_everything(0, verbose=False)
        net = build_net(a.net, 3, 10, (32, 32), **kw)
        module = StudentModule(net, 0.01, steps, 10, augment=make_augment(a.augment, dsa, (32, 32)))
        trainer = L.Trainer(max_steps=steps, max_epochs=1, accelerator="cpu", devices=1, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            num_sanity_val_steps=0)
        t = time.perf_counter()
        trainer.fit(module, batch_loader(x, y, a.batch_size, epochs=a.epochs, seed=0))
        return time.perf_counter() - t

    plain()  # warm-up (allocator, kernels)
    tp, te = [], []
    for _ in range(a.repeats):
        tp.append(plain())
        te.append(evaluator())
    images = steps * min(n, a.batch_size)
    p, e = min(tp), min(te)
    print(f"{a.net} ({a.width if a.net == 'ConvNet' else ''}) on {n} images, batch {a.batch_size}, {steps} steps, "
          f"augment={a.augment}, {torch.get_num_threads()} threads")
    print(f"plain PyTorch loop : {images / p:8.0f} images/s  ({p:.2f} s)")
    print(f"evaluator (Lightning): {images / e:6.0f} images/s  ({e:.2f} s)")
    print(f"overhead: {100 * (e / p - 1):+.1f}%  (goal < 10%)")


if __name__ == "__main__":
    main()
