"""Time one trajectory-matching iteration and its peak memory, against a reference-style loop.

Rows (each measured in a fresh subprocess, so peaks do not mix):

* ``reference-style``: the loop as the reference MTT/DATM code writes it, written here (not
  copied): a ConvNet run functionally on ONE flat parameter vector (split into views per layer,
  like the reference ``ReparamModule``), DSA from :mod:`lightning_dd.augment`, a Python list with
  the parameter vector of every step, and ``torch.autograd.grad`` of the normalized matching loss
  at the end. Its parameters start as the ConvNet's, and its logits are checked to equal the
  ConvNet's before timing.
* ``unroll``, ``recompute``, ``recompute+compile``: :func:`matching_loss_and_grads` in that mode.
* ``auto``: the default ``method.meta_grad=auto``, resolved by the same rule as a run
  (:func:`lightning_dd.methods.images.meta_grad.resolve_meta_grad`); the row names what it picked.
* ``floor`` (only with ``--rows``): ``syn_steps`` plain training steps (forward, backward, SGD).

Each row prints seconds per iteration (the fastest of ``--iters`` iterations, after two warm-up
iterations for compiled rows; the one-time compile is printed), its ratio to the reference-style
row, and the peak memory of one iteration above the state before it (CPU: the process's peak
resident memory, ``VmHWM``, reset through ``/proc/self/clear_refs`` just before the iteration;
CUDA: ``torch.cuda.max_memory_allocated``), plus the whole child process's peak (``ru_maxrss``).
A row whose unrolled graph is predicted (:func:`unroll_memory_bytes`) not to fit in
``MEMORY_MARGIN`` of the free memory is skipped with the reason; ratios then use the reference
row's time scaled from the first ``--syn-steps`` value (linear in steps) and its memory
extrapolated the same way (or predicted), marked ``est.``. The issue's targets for the default
row (<= 0.55x the reference time, <= 1/5 of its peak memory) are printed as PASS/FAIL.

    python benchmarks/distill_iteration.py          # ConvNet-128, IPC 10, batch_syn 100, syn_steps 20 and 80
    python benchmarks/distill_iteration.py --width 16 --syn-steps 3 --iters 1      # a quick look
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

ROWS = ("reference-style", "unroll", "recompute", "recompute+compile", "auto")
UNROLLED = ("reference-style", "unroll")  # rows whose memory grows with syn_steps
TIME_TARGET, MEMORY_TARGET = 0.55, 1 / 5  # the default row vs the reference-style row (issue 18)
K, CH, HW = 10, 3, 32  # CIFAR-10-shaped synthetic set


# --- the reference-style loop ----------------------------------------------------------------------

def reference_forward(flat, x, shapes: list[tuple[str, tuple]], depth: int):
    """ConvNet (instancenorm, relu, avgpool) on the flat parameter vector ``flat (P,)``;
    ``shapes`` = ``(name, shape)`` of each parameter in order; ``x (B, C, H, W)`` -> ``(B, K)``."""
    import torch.nn.functional as F

    params, i = [], 0
    for _, shape in shapes:  # views into the one vector, as ReparamModule's unflatten
        n = 1
        for s in shape:
            n *= s
        params.append(flat[i:i + n].view(shape))
        i += n
    for d in range(depth):
        w, b, gw, gb = params[4 * d: 4 * d + 4]
        x = F.conv2d(x, w, b, padding=1)
        x = F.group_norm(x, w.shape[0], gw, gb)
        x = F.avg_pool2d(F.relu(x), 2)
    return F.linear(x.flatten(1), params[-2], params[-1])


def reference_iteration(theta0, target, images, labels, syn_lr, batches, dsa, shapes, depth):
    """One iteration as the reference code writes it; returns ``(loss, (d images, d labels, d lr))``."""
    import torch
    import torch.nn.functional as F

    student_params = [theta0.detach().clone().requires_grad_(True)]
    for idx, aug in batches:
        x = dsa(images[idx], aug)
        out = reference_forward(student_params[-1], x, shapes, depth)
        ce = F.cross_entropy(out, F.softmax(labels[idx], 1))
        grad = torch.autograd.grad(ce, student_params[-1], create_graph=True)[0]
        student_params.append(student_params[-1] - syn_lr * grad)
    loss = (student_params[-1] - target).pow(2).sum() / (theta0 - target).pow(2).sum()
    return loss.detach(), torch.autograd.grad(loss, [images, labels, syn_lr])


# --- one row in this process -----------------------------------------------------------------------

def _setup(width: int, ipc: int, batch_syn: int, device: str):
    import torch

    from lightning_dd.augment.dsa import DSA
    from lightning_dd.nets import FlatParams, build_net

    torch.manual_seed(0)
    dev = torch.device(device)
    net = build_net("ConvNet", CH, K, (HW, HW), width=width, depth=3).to(dev)
    flat = FlatParams(net)
    n = ipc * K
    images = torch.randn(n, CH, HW, HW, device=dev, requires_grad=True)
    labels = (3 * torch.randn(n, K, device=dev)).requires_grad_(True)
    theta0 = flat.flatten()
    target = theta0 + 0.01 * torch.randn_like(theta0)
    lr = torch.tensor(0.01, device=dev, requires_grad=True)
    return dict(torch=torch, dev=dev, net=net, flat=flat, n=n, images=images, labels=labels, theta0=theta0,
                target=target, lr=lr, dsa=DSA(), batch=min(batch_syn, n))


def _sampler(s: dict, syn_steps: int):
    """Batches of the module's kind: chunks of a random permutation, fresh DSA parameters."""
    torch, g = s["torch"], s["torch"].Generator().manual_seed(0)

    def draw():
        out, chunks = [], []
        for _ in range(syn_steps):
            if not chunks:
                chunks = list(torch.randperm(s["n"], generator=g).split(s["batch"]))
            idx = chunks.pop()
            out.append((idx.to(s["dev"]), s["dsa"].sample(len(idx), (HW, HW), generator=g, device=s["dev"])))
        return out
    return draw


