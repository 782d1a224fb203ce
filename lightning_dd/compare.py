"""Compare finished runs side by side: ``python -m lightning_dd.compare PATH... [options]``.

Reads every run directory under each ``PATH`` (a directory holding ``metrics.json``; its
``.hydra/config.yaml`` and ``.hydra/overrides.yaml`` give the config), or, with
``--wandb ENTITY/PROJECT``, the runs of a W&B project through its public API (offline runs cannot
be read back by the API: the local files are the source of truth; ``wandb sync`` them first).

Prints one row per run: its name, the config values that differ between the runs, and each
accuracy as ``mean ± std`` over that run's evaluation seeds. When several runs differ only in
``seed`` (a seed sweep), an aggregate table follows: per group, the mean ± std across runs of
each accuracy. ``--csv FILE``, ``--markdown`` and ``--plot FILE.png`` (``--x`` against
``--metric``, one line per method) write the same elsewhere.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

SEED_KEYS = ("seed",)
IGNORED_PREFIXES = ("paths.", "hydra.", "logger.", "trainer.enable_progress_bar", "ckpt_path", "resume")


@dataclass
class Run:
    """One finished run: ``name``, flat ``config`` (dotted keys), flat ``metrics``, ``overrides``."""

    name: str
    config: dict
    metrics: dict
    overrides: dict = field(default_factory=dict)


def flatten(d, prefix: str = "") -> dict:
    """``{"a": {"b": 1}} -> {"a.b": 1}`` (lists kept as values)."""
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def find_runs(paths: list[str | Path]) -> list[Run]:
    """Every directory under ``paths`` (recursively, itself included) with a ``metrics.json``.

    Raises:
        FileNotFoundError: a path does not exist, or no run is found.
    """
    import yaml

    runs = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"compare: {p} does not exist")
        for m in sorted(p.rglob("metrics.json")):
            d = m.parent
            cfg_file, ovr_file = d / ".hydra" / "config.yaml", d / ".hydra" / "overrides.yaml"
            config = flatten(yaml.safe_load(cfg_file.read_text())) if cfg_file.is_file() else {}
            overrides = {}
            if ovr_file.is_file():
                for o in yaml.safe_load(ovr_file.read_text()) or []:
                    k, _, v = str(o).lstrip("+~").partition("=")
                    overrides[k] = v
            runs.append(Run(str(d), config, json.loads(m.read_text()), overrides))
    if not runs:
        raise FileNotFoundError(f"compare: no run directories (with metrics.json) under {', '.join(map(str, paths))}")
    return runs


def wandb_runs(project: str) -> list[Run]:
    """The finished runs of W&B ``ENTITY/PROJECT`` (config and summary) through the public API."""
    import wandb

    out = []
    for r in wandb.Api().runs(project):
        metrics = {k: v for k, v in r.summary.items() if isinstance(v, (int, float))}
        out.append(Run(f"{project}/{r.id} ({r.name})", flatten(dict(r.config)), metrics))
    return out


def differing_keys(runs: list[Run]) -> list[str]:
    """Config keys (or overrides) whose values differ between runs, run-bookkeeping keys excluded;
    a key that only some runs' configs hold counts only when some run overrode it."""
    keys = set()
    for r in runs:
        keys |= set(r.config) | set(r.overrides)
    overridden = {k for r in runs for k in r.overrides}
    out = []
    for k in sorted(keys):
        if k.startswith(IGNORED_PREFIXES):
            continue
        have = [r for r in runs if k in r.overrides or k in r.config]
        if len(have) < len(runs) and k not in overridden:
            continue  # a key only some runs' configs have (e.g. another entry point): not a difference
        vals = {json.dumps(value(r, k), sort_keys=True, default=str) for r in runs}
        if len(vals) > 1:
            out.append(k)
    return out


def value(run: Run, key: str):
    return run.overrides.get(key, run.config.get(key))


def acc_metrics(runs: list[Run]) -> list[str]:
    """The ``.../acc_mean`` metric prefixes present in any run, sorted (eval first)."""
    names = {k[: -len("/acc_mean")] for r in runs for k in r.metrics if k.endswith("/acc_mean")}
    return sorted(names, key=lambda n: (not n.startswith("eval"), n))


def _pm(mean, std) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    return f"{100 * mean:.2f} ± {100 * (std or 0):.2f}"


