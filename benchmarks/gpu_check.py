"""The first thing to run on a lent GPU: the figures the paper-size claims need, in under 8 minutes.

Sections (each in its own process, under its own time budget, a failing or overrunning one reported
while the others still run):

* ``distill_iteration``: one trajectory-matching iteration at paper size (ConvNet-128, IPC 10,
  batch_syn 100, syn_steps 80, soft labels, DSA) with the default ``method.meta_grad=auto``
  against the reference-style loop (one flat parameter vector, a list of every step's parameters,
  ``torch.autograd.grad`` at the end), both from ``benchmarks/distill_iteration.py`` (each row in a
  fresh process). Seconds per iteration (fastest of 2) and peak memory of one iteration above the
  state before it, the ratios default / reference and issue 18's targets (time <= 0.55x, memory
  <= 1/5) as PASS/FAIL.
* ``datm_cifar10``: ``python train.py experiment=datm_cifar10 method.iterations=50`` run in this
  process (Hydra compose + :func:`lightning_dd.runner.run`), in two runs: ``stage=experts``, then
  ``stage=distill`` (the experts from the cache) with the peak-memory counter reset in between.
  The experts are SHORT for the check: 1 expert x 5 epochs, not compiled (the paper: 100 x 100),
  so the start-epoch window is 2 -> 3 (the paper: 10 -> 20); the iteration's cost does not depend
  on the start epoch. Seconds per iteration: the median (and first, mean) of the run's logged
  ``distill/iter_seconds`` (one per iteration, ``csv/metrics.csv``) and ``timings/distill_s`` / 50;
  peak memory of the distillation run (CUDA: ``torch.cuda.max_memory_allocated``; CPU: ``VmHWM``).
* ``qat_step``: one QAT training step of DeiT-T (192 wide, 12 blocks, 3 heads, patch 16 at 224 px,
  1000 classes), W4A4 with the bin regularizer, batch 64, against one FP step of the same ViT
  (``benchmarks/qat_step.py``): median seconds of 5 steps after 2 warm-up steps, the ratio, and the
  peak memory during one more QAT step (models, optimizer states and batch included; also the
  part above the state before the step).
* ``gcond_epoch``: a GCond condensation epoch on Cora at the paper config (``conf/method/gcond.yaml``),
  structure and feature epochs against their floor (``benchmarks/graph_condensation_epoch.py``):
  seconds (best of 3), ratios, the process's peak memory.
* ``ddp``: a DDP smoke test on every visible GPU (``strategy=ddp``, one process per GPU, NCCL): a
  tiny trajectory-matching fit (``tests/ddp_worker.py``'s problem, one expert draw per rank, 5
  steps); checks that every rank ends with the same synthetic set and the same all-reduced
  gradient; seconds per step (rank 0) and rank 0's peak memory.

Every section records the device name (``torch.cuda.get_device_name``), the torch version, the CPU
model and thread counts, seconds per step (``sec_per_step``: what a step is, in ``step``) and peak
memory (``peak_memory_bytes``: what it counts, in ``peak_memory``), plus its own figures. All of it
goes to ``--out`` as JSON (default ``outputs/gpu_check/<time>.json``, rewritten after each
section), each section's output to ``<out without .json>/<section>.log``; exit status 1 when any
section fails or a figure is not finite.

    python benchmarks/gpu_check.py                    # on the lent GPU (< 8 min; data under $LDD_DATA_DIR)
    python benchmarks/gpu_check.py --only ddp qat_step
    python benchmarks/gpu_check.py --dry-run          # toy sizes on the CPU, < 2 min on 2 cores (CI)

``--dry-run``: the same code at toy size on the CPU (ConvNet-8, IPC 1, syn_steps 3; 100 CIFAR-10
images without ZCA and 1 expert x 3 epochs; a 2-block 48-wide ViT at 32 px; Cora with 4 x 3 loops;
DDP as 2 CPU processes over gloo); its figures say nothing about speed. The ``auto`` row is left
out there (on 32x32 images it compiles, minutes on a CPU): ``recompute`` (uncompiled) stands in, in
the datm run too (``method.meta_grad=recompute method.compile=false``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

SECTIONS = ("distill_iteration", "datm_cifar10", "qat_step", "gcond_epoch", "ddp")
# seconds per section on the GPU (sum 475 s: the whole check stays under 8 minutes) and in --dry-run
BUDGET_S = {"distill_iteration": 120, "datm_cifar10": 220, "qat_step": 35, "gcond_epoch": 45, "ddp": 55}
DRY_BUDGET_S = {"distill_iteration": 90, "datm_cifar10": 120, "qat_step": 60, "gcond_epoch": 60, "ddp": 90}
DATM_ITERATIONS = 50


def data_dir() -> Path:
    """``$LDD_DATA_DIR``, else ``../shared/data`` beside the checkout (as the tests read it)."""
    return Path(os.environ.get("LDD_DATA_DIR", ROOT.parent / "shared" / "data")).resolve()


# --- what this process runs on -----------------------------------------------------------------------

def environment() -> dict:
    """Device names (``torch.cuda.get_device_name`` of every visible GPU, else ``"cpu"``), torch /
    CUDA / Lightning / Python versions, the CPU model, logical CPUs (all and usable), torch's
    intra-op thread count, ``OMP_NUM_THREADS`` and the checkout's git commit."""
    import lightning
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"device": torch.cuda.get_device_name(0) if n_gpu else "cpu",
            "gpus": [torch.cuda.get_device_name(i) for i in range(n_gpu)],
            "torch": torch.__version__, "cuda": torch.version.cuda, "lightning": lightning.__version__,
            "python": platform.python_version(), "cpu_model": cpu, "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "git_commit": commit}


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {key}")