def predict(width: int, ipc: int, syn_steps: int, batch_syn: int, device: str) -> dict:
    """Predicted extra bytes of the two unrolled rows and the free memory of ``device``."""
    from lightning_dd.methods.images.meta_grad import (UNROLL_OVERHEAD, StudentFunctions, StudentStep,
                                                available_memory_bytes, saved_tensor_bytes, unroll_memory_bytes)

    s = _setup(width, ipc, batch_syn, device)
    (idx, aug), = _sampler(s, 1)()
    shapes = [(k, tuple(p.shape)) for k, p in s["net"].named_parameters()]
    theta = s["theta0"].detach().requires_grad_(True)

    def ref_step():
        import torch.nn.functional as F

        out = reference_forward(theta, s["dsa"](s["images"][idx], aug), shapes, 3)
        ce = F.cross_entropy(out, F.softmax(s["labels"][idx], 1))
        return theta - s["lr"] * s["torch"].autograd.grad(ce, theta, create_graph=True)[0]

    return {"reference-style": int(UNROLL_OVERHEAD * (syn_steps + 1) * saved_tensor_bytes(ref_step)),
            "unroll": unroll_memory_bytes(StudentFunctions(s["flat"]), s["images"], s["labels"], s["lr"],
                                          StudentStep(idx, aug), s["dsa"], syn_steps),
            "available": available_memory_bytes(s["dev"])}


def _iteration_peak_start(torch, dev) -> int:
    """Reset the peak counter; returns the baseline (bytes in use now)."""
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux >= 4.0)
    return _status_kib("VmRSS") * 1024


def _iteration_peak(torch, dev) -> int:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return _status_kib("VmHWM") * 1024


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {key}")


