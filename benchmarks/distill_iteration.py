"""Time one trajectory-matching iteration and the peak memory of the unrolled student.

Prints, for each meta-gradient mode, the seconds per iteration beside the floor: ``syn_steps``
plain training steps (forward, backward, SGD update; ``nn.Module``, no meta-gradient) of the same
network on the same batch size, measured in the same run. Peak memory is the growth of the
process's peak resident memory over one iteration (CPU) or ``torch.cuda.max_memory_allocated``
(GPU), each configuration in a fresh subprocess so peaks do not mix.

    python benchmarks/distill_iteration.py                       # IPC 10, syn_steps 20, width 128
    python benchmarks/distill_iteration.py --memory-steps 20 40 80 --modes unroll recompute

Modes: ``unroll`` (the default, graph of all steps), ``recompute`` (exact constant-memory
meta-gradient), ``recompute+compile`` (the same with torch.compile'd per-step functions).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(mode: str, width: int, ipc: int, syn_steps: int, batch_syn: int, repeats: int, device: str) -> dict:
    """One configuration, in this process: peak memory of the first iteration, then mean time."""
    import torch

    from lightning_dd.augment.dsa import DSA
    from lightning_dd.methods.meta_grad import StudentFunctions, StudentStep, matching_loss_and_grads
    from lightning_dd.nets import FlatParams, build_net

    torch.manual_seed(0)
    dev = torch.device(device)
    k = 10
    net = build_net("ConvNet", 3, k, (32, 32), width=width, depth=3).to(dev)
    n = ipc * k
    images = torch.randn(n, 3, 32, 32, device=dev, requires_grad=True)
    labels = torch.randn(n, k, device=dev, requires_grad=True)
    dsa = DSA()

    if mode == "floor":
        opt = torch.optim.SGD(net.parameters(), lr=0.01)
        x, y = images.detach()[:batch_syn], labels.detach()[:batch_syn].softmax(1)

        def once():
            for _ in range(syn_steps):
                loss = torch.nn.functional.cross_entropy(net(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
    else:
        flat = FlatParams(net)
        fns = StudentFunctions(flat, compile=mode.endswith("+compile"))
        theta0 = flat.flatten()
        target = theta0 + 0.01 * torch.randn_like(theta0)
        lr = torch.tensor(0.01, device=dev, requires_grad=True)
        g = torch.Generator().manual_seed(0)

        def once():
            steps = [StudentStep(torch.randperm(n, generator=g)[:batch_syn].to(dev),
                                 dsa.sample(batch_syn, (32, 32), generator=g, device=dev)) for _ in range(syn_steps)]
            images.grad = labels.grad = lr.grad = None
            matching_loss_and_grads(fns, images, labels, lr, theta0, target, steps, dsa,
                                    mode=mode.split("+")[0])

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    warm = 2 if mode.endswith("+compile") else 0  # compile happens in the first calls
    for _ in range(warm):
        once()
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _peak_bytes()
    t0 = time.perf_counter()
    once()
    sync()
    first = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() if dev.type == "cuda" else _peak_bytes()) - base
    times = [first] if (warm or not repeats) else []
    for _ in range(repeats):
        t0 = time.perf_counter()
        once()
        sync()
        times.append(time.perf_counter() - t0)
    return {"mode": mode, "syn_steps": syn_steps, "seconds": min(times), "peak_mib": peak / 2**20}


def run_isolated(**kw) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps(kw)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--syn-steps", type=int, default=20)
    ap.add_argument("--batch-syn", type=int, default=100)
    ap.add_argument("--modes", nargs="*", default=["unroll", "recompute", "recompute+compile"])
    ap.add_argument("--memory-steps", nargs="*", type=int, default=[20, 40, 80],
                    help="syn_steps values for the memory comparison of unroll vs recompute")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cuda" if _cuda() else "cpu")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(measure(**json.loads(a.child))))
        return
    common = dict(width=a.width, ipc=a.ipc, batch_syn=a.batch_syn, repeats=a.repeats, device=a.device)
    print(f"device={a.device} ConvNet-{a.width} IPC {a.ipc} batch_syn {a.batch_syn} syn_steps {a.syn_steps}")
    floor = run_isolated(mode="floor", syn_steps=a.syn_steps, **common)
    print(f"{'floor (' + str(a.syn_steps) + ' plain steps)':28s} {floor['seconds']:8.2f} s   1.00x")
    for mode in a.modes:
        r = run_isolated(mode=mode, syn_steps=a.syn_steps, **common)
        print(f"{mode:28s} {r['seconds']:8.2f} s  {r['seconds'] / floor['seconds']:5.2f}x floor   "
              f"peak +{r['peak_mib']:.0f} MiB")
    if a.memory_steps:
        print("\npeak memory of one iteration (MiB) vs syn_steps:")
        print(f"{'syn_steps':>10s} " + " ".join(f"{m:>12s}" for m in ("unroll", "recompute")))
        seen: dict[str, list[tuple[int, float]]] = {"unroll": [], "recompute": []}
        for s in a.memory_steps:
            row = []
            for m in ("unroll", "recompute"):
                need = _extrapolate(seen[m], s)
                if need is not None and need > 0.8 * _available_mib():
                    row.append(f"skip (~{need / 1024:.0f} GiB)")  # would not fit in this machine's memory
                    continue
                peak = run_isolated(mode=m, syn_steps=s, **{**common, "repeats": 0})["peak_mib"]
                seen[m].append((s, peak))
                row.append(f"{peak:.0f}")
            print(f"{s:>10d} " + " ".join(f"{v:>12s}" for v in row), flush=True)


def _extrapolate(points: list[tuple[int, float]], steps: int) -> float | None:
    """Linear extrapolation of peak MiB to ``steps`` from the measured ``(steps, MiB)`` points."""
    if len(points) < 2:
        return None
    (s0, m0), (s1, m1) = points[-2], points[-1]
    return m1 + (m1 - m0) / (s1 - s0) * (steps - s1)


def _available_mib() -> float:
    """MemAvailable from /proc/meminfo (Linux); infinity elsewhere."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("inf")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