def reset_peak(cuda: bool) -> None:
    """Reset the peak counter read by :func:`read_peak` (CUDA: the allocator's; CPU: ``VmHWM``)."""
    import torch

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux >= 4.0)


def read_peak(cuda: bool) -> int:
    """Bytes: ``torch.cuda.max_memory_allocated()`` on CUDA, else this process's peak RSS (``VmHWM``)."""
    import torch

    if cuda:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _status_kib("VmHWM") * 1024


def peak_kind(cuda: bool) -> str:
    return "torch.cuda.max_memory_allocated" if cuda else "peak RSS (VmHWM)"


# --- the sections (each runs in a child process: python gpu_check.py --section NAME) ----------------

def section_distill_iteration(dry: bool, cuda: bool, work: Path, cache: Path) -> dict:
    """Reference-style loop against the default meta-gradient at ConvNet-128 / IPC 10 / syn_steps 80
    (``--dry-run``: ConvNet-8, IPC 1, syn_steps 3, the row recompute instead of auto)."""
    import distill_iteration as di
    from lightning_dd.methods.images.meta_grad import MEMORY_MARGIN

    device = "cuda" if cuda else "cpu"
    size = (dict(width=8, ipc=1, syn_steps=3, batch_syn=10) if dry
            else dict(width=128, ipc=10, syn_steps=80, batch_syn=100))
    rows = ("reference-style", "recompute") if dry else ("reference-style", "auto")
    default = "recompute" if dry else "auto"
    iters = 1 if dry else 2
    need = di.child("predict", device=device, **size)
    print(f"predicted unrolled memory: reference-style {need['reference-style'] / 2**30:.2f} GiB, unroll "
          f"{need['unroll'] / 2**30:.2f} GiB; free {need['available'] / 2**30:.2f} GiB", flush=True)
    res, skipped = {}, {}
    for row in rows:
        if row in di.UNROLLED and need[row] > MEMORY_MARGIN * need["available"]:
            skipped[row] = f"predicted {need[row]} bytes > {MEMORY_MARGIN:.0%} of {need['available']} free"
            print(f"{row}: skipped ({skipped[row]})", flush=True)
            continue
        res[row] = di.child(row, iters=iters, device=device, **size)
        r = res[row]
        print(f"{r['label']:30s} {r['seconds']:8.3f} s/iter   peak +{r['peak_bytes'] / 2**30:.3f} GiB   "
              f"(compile + warm-up {r['warmup_s']:.1f} s)", flush=True)
    ref, d = res.get("reference-style"), res[default]
    figures = {"size": size, "iters_timed": iters, "rows": res, "skipped": skipped,
               "predicted_bytes": need, "default_row": d["label"]}
    if ref is not None:
        figures["time_ratio"] = d["seconds"] / ref["seconds"]
        figures["memory_ratio"] = d["peak_bytes"] / ref["peak_bytes"]
        if not dry:
            figures["time_target"] = {"target": di.TIME_TARGET, "pass": figures["time_ratio"] <= di.TIME_TARGET}
            figures["memory_target"] = {"target": di.MEMORY_TARGET,
                                        "pass": figures["memory_ratio"] <= di.MEMORY_TARGET}
        print(f"default ({d['label']}) vs reference-style: time {figures['time_ratio']:.2f}x, "
              f"memory {figures['memory_ratio']:.3f}x", flush=True)
    return {"step": f"one distillation iteration ({size['syn_steps']} student steps), row {d['label']}",
            "sec_per_step": d["seconds"], "peak_memory_bytes": d["peak_bytes"],
            "peak_memory": f"{peak_kind(cuda)} of one iteration above the state before it (row {d['label']})",
            "figures": figures}