def measure(row: str, width: int, ipc: int, syn_steps: int, batch_syn: int, iters: int, device: str) -> dict:
    """One row, in this process: warm-up (compiled rows), then ``iters`` timed iterations, the
    first of which also gives the peak memory."""
    from lightning_dd.methods.images.meta_grad import (StudentFunctions, StudentStep, compile_verified,
                                                matching_loss_and_grads, resolve_meta_grad, unroll_memory_bytes)

    s = _setup(width, ipc, batch_syn, device)
    torch, dev, draw = s["torch"], s["dev"], _sampler(s, syn_steps)
    images, labels, lr, theta0, target, dsa = (s[k] for k in ("images", "labels", "lr", "theta0", "target", "dsa"))
    label, compiled = row, False
    if row == "reference-style":
        shapes = [(k, tuple(p.shape)) for k, p in s["net"].named_parameters()]
        with torch.no_grad():
            x = images[:4].detach()
            assert torch.allclose(reference_forward(theta0, x, shapes, 3), s["net"](x), atol=1e-4), \
                "the reference-style forward differs from the ConvNet"

        def once():
            reference_iteration(theta0, target, images, labels, lr, draw(), dsa, shapes, 3)
    elif row == "floor":
        opt = torch.optim.SGD(s["net"].parameters(), lr=0.01)

        def once():
            for idx, aug in draw():
                loss = torch.nn.functional.cross_entropy(s["net"](dsa(images[idx].detach(), aug)),
                                                         labels[idx].detach().softmax(1))
                opt.zero_grad()
                loss.backward()
                opt.step()
    else:
        if row == "auto":
            idx, aug = draw()[0]
            choice = resolve_meta_grad("auto", None, compile_verified(s["net"], (CH, HW, HW)),
                                       lambda: unroll_memory_bytes(StudentFunctions(s["flat"]), images, labels, lr,
                                                                   StudentStep(idx, aug), dsa, syn_steps), dev)
            mode, compiled, label = choice.mode, choice.compile, f"auto -> {choice.label}"
        else:
            mode, compiled = row.split("+")[0], row.endswith("+compile")
        fns = StudentFunctions(s["flat"], compile=compiled)

        def once():
            steps = [StudentStep(idx, aug) for idx, aug in draw()]
            images.grad = labels.grad = lr.grad = None
            matching_loss_and_grads(fns, images, labels, lr, theta0, target, steps, dsa, mode=mode)

    def timed():
        t0 = time.perf_counter()
        once()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    warm = sum(timed() for _ in range(2 if compiled else 0))  # the first calls compile
    base = _iteration_peak_start(torch, dev)
    times = [timed()]
    peak = _iteration_peak(torch, dev) - base
    times += [timed() for _ in range(iters - 1)]
    return {"row": row, "label": label, "seconds": min(times), "warmup_s": warm, "peak_bytes": peak,
            "process_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


# --- the table -------------------------------------------------------------------------------------

def child(what: str, **kw) -> dict:
    """Run ``measure`` (``what`` = a row) or ``predict`` in a fresh Python process."""
    cmd = [sys.executable, __file__, "--child", json.dumps({"what": what, **kw})]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{what}: child failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB"


def table(a, steps: int, first: dict | None) -> dict:
    """Measure and print the rows at ``syn_steps=steps``; ``first`` = the reference row measured at
    the first ``--syn-steps`` (for estimates). Returns the reference row (measured or estimated)."""
    from lightning_dd.methods.images.meta_grad import MEMORY_MARGIN

    common = dict(width=a.width, ipc=a.ipc, syn_steps=steps, batch_syn=a.batch_syn, device=a.device)
    print(f"\n== device={a.device} ConvNet-{a.width} IPC {a.ipc} batch_syn {a.batch_syn} syn_steps {steps}, "
          f"soft labels, DSA, {a.iters} timed iteration(s) per row", flush=True)
    need = child("predict", **common) if any(r in UNROLLED for r in a.rows) else {}
    have = need.get("available")
    res: dict[str, dict] = {}
    for row in a.rows:
        if row in UNROLLED and have is not None and need[row] > MEMORY_MARGIN * have:
            print(f"{row:30s} skipped: predicted {gib(need[row])} > {MEMORY_MARGIN:.0%} of {gib(have)} free",
                  flush=True)
            continue
        res[row] = child(row, iters=a.iters, **common)
        r = res[row]
        print(f"{r['label']:30s} measured {r['seconds']:8.2f} s   peak +{gib(r['peak_bytes'])}", flush=True)
    ref, est = res.get("reference-style"), ""
    if ref is None and first is not None and "reference-style" in a.rows:
        scale = steps / first["steps"]
        mem = first["peak_bytes"] * (steps + 1) / (first["steps"] + 1)
        ref, est = {"seconds": first["seconds"] * scale, "peak_bytes": mem}, " est."
        print(f"(reference-style row estimated: {first['seconds']:.2f} s x {steps}/{first['steps']} = "
              f"{ref['seconds']:.2f} s, "
              f"{gib(first['peak_bytes'])} x {steps + 1}/{first['steps'] + 1} = {gib(mem)}; predicted "
              f"{gib(need['reference-style'])})")
    print(f"\n{'row':30s} {'s/iter':>8s} {'vs ref':>8s} {'peak memory':>12s} {'vs ref':>8s} {'process peak':>13s}"
          f" {'compile+warm-up':>16s}")
    if ref is not None:
        pp = gib(ref["process_peak_bytes"]) if "process_peak_bytes" in ref else ""
        print(f"{'reference-style' + (' (est.)' if est else ''):30s} {ref['seconds']:8.2f} {'1.00':>8s} "
              f"{'+' + gib(ref['peak_bytes']):>12s} {'1.00':>8s} {pp:>13s}")
    for row, r in res.items():
        if row == "reference-style":
            continue
        t = f"{r['seconds'] / ref['seconds']:.2f}" if ref else "-"
        m = f"{r['peak_bytes'] / ref['peak_bytes']:.3f}" if ref else "-"
        w = f"{r['warmup_s']:.0f} s" if r["warmup_s"] else ""
        print(f"{r['label']:30s} {r['seconds']:8.2f} {t:>8s} {'+' + gib(r['peak_bytes']):>12s} {m:>8s} "
              f"{gib(r['process_peak_bytes']):>13s} {w:>16s}")
    if "auto" in res and ref is not None:
        r = res["auto"]
        tr, mr = r["seconds"] / ref["seconds"], r["peak_bytes"] / ref["peak_bytes"]
        print(f"default (auto) time   {tr:.2f}x reference{est} (target <= {TIME_TARGET}): "
              f"{'PASS' if tr <= TIME_TARGET else 'FAIL'}")
        print(f"default (auto) memory {mr:.3f}x reference{est} (target <= {MEMORY_TARGET:.2f}): "
              f"{'PASS' if mr <= MEMORY_TARGET else 'FAIL'}", flush=True)
    if "reference-style" in res:
        return {**res["reference-style"], "steps": steps}
    return first


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--syn-steps", type=int, nargs="+", default=[20, 80])
    ap.add_argument("--iters", type=int, default=2, help="timed iterations per row (the fastest is shown)")
    ap.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--batch-syn", type=int, default=100)
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=[*ROWS, "floor"])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        kw = json.loads(a.child)
        what = kw.pop("what")
        print(json.dumps(predict(**kw) if what == "predict" else measure(what, **kw)))
        return
    if a.iters < 1:
        ap.error("--iters must be at least 1")
    if a.device is None:
        import torch

        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    first = None
    for steps in a.syn_steps:
        first = table(a, steps, first)


if __name__ == "__main__":
    main()
