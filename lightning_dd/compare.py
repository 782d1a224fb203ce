"""Compare finished runs side by side: ``python -m lightning_dd.compare PATH... [options]``.

Reads every run directory under each ``PATH`` (a directory holding ``metrics.json``; its
``.hydra/config.yaml`` and ``.hydra/overrides.yaml`` give the config), or, with
``--wandb ENTITY/PROJECT``, the runs of a W&B project through its public API (offline runs cannot
be read back by the API: the local files are the source of truth; ``wandb sync`` them first).

Prints one row per run: its name, the config values that differ between the runs, and each
accuracy as ``mean ± std`` over that run's evaluation seeds. When several runs differ only in
``seed`` (a seed sweep), an aggregate table follows: per group, the mean ± std across runs of
each accuracy; a cell marked ``†`` did not vary at all because ``eval.seed`` fixes it (e.g. the
random baseline's subset), which a footnote says. ``--csv FILE``, ``--markdown`` and ``--plot
FILE.png`` (``--metric`` against ``--x``, one series per method: lines for a numeric ``x`` with
several values, bars for categories, seeds or a single value) write the same elsewhere.

``evaluate.py`` runs show the net they actually evaluated with (the result's stored net, from the
run's ``net.yaml`` or the result itself), not the config's default ``net``.
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
            if "result" in config:  # an evaluate.py run: show the net it actually used
                net = evaluated_net(d, config)
                if net is not None:
                    config = {k: v for k, v in config.items() if not k.startswith("net.")}
                    config.update(flatten(net, "net."))
                    overrides = {k: v for k, v in overrides.items() if k != "net" and not k.startswith("net.")}
            runs.append(Run(str(d), config, with_acc_means(json.loads(m.read_text())), overrides))
    if not runs:
        raise FileNotFoundError(f"compare: no run directories (with metrics.json) under {', '.join(map(str, paths))}")
    return runs


def with_acc_means(metrics: dict) -> dict:
    """``metrics`` where a single accuracy ``X/acc`` (a run that evaluates once, e.g. QAT-ViT's
    ``eval/fp/acc``) also reads as ``X/acc_mean`` (no ``X/acc_std``), so tables and plots show it."""
    extra = {f"{k[:-4]}/acc_mean": v for k, v in metrics.items()
             if k.endswith("/acc") and f"{k[:-4]}/acc_mean" not in metrics and isinstance(v, (int, float))}
    return {**metrics, **extra}


def evaluated_net(run_dir: Path, config: dict) -> dict | None:
    """The net an ``evaluate.py`` run evaluated with, when it is not the config's ``net``: the
    ``net.yaml`` the run wrote, else the net stored in its ``result`` (``meta["net"]`` of the
    ``distilled.pt``, read with ``weights_only=True`` and ``mmap``, tensors untouched) unless the
    run set ``use_config_net=true``; ``None`` when neither is available (the config's net is shown)."""
    import yaml

    if (run_dir / "net.yaml").is_file():
        return yaml.safe_load((run_dir / "net.yaml").read_text()) or None
    if config.get("use_config_net") or not config.get("result"):
        return None
    p = Path(str(config["result"]))
    if p.is_dir():
        p = p / "distilled.pt"
    if p.suffix != ".pt" or not p.is_file():
        return None
    from lightning_dd.io import safe_load

    try:
        d = safe_load(p, "result", mmap=True)
    except ValueError:
        return None
    net = (d.get("meta") or {}).get("net") if isinstance(d, dict) else None
    return dict(net) if isinstance(net, dict) else None


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
    if std is None:  # a single accuracy (no evaluation seeds): no spread to show
        return f"{100 * mean:.2f}"
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


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


FIXED_MARK = " †"


def _fixed_by_eval_seed(members: list[Run], vals: list[float]) -> bool:
    """Several runs, one identical accuracy, one shared ``eval.seed``: the number did not vary."""
    seeds = {json.dumps(value(r, "eval.seed"), default=str) for r in members}
    return len(vals) > 1 and len(set(vals)) == 1 and len(seeds) == 1


def aggregate_rows(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the across-seeds table: runs grouped by their differing keys other than
    the seed; each accuracy as mean ± std (population std) of the runs' ``acc_mean``. A cell whose
    runs all scored exactly the same with the same ``eval.seed`` ends in ``†`` (see
    :func:`aggregate_notes`): e.g. the random baseline, whose subset and students are seeded by
    ``eval.seed``, not by ``seed``."""
    keys = [k for k in differing_keys(runs) if k not in SEED_KEYS]
    metrics = acc_metrics(runs)
    groups = _seed_groups(runs)
    header = [*keys, "runs", *metrics]
    rows = []
    for g, members in groups.items():
        cells = [*g, str(len(members))]
        for m in metrics:
            have = [r for r in members if f"{m}/acc_mean" in r.metrics]
            vals = [r.metrics[f"{m}/acc_mean"] for r in have]
            cell = _pm(statistics.fmean(vals), statistics.pstdev(vals)) if vals else "-"
            cells.append(cell + FIXED_MARK if vals and _fixed_by_eval_seed(have, vals) else cell)
        rows.append(cells)
    return header, rows


def aggregate_notes(runs: list[Run]) -> list[str]:
    """Footnotes of the across-seeds table (empty when nothing needs one)."""
    marked = []
    for members in _seed_groups(runs).values():
        for m in acc_metrics(runs):
            have = [r for r in members if f"{m}/acc_mean" in r.metrics]
            vals = [r.metrics[f"{m}/acc_mean"] for r in have]
            if vals and _fixed_by_eval_seed(have, vals) and m not in marked:
                marked.append(m)
    if not marked:
        return []
    seeds = sorted({str(value(r, "eval.seed")) for r in runs if value(r, "eval.seed") is not None})
    by_eval_seed = (f"the random baseline's subset and every student's initialization are seeded by eval.seed "
                    f"(here {', '.join(seeds)}), which these runs share; sweep eval.seed to see how much the baseline "
                    f"varies") if seeds else ""
    return [f"† identical in every run of the group ({', '.join(marked)}): not a measured spread of 0; `seed` "
            f"does not reach these numbers ({by_eval_seed + '; or ' if by_eval_seed else ''}a model trained once with "
            f"its own seed and cached, e.g. QAT-ViT's FP model, method.fp_seed)."]


def to_markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _number(v) -> float | None:
    """``v`` as a float when it is a number (or a string of one), else ``None``."""
    if isinstance(v, bool) or v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def is_categorical(x: str, values: list) -> bool:
    """Whether the plot puts ``x`` on a categorical axis (bars): ``arch``, a seed key (seeds are
    labels, not quantities), any non-numeric value, or fewer than two distinct values."""
    if x == "arch" or x in SEED_KEYS or x.endswith(".seed"):
        return True
    nums = [_number(v) for v in values]
    return any(n is None for n in nums) or len(set(nums)) < 2


def plot_points(runs: list[Run], x: str, metric: str, series: str = "method.name") -> dict[str, dict]:
    """``{series label: {x value: [(acc_mean, acc_std), ...]}}`` as :func:`plot` draws them
    (``x == "arch"``: x = the architectures of ``eval/<arch>/acc_mean``, one series per run).

    Raises:
        ValueError: no run has the plotted values.
    """
    pts: dict[str, dict] = {}
    if x == "arch":
        for r in runs:
            label = str(value(r, series) or Path(r.name).name)
            for k, v in r.metrics.items():
                if k.startswith("eval/") and k.endswith("/acc_mean"):
                    a = k.split("/")[1]
                    pts.setdefault(label, {}).setdefault(a, []).append((v, r.metrics.get(f"eval/{a}/acc_std", 0.0)))
        if not pts:
            raise ValueError("compare --plot: no eval/<arch>/acc_mean metrics")
        return pts
    for r in runs:
        if f"{metric}/acc_mean" not in r.metrics or value(r, x) is None:
            continue
        xv = value(r, x)
        xv = _number(xv) if _number(xv) is not None else str(xv)
        pts.setdefault(str(value(r, series) or Path(r.name).name), {}).setdefault(xv, []).append(
            (r.metrics[f"{metric}/acc_mean"], r.metrics.get(f"{metric}/acc_std", 0) or 0))
    if not pts:
        raise ValueError(f"compare --plot: no run has both {x!r} and {metric}/acc_mean")
    return pts


def _tick(v) -> str:
    return f"{int(v)}" if isinstance(v, float) and v.is_integer() else str(v)


def plot(runs: list[Run], path: str | Path, x: str, metric: str | list[str], series: str = "method.name") -> str:
    """Accuracy plot of ``metric`` (e.g. ``eval/ConvNet``) against the config key ``x``, one
    series per ``series`` value (or run directory); several metrics (e.g. ``eval/fp``,
    ``eval/qat``): one series per metric (and ``series`` value, when runs have several). Error
    bars = std over evaluation seeds (averaged over runs sharing a point); where those runs have
    none (one evaluation each, e.g. a seed sweep of single accuracies), the std across the runs'
    accuracies. A numeric ``x`` with several values (e.g.
    ``method.ipc``) is drawn as lines with markers, ticks at the values themselves (a log axis
    when they span 20x or more); a categorical ``x`` (``arch``, ``seed``, non-numeric values, or a
    single value) as grouped bars labeled with their value. ``x == "arch"``: the architectures of
    ``eval/<arch>/acc_mean`` on the x axis, one series per run. Returns ``"lines"`` or ``"bars"``.

    Raises:
        ValueError: no run has the plotted values.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator

    metrics = [metric] if isinstance(metric, str) else list(metric)
    if len(metrics) == 1:
        pts = plot_points(runs, x, metrics[0], series)
    else:
        per = {m: plot_points(runs, x, m, series) for m in metrics}
        several = len({lab for p in per.values() for lab in p}) > 1
        pts = {(f"{lab}: {m}" if several else m): p for m, ps in per.items() for lab, p in ps.items()}
    metric = metrics[0] if len(metrics) == 1 else "test"
    xs_all = sorted({v for p in pts.values() for v in p}, key=lambda v: (isinstance(v, str), v))
    kind = "bars" if is_categorical(x, xs_all) else "lines"
    xlabel = "evaluation architecture" if x == "arch" else x
    ylabel = "test accuracy (%)" if x == "arch" else f"{metric} accuracy (%)"
    labels = list(pts) if len(metrics) > 1 else sorted(pts)
    fig, ax = plt.subplots(figsize=(max(5.5, min(12.0, 1.2 + 0.55 * len(xs_all) * max(1, len(labels)) ** 0.5)), 3.8))

    def stat(vals):  # (mean, error bar) of the runs at one point
        means, stds = [m for m, _ in vals], [s for _, s in vals]
        err = statistics.fmean(stds) if any(stds) or len(means) < 2 else statistics.stdev(means)
        return 100 * statistics.fmean(means), 100 * err

    stats = {lab: {v: stat(p[v]) for v in p} for lab, p in pts.items()}
    if kind == "lines":
        for lab in labels:
            xv = sorted(stats[lab])
            ax.errorbar(xv, [stats[lab][v][0] for v in xv], yerr=[stats[lab][v][1] for v in xv], marker="o",
                        capsize=3, label=lab)
        if min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 20:
            ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator(xs_all))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([_tick(v) for v in xs_all])
    else:
        width = 0.8 / len(labels)
        for j, lab in enumerate(labels):
            pos = [i - 0.4 + width * (j + 0.5) for i, v in enumerate(xs_all) if v in stats[lab]]
            vals = [stats[lab][v] for v in xs_all if v in stats[lab]]
            bars = ax.bar(pos, [m for m, _ in vals], width * 0.92, yerr=[e for _, e in vals], capsize=3, label=lab,
                          error_kw={"elinewidth": 1})
            if len(xs_all) * len(labels) <= 24:
                ax.bar_label(bars, labels=[f"{m:.1f}" for m, _ in vals], padding=2, fontsize=7)
        ax.set_xticks(range(len(xs_all)), [_tick(v) for v in xs_all])
        ax.set_xlim(-0.6, len(xs_all) - 0.4)
        top = max(m + e for lab in labels for m, e in stats[lab].values())
        ax.set_ylim(0, min(100.0, top * 1.15 + 1))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, axis="y" if kind == "bars" else "both")
    ax.set_axisbelow(True)
    ax.legend(fontsize=8, title=None if x == "arch" or len(metrics) > 1 else series, title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return kind


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
    ap.add_argument("--metric", nargs="+", default=["eval/ConvNet"],
                    help="accuracy prefix(es) to plot (default eval/ConvNet); several: one line each")
    a = ap.parse_args(argv)
    if not a.paths and not a.wandb:
        ap.error("give run directories, or --wandb ENTITY/PROJECT")
    runs = (find_runs(a.paths) if a.paths else []) + (wandb_runs(a.wandb) if a.wandb else [])
    tables = [("runs", *run_rows(runs))]
    if any(len(v) > 1 for v in _seed_groups(runs).values()):
        tables.append(("across seeds (mean ± std of each run's mean)", *aggregate_rows(runs)))
    for title, header, rows in tables:
        notes = aggregate_notes(runs) if title.startswith("across seeds") else []
        if a.markdown:
            print(f"\n**{title}**\n\n{to_markdown(header, rows)}")
            for n in notes:
                print(f"\n{n}")
        else:
            from rich.console import Console
            from rich.table import Table

            t = Table(title=title)
            for h in header:
                t.add_column(h)
            for r in rows:
                t.add_row(*r)
            Console(width=200).print(t)
            for n in notes:
                print(n)
    if a.csv:
        header, rows = tables[0][1], tables[0][2]
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(header)
        w.writerows(rows)
        (sys.stdout.write(buf.getvalue()) if a.csv == "-" else Path(a.csv).write_text(buf.getvalue()))
    if a.plot:
        kind = plot(runs, a.plot, a.x, a.metric)
        print(f"plot ({kind}): {a.plot}")
    return 0


def _seed_groups(runs: list[Run]) -> dict:
    keys = [k for k in differing_keys(runs) if k not in SEED_KEYS]
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        groups.setdefault(tuple(str(value(r, k)) for k in keys), []).append(r)
    return groups


if __name__ == "__main__":
    sys.exit(main())