def _datm_overrides(dry: bool, cuda: bool) -> tuple[list[str], str]:
    """The overrides of ``python train.py experiment=datm_cifar10 ...`` and what they shorten."""
    o = {"experiment": "datm_cifar10", "method.iterations": DATM_ITERATIONS, "method.num_experts": 1,
         "method.expert_train_epochs": 5, "method.current_max_start_epoch": 2, "method.max_start_epoch": 3,
         "trainer.compile": "false", "logger.wandb.enabled": "false", "trainer.enable_progress_bar": "false"}
    note = ("experts shortened for the check: 1 expert x 5 epochs, not compiled (paper: 100 x 100), start-epoch "
            "window 2 -> 3 (paper: 10 -> 20); the distillation as conf/experiment/datm_cifar10.yaml (ConvNet-128, "
            "IPC 10, syn_steps 80, batch_syn 100, ZCA, the full training set, meta_grad auto)")
    if not cuda:
        o["trainer.accelerator"] = "cpu"
    if dry:
        o.update({"method.iterations": 3, "method.expert_train_epochs": 3, "method.current_max_start_epoch": 1,
                  "method.max_start_epoch": 2, "method.expert_batch": 50, "method.ipc": 1, "method.syn_steps": 3,
                  "method.batch_syn": 10, "method.meta_grad": "recompute", "method.compile": "false",
                  "net.width": 8, "data.train_per_class": 10, "data.zca": "false", "logger.image_every": 0})
        note = ("dry run: 100 CIFAR-10 images (no ZCA), ConvNet-8, IPC 1, syn_steps 3, 1 expert x 3 epochs, "
                "3 iterations, meta_grad recompute uncompiled")
    return [f"{k}={v}" for k, v in o.items()], note


def section_datm_cifar10(dry: bool, cuda: bool, work: Path, cache: Path) -> dict:
    """``datm_cifar10`` for 50 iterations (``stage=experts``, then ``stage=distill``)."""
    import csv

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from lightning_dd.runner import run

    overrides, note = _datm_overrides(dry, cuda)
    print(note, flush=True)
    def expert_files() -> set:
        return set((cache / "experts").glob("*/expert_*.pt"))

    before = expert_files()

    def one(stage: str) -> dict:
        GlobalHydra.instance().clear()
        with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("train", overrides=[*overrides, f"stage={stage}", f"paths.output_dir={work / stage}",
                                              f"paths.data_dir={data_dir()}", f"paths.cache_dir={cache}"])
        return run(cfg)

    t0 = time.perf_counter()
    m_exp = one("experts")
    experts_wall = time.perf_counter() - t0
    trained = len(expert_files() - before)  # 0: the experts came from the cache
    reset_peak(cuda)
    m = one("distill")
    peak = read_peak(cuda)
    rows = list(csv.DictReader((work / "distill" / "csv" / "metrics.csv").open()))
    its = [float(r["distill/iter_seconds"]) for r in rows if r.get("distill/iter_seconds")]
    n = int(m["distill/iterations"])
    if not its:
        raise RuntimeError("csv/metrics.csv has no distill/iter_seconds")
    figures = {"note": note, "overrides": overrides, "iterations": n, "iter_seconds_median": statistics.median(its),
               "iter_seconds_first": its[0], "iter_seconds_mean": statistics.mean(its),
               "iter_seconds_after_first_median": statistics.median(its[1:]) if len(its) > 1 else its[0],
               "distill_s_per_iteration": m["timings/distill_s"] / n, "distill_s": m["timings/distill_s"],
               "meta_grad_mode": m.get("distill/meta_grad_mode"), "experts_s": m_exp.get("timings/experts_s"),
               "experts_wall_s": experts_wall, "experts_trained_here": trained,
               "experts_test_acc_mean": m_exp.get("experts/test_acc_mean"), "data_s": m.get("timings/data_s"),
               "init_s": m.get("timings/init_s")}
    print(f"{n} iterations: median {figures['iter_seconds_median']:.3f} s/iter (first {its[0]:.2f} s), "
          f"distill_s/{n} = {figures['distill_s_per_iteration']:.3f} s; experts {experts_wall:.1f} s "
          f"({trained} trained here, the rest from the cache); meta_grad {figures['meta_grad_mode']}", flush=True)
    return {"step": f"one datm_cifar10 distillation iteration (median of the run's {len(its)} logged)",
            "sec_per_step": figures["iter_seconds_median"], "peak_memory_bytes": peak,
            "peak_memory": f"{peak_kind(cuda)} over the stage=distill run (counter reset after the experts)",
            "figures": figures}


