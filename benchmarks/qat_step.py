"""Time one QAT training step of a quantized ViT against one FP training step of the same ViT on the
same batch, in the same run, and print the ratio (target: under 2x).

Both steps: forward, cross-entropy (the QAT step: soft cross-entropy against fixed teacher logits,
so the teacher's forward is not counted), backward, AdamW update. The QAT step optionally adds the
bin regularizer (``--reg``, as in the last 75% of QAT). Each configuration runs ``--warmup`` steps,
then the median of ``--repeats`` steps is reported (interleaved FP / QAT rounds, so machine load
hits both alike).

    python benchmarks/qat_step.py                              # the CIFAR ViT (192 wide, depth 6), batch 128
    python benchmarks/qat_step.py --bits 2 --reg --batch 64
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def measure(dim: int = 192, depth: int = 6, heads: int = 3, patch: int = 4, size: int = 32, batch: int = 128,
            bits: int = 4, reg: bool = False, warmup: int = 2, repeats: int = 5, threads: int = 0,
            classes: int = 10, device: str = "cpu", peak: bool = True) -> dict:
    """Median seconds of one FP and one QAT training step (see the module doc) of a ViT
    (``dim`` wide, ``depth`` blocks, ``heads`` heads, ``patch``-pixel patches at ``size`` px,
    ``classes`` outputs) on one random batch of ``batch`` images, W``bits``A``bits``; on CUDA each
    step ends with a synchronize. Returns ``fp_s``, ``qat_s`` (seconds), ``ratio`` (QAT / FP),
    ``threads`` (torch threads) and, with ``peak``, the memory of one more QAT step: ``qat_peak_bytes``
    (its peak, the models, optimizer states and batch included) and ``qat_peak_above_bytes`` (that peak
    above the state before the step); CUDA: ``torch.cuda.max_memory_allocated``; CPU: the process's
    ``VmHWM``, reset through ``/proc/self/clear_refs``."""
    import torch
    import torch.nn.functional as F

    from lightning_dd.losses import soft_cross_entropy
    from lightning_dd.methods.quantization.qat_vit.model import calibrate, quantize_vit, quantized_layers
    from lightning_dd.methods.quantization.qat_vit.regularizer import bin_regularizer
    from lightning_dd.nets.vit import ViT

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    dev = torch.device(device)
    fp = ViT(3, classes, (size, size), patch, embed_dim=dim, depth=depth, num_heads=heads).to(dev)
    x = torch.randn(batch, 3, size, size, device=dev)
    y = torch.randint(0, classes, (batch,), device=dev)
    q = calibrate(quantize_vit(fp, bits).to(dev), x).train()
    fp.train()
    with torch.no_grad():
        target = fp(x)
    layers = list(quantized_layers(q).values())
    opt_fp = torch.optim.AdamW(fp.parameters(), 1e-4)
    opt_q = torch.optim.AdamW(q.parameters(), 1e-4)

    def fp_step():
        loss = F.cross_entropy(fp(x), y)
        opt_fp.zero_grad(set_to_none=True)
        loss.backward()
        opt_fp.step()

    def qat_step():
        loss = soft_cross_entropy(q(x), target)
        if reg:
            loss = loss + 0.01 * sum(bin_regularizer(m.weight, m.wq.step, m.wq.qn, m.wq.qp, m.wq.grad_factor(m.weight))
                                     for m in layers)
        opt_q.zero_grad(set_to_none=True)
        loss.backward()
        opt_q.step()

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        fp_step()
        qat_step()
    t_fp, t_q = [], []
    for _ in range(repeats):
        for fn, times in ((fp_step, t_fp), (qat_step, t_q)):
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
    out = {"fp_s": statistics.median(t_fp), "qat_s": statistics.median(t_q),
           "ratio": statistics.median(t_q) / statistics.median(t_fp), "threads": torch.get_num_threads()}
    if not peak:
        return out
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        qat_step()
        sync()
        peak_bytes = torch.cuda.max_memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux >= 4.0)
        base = _status_kib("VmRSS") * 1024
        qat_step()
        peak_bytes = _status_kib("VmHWM") * 1024
    return {**out, "qat_peak_bytes": peak_bytes, "qat_peak_above_bytes": peak_bytes - base}


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {key}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=192)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--patch", type=int, default=4)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--reg", action="store_true", help="add the bin regularizer to the QAT loss")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args()

    r = measure(args.dim, args.depth, args.heads, args.patch, args.size, args.batch, args.bits, args.reg,
                args.warmup, args.repeats, args.threads, peak=False)
    a, b = r["fp_s"], r["qat_s"]
    print(f"ViT dim {args.dim} depth {args.depth} patch {args.patch} at {args.size}px, batch {args.batch}, "
          f"W{args.bits}A{args.bits}{' + bin regularizer' if args.reg else ''}, {r['threads']} threads")
    print(f"FP step  {a * 1000:8.1f} ms (median of {args.repeats})")
    print(f"QAT step {b * 1000:8.1f} ms (median of {args.repeats})")
    print(f"ratio QAT / FP: {b / a:.2f}x (target < 2x)")


if __name__ == "__main__":
    main()