def run_rows(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the per-run table."""
    keys, metrics = differing_keys(runs), acc_metrics(runs)
    header = ["run", *keys, *metrics]
    rows = []
    for r in runs:
        cells = [r.name, *[str(value(r, k)) for k in keys]]
        cells += [_pm(r.metrics.get(f"{m}/acc_mean"), r.metrics.get(f"{m}/acc_std")) for m in metrics]
        rows.append(cells)
    return header, rows


def aggregate_rows(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the across-seeds table: runs grouped by their differing keys other than
    the seed; each accuracy as mean ± std (population std) of the runs' ``acc_mean``."""
    keys = [k for k in differing_keys(runs) if k not in SEED_KEYS]
    metrics = acc_metrics(runs)
    groups = _seed_groups(runs)
    header = [*keys, "runs", *metrics]
    rows = []
    for g, members in groups.items():
        cells = [*g, str(len(members))]
        for m in metrics:
            vals = [r.metrics[f"{m}/acc_mean"] for r in members if f"{m}/acc_mean" in r.metrics]
            cells.append(_pm(statistics.fmean(vals), statistics.pstdev(vals)) if vals else "-")
        rows.append(cells)
    return header, rows


def to_markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def plot(runs: list[Run], path: str | Path, x: str, metric: str, series: str = "method.name") -> None:
    """Accuracy plot. ``x`` a config key: ``metric`` (e.g. ``eval/ConvNet``) against it, one line per
    ``series`` value, error bars = std over evaluation seeds (averaged over runs sharing a point).
    ``x == "arch"``: the architectures of ``eval/<arch>/acc_mean`` on the x axis, one line per run
    (named by ``series``, else its directory).

    Raises:
        ValueError: no run has the plotted values.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    if x == "arch":
        archs = sorted({k.split("/")[1] for r in runs for k in r.metrics
                        if k.startswith("eval/") and k.endswith("/acc_mean")})
        if not archs:
            raise ValueError("compare --plot: no eval/<arch>/acc_mean metrics")
        for r in runs:
            label = str(value(r, series) or Path(r.name).name)
            ys = [100 * r.metrics.get(f"eval/{a}/acc_mean", float("nan")) for a in archs]
            es = [100 * r.metrics.get(f"eval/{a}/acc_std", 0.0) for a in archs]
            ax.errorbar(archs, ys, yerr=es, marker="o", capsize=3, label=label)
        ax.set_xlabel("evaluation architecture")
        ax.set_ylabel("test accuracy (%)")
    else:
        lines: dict[str, dict] = {}
        for r in runs:
            if f"{metric}/acc_mean" not in r.metrics or value(r, x) is None:
                continue
            pts = lines.setdefault(str(value(r, series) or Path(r.name).name), {})
            pts.setdefault(float(value(r, x)), []).append((r.metrics[f"{metric}/acc_mean"],
                                                           r.metrics.get(f"{metric}/acc_std", 0)))
        if not lines:
            plt.close(fig)
            raise ValueError(f"compare --plot: no run has both {x!r} and {metric}/acc_mean")
        for label, pts in sorted(lines.items()):
            xs = sorted(pts)
            ys = [100 * statistics.fmean(m for m, _ in pts[v]) for v in xs]
            es = [100 * statistics.fmean(s for _, s in pts[v]) for v in xs]
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=label)
        ax.set_xlabel(x)
        ax.set_ylabel(f"{metric} accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lightning_dd.compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="*", help="run directories or folders holding them")
    ap.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read runs through the W&B public API")
    ap.add_argument("--csv", metavar="FILE", help="write the per-run table as CSV ('-' = stdout)")
    ap.add_argument("--markdown", action="store_true", help="print Markdown tables instead of rich ones")
    ap.add_argument("--plot", metavar="FILE.png", help="plot --metric against --x, one line per method")
    ap.add_argument("--x", default="method.ipc",
                    help="config key on the plot's x axis (default method.ipc); 'arch' = one point per eval net")
    ap.add_argument("--metric", default="eval/ConvNet", help="accuracy prefix to plot (default eval/ConvNet)")
    a = ap.parse_args(argv)
    if not a.paths and not a.wandb:
        ap.error("give run directories, or --wandb ENTITY/PROJECT")
    runs = (find_runs(a.paths) if a.paths else []) + (wandb_runs(a.wandb) if a.wandb else [])
    tables = [("runs", *run_rows(runs))]
    if any(len(v) > 1 for v in _seed_groups(runs).values()):
        tables.append(("across seeds (mean ± std of each run's mean)", *aggregate_rows(runs)))
    for title, header, rows in tables:
        if a.markdown:
            print(f"\n**{title}**\n\n{to_markdown(header, rows)}")
        else:
            from rich.console import Console
            from rich.table import Table

            t = Table(title=title)
            for h in header:
                t.add_column(h)
            for r in rows:
                t.add_row(*r)
            Console(width=200).print(t)
    if a.csv:
        header, rows = tables[0][1], tables[0][2]
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(header)
        w.writerows(rows)
        (sys.stdout.write(buf.getvalue()) if a.csv == "-" else Path(a.csv).write_text(buf.getvalue()))
    if a.plot:
        plot(runs, a.plot, a.x, a.metric)
        print(f"plot: {a.plot}")
    return 0


def _seed_groups(runs: list[Run]) -> dict:
    keys = [k for k in differing_keys(runs) if k not in SEED_KEYS]
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        groups.setdefault(tuple(str(value(r, k)) for k in keys), []).append(r)
    return groups


if __name__ == "__main__":
    sys.exit(main())