def section_qat_step(dry: bool, cuda: bool, work: Path, cache: Path) -> dict:
    """One QAT DeiT-T step (W4A4 + bin regularizer) at batch 64 against one FP step."""
    import qat_step

    size = (dict(dim=48, depth=2, heads=3, patch=4, size=32, batch=8, classes=10, warmup=1, repeats=2) if dry
            else dict(dim=192, depth=12, heads=3, patch=16, size=224, batch=64, classes=1000, warmup=2, repeats=5))
    r = qat_step.measure(bits=4, reg=True, device="cuda" if cuda else "cpu", **size)
    print(f"FP step {r['fp_s'] * 1e3:.1f} ms, QAT step {r['qat_s'] * 1e3:.1f} ms, ratio {r['ratio']:.2f}x "
          f"(target < 2x); QAT step peak {r['qat_peak_bytes'] / 2**30:.3f} GiB "
          f"(+{r['qat_peak_above_bytes'] / 2**30:.3f} GiB above the state before it)", flush=True)
    return {"step": f"one QAT training step (ViT {size['dim']} wide, depth {size['depth']}, patch "
                    f"{size['patch']} at {size['size']} px, batch {size['batch']}, W4A4 + bin regularizer; "
                    f"median of {size['repeats']})",
            "sec_per_step": r["qat_s"], "peak_memory_bytes": r["qat_peak_bytes"],
            "peak_memory": f"{peak_kind(cuda)} during one QAT step (models, optimizer states, batch included)",
            "figures": {"size": size, "bits": 4, "reg": True, **r, "ratio_target": 2.0, "pass": r["ratio"] < 2.0}}


def section_gcond_epoch(dry: bool, cuda: bool, work: Path, cache: Path) -> dict:
    """A GCond epoch on Cora (paper config; ``--dry-run``: 4 outer x 3 inner loops)."""
    import graph_condensation_epoch as gce

    from lightning_dd.data.graphs import GraphDataModule

    dm = GraphDataModule("cora", root=str(data_dir() / "planetoid"))
    dm.setup()
    r = gce.method_epochs("gcond", dm.data, quick=dry, repeat=1 if dry else 3, device="cuda" if cuda else "cpu")
    hp, (mean, floor) = r["hp"], r["mean"]
    epochs = {k: {"method_s": a, "floor_s": b, "ratio": a / b} for k, (a, b) in r["epochs"].items()}
    for k, e in epochs.items():
        print(f"{k} epoch {e['method_s']:.3f} s | floor {e['floor_s']:.3f} s | ratio {e['ratio']:.2f}x", flush=True)
    print(f"mean epoch {mean:.3f} s -> {hp.epochs} epochs ~ {mean * hp.epochs / 60:.1f} min", flush=True)
    peak = read_peak(cuda) if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"step": f"one GCond epoch on Cora ({hp.outer_loop} outer x {hp.inner_loop} inner, "
                    f"{len(r['module'].y_syn)} synthetic nodes), mean over the structure/feature schedule",
            "sec_per_step": mean, "peak_memory_bytes": peak,
            "peak_memory": peak_kind(cuda) + " of the section's process",
            "figures": {"epochs": epochs, "mean_s": mean, "floor_mean_s": floor, "ratio_mean": mean / floor,
                        "setup_s": r["setup_s"], "paper_epochs": hp.epochs,
                        "estimated_total_min": mean * hp.epochs / 60, "nodes": int(dm.data.num_nodes)}}


