"""Can evaluation seeds run side by side faster than one after another on this machine?

Times one student training step of the DATM evaluator (ConvNet of ``--width``, instance norm,
``--batch`` CIFAR-sized random images, a fresh DSA draw, cross-entropy, SGD with momentum), eager and
``torch.compile``-d, in three layouts, each in fresh processes:

* one process with 1 thread;
* one process with ``--cores`` threads (how the sequential evaluation of ``eval.num_eval`` seeds runs);
* ``--cores`` processes side by side with 1 thread each (seeds in parallel processes).

Printed: seconds per step of each process and the throughput (steps/s summed over the processes);
the ratio parallel / sequential throughput bounds what running seeds side by side can gain over
sequential runs (issue 18 asks for 5 seeds in at most 0.5x the time, i.e. a ratio of 2).

    python benchmarks/student_step_scaling.py                 # ConvNet-64, batch 100, 2 cores
    python benchmarks/student_step_scaling.py --width 128 --steps 20
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one(width: int, batch: int, steps: int, compiled: bool) -> float:
    """Seconds per training step in this process (after 5 warm-up steps)."""
    import torch

    sys.path.insert(0, str(ROOT))
    from lightning_dd.augment.dsa import DSA
    from lightning_dd.evaluate.student import make_augment, target_loss
    from lightning_dd.nets import build_net_cfg, maybe_compile

    torch.manual_seed(0)
    net = maybe_compile(build_net_cfg({"name": "ConvNet", "width": width}, 3, 10, (32, 32)), compiled)
    augment = make_augment("dsa", DSA())  # the evaluator's own per-batch DSA draw
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)

    def step():
        loss = target_loss(net(augment(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(5):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps


def launch(threads: int, a, compiled: bool) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, __file__, "--child", "--width", str(a.width), "--batch", str(a.batch),
           "--steps", str(a.steps)] + (["--compiled"] if compiled else [])
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(one(a.width, a.batch, a.steps, a.compiled))
        return
    print(f"ConvNet-{a.width}, batch {a.batch}, DSA, SGD; {a.steps} steps after 5 warm-up; load {os.getloadavg()[0]:.2f}")
    for compiled in (False, True):
        rows = {}
        for name, threads, procs in (("1 process x 1 thread", 1, 1), (f"1 process x {a.cores} threads", a.cores, 1),
                                     (f"{a.cores} processes x 1 thread", 1, a.cores)):
            ps = [launch(threads, a, compiled) for _ in range(procs)]
            secs = [float(p.communicate()[0].strip().splitlines()[-1]) for p in ps]
            rows[name] = sum(1 / s for s in secs)
            print(f"  {'compiled' if compiled else 'eager':8s} {name:26s} s/step {' + '.join(f'{s:.3f}' for s in secs):16s}"
                  f" throughput {rows[name]:.1f} steps/s")
        seq, par = rows[f"1 process x {a.cores} threads"], rows[f"{a.cores} processes x 1 thread"]
        print(f"  {'compiled' if compiled else 'eager':8s} parallel / sequential throughput = {par / seq:.2f} "
              f"(seeds side by side take {seq / par:.2f}x the sequential time; issue 18's target: <= 0.5)")


if __name__ == "__main__":
    main()