def section_ddp(dry: bool, cuda: bool, work: Path, cache: Path) -> dict | None:
    """``strategy=ddp`` over every visible GPU (``--dry-run``: 2 CPU processes, gloo). Lightning
    relaunches this script once per extra rank; those ranks return ``None`` (only rank 0 reports)."""
    import functools

    import lightning as L
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from ddp_worker import SaveFirstGradient, tm_problem
    from lightning_dd.core.trainer import release_process_group
    from lightning_dd.data.batches import StepLoader

    n = 2 if dry or not cuda else torch.cuda.device_count()
    steps = 3 if dry else 5
    out = work / "ddp"
    out.mkdir(parents=True, exist_ok=True)

    class StepTimer(L.Callback):
        def __init__(self):
            self.times, self.t = [], 0.0

        def on_train_batch_start(self, trainer, module, batch, i):
            if cuda:
                torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, i):
            if cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.t)

    timer = StepTimer()
    module = tm_problem(n)
    trainer = L.Trainer(accelerator="gpu" if cuda else "cpu", devices=n, strategy="ddp", max_steps=steps,
                        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[SaveFirstGradient(out, "ddp"), timer])
    trainer.fit(module, StepLoader(steps, functools.partial(getattr, module, "global_step")))
    trainer.strategy.barrier()
    rank, world = trainer.global_rank, trainer.world_size
    peak = read_peak(cuda) if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    release_process_group()
    if rank != 0:
        return None
    got = [torch.load(out / f"ddp_rank{r}.pt", map_location="cpu", weights_only=False) for r in range(world)]
    same_set = all(torch.equal(g["set"][0], got[0]["set"][0]) and torch.equal(g["set"][1], got[0]["set"][1])
                   and g["set"][2] == got[0]["set"][2] for g in got)
    same_grad = all(torch.equal(g["grads"]["images"], got[0]["grads"]["images"]) for g in got)
    if not (same_set and same_grad) or any(g["world"] != n for g in got):
        raise RuntimeError(f"DDP ranks disagree: same set {same_set}, same gradient {same_grad}, "
                           f"worlds {[g['world'] for g in got]}")
    sec = statistics.median(timer.times[1:] or timer.times)
    print(f"{world} rank(s) ({'NCCL' if cuda else 'gloo'}): {len(timer.times)} steps, median {sec:.4f} s/step; "
          f"every rank holds the same set and gradient", flush=True)
    return {"step": f"one trajectory-matching step of the tiny DDP problem ({world} ranks, median after the first)",
            "sec_per_step": sec, "peak_memory_bytes": peak, "peak_memory": peak_kind(cuda) + " of rank 0",
            "figures": {"world_size": world, "backend": "nccl" if cuda else "gloo", "steps": len(timer.times),
                        "step_seconds": timer.times, "ranks_agree": True}}


FUNCTIONS = {"distill_iteration": section_distill_iteration, "datm_cifar10": section_datm_cifar10,
             "qat_step": section_qat_step, "gcond_epoch": section_gcond_epoch, "ddp": section_ddp}


def run_section_here(name: str, dry: bool, result: Path, work: Path, cache: Path) -> None:
    """Child side: run one section, write its dict (plus this process's environment) to ``result``."""
    import torch

    cuda = torch.cuda.is_available() and not dry
    t0 = time.perf_counter()
    r = FUNCTIONS[name](dry, cuda, work, cache)
    if r is None:  # a DDP rank other than 0
        return
    r["env"] = environment()
    r["section_wall_s"] = time.perf_counter() - t0
    r["process_peak_rss_bytes"] = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                                      resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) * 1024
    result.write_text(json.dumps(r, indent=1, default=str))


# --- the parent: one child per section, budgets, the JSON ---------------------------------------------

def _numbers(x, path=""):
    """Every int/float in ``x`` (nested dicts/lists) as ``(path, value)``."""
    if isinstance(x, bool):
        return
    if isinstance(x, (int, float)):
        yield path, x
    elif isinstance(x, dict):
        for k, v in x.items():
            yield from _numbers(v, f"{path}.{k}" if path else str(k))
    elif isinstance(x, (list, tuple)):
        for i, v in enumerate(x):
            yield from _numbers(v, f"{path}[{i}]")


def run_section(name: str, dry: bool, budget: float, work: Path, cache: Path) -> dict:
    """Run section ``name`` as ``python gpu_check.py --section NAME`` in its own process group, killed
    (with everything it started) after ``budget`` seconds; returns its dict with ``ok``, ``wall_s``,
    ``budget_s``, ``log`` and, when it failed, ``error``."""
    result, log = work / f"{name}.json", work / f"{name}.log"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--section", name, "--result", str(result),
           "--work", str(work), "--cache-dir", str(cache), *(["--dry-run"] if dry else [])]
    t0 = time.perf_counter()
    with log.open("w") as f:
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc, error = p.wait(timeout=budget), None
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)  # the section and whatever it started (its process group)
            p.wait()
            rc, error = None, f"over its budget of {budget:.0f} s (killed)"
    wall = time.perf_counter() - t0
    out = {"ok": False, "wall_s": wall, "budget_s": budget, "log": str(log)}
    if error is None and rc != 0:
        error = f"exit status {rc}"
    if error is None and not result.is_file():
        error = "no result written"
    if error is None:
        out.update(json.loads(result.read_text()))
        bad = [p for p, v in _numbers({k: out.get(k) for k in ("sec_per_step", "peak_memory_bytes", "figures")})
               if not math.isfinite(v)]
        if bad or not out.get("sec_per_step", 0) > 0 or not out.get("peak_memory_bytes", 0) > 0:
            error = f"figures not finite or not positive: {bad or ['sec_per_step / peak_memory_bytes']}"
    if error is not None:
        out["error"] = error
        tail = log.read_text(errors="replace").splitlines()[-30:]
        out["log_tail"] = "\n".join(tail)
    else:
        out["ok"] = True
    return out


def _gib(b) -> str:
    return f"{b / 2**30:.3f} GiB"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU (CI; < 2 min on 2 cores)")
    ap.add_argument("--out", type=Path, default=None, help="JSON file (default outputs/gpu_check/<time>.json)")
    ap.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="sections to run")
    ap.add_argument("--budget", nargs="+", default=[], metavar="SECTION=SECONDS", help="override a section's budget")
    ap.add_argument("--cache-dir", type=Path, default=None,
                    help="decoded data, ZCA and expert cache (default: the runs' own, $LDD_CACHE_DIR or "
                         ".cache/lightning_dd; experts found there are reused and counted in the JSON)")
    ap.add_argument("--section", choices=SECTIONS, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.section:
        run_section_here(a.section, a.dry_run, a.result, a.work, a.cache_dir)
        return 0

    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    out = (a.out or ROOT / "outputs" / "gpu_check" / f"{stamp}.json").resolve()
    work = out.with_suffix("")
    work.mkdir(parents=True, exist_ok=True)
    cache = (a.cache_dir or Path(os.environ.get("LDD_CACHE_DIR", ROOT / ".cache" / "lightning_dd"))).resolve()
    budgets = dict(DRY_BUDGET_S if a.dry_run else BUDGET_S)
    for b in a.budget:
        k, v = b.split("=")
        if k not in budgets:
            ap.error(f"--budget: unknown section {k!r}")
        budgets[k] = float(v)
    env = environment()
    print(f"gpu_check{' --dry-run' if a.dry_run else ''}: device {env['device']} ({len(env['gpus'])} GPU(s)); "
          f"torch {env['torch']} (CUDA {env['cuda']}); CPU {env['cpu_model']}, {env['cpus_usable']} usable of "
          f"{env['cpu_count']}, torch threads {env['torch_threads']}; data {data_dir()}", flush=True)
    report = {"dry_run": a.dry_run, "started": stamp, "env": env, "data_dir": str(data_dir()),
              "cache_dir": str(cache), "budgets_s": budgets, "sections": {}, "failed": []}
    t_all = time.perf_counter()
    for name in a.only:
        print(f"\n== {name} (budget {budgets[name]:.0f} s)", flush=True)
        r = run_section(name, a.dry_run, budgets[name], work, cache)
        report["sections"][name] = r
        if r["ok"]:
            e = r["env"]
            print(f"   ok in {r['wall_s']:.1f} s on {e['device']} (torch {e['torch']}, {e['torch_threads']} threads): "
                  f"{r['sec_per_step']:.4f} s/step [{r['step']}]; peak {_gib(r['peak_memory_bytes'])} "
                  f"[{r['peak_memory']}]", flush=True)
        else:
            report["failed"].append(name)
            print(f"   FAILED after {r['wall_s']:.1f} s: {r['error']}\n{r['log_tail']}", flush=True)
        report["total_s"] = time.perf_counter() - t_all
        out.write_text(json.dumps(report, indent=1, default=str))
    print(f"\n{len(a.only) - len(report['failed'])}/{len(a.only)} sections ok in {report['total_s']:.1f} s"
          f"{'; failed: ' + ', '.join(report['failed']) if report['failed'] else ''} -> {out}", flush=True)
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
