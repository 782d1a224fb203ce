"""The printed summary of a run: accuracy rows (eval and baselines) and timings."""
from __future__ import annotations


def print_table(metrics: dict, title: str = "") -> None:
    """Print the accuracy rows (eval and baselines) and the timings of a metrics dict: each
    ``<set>/<net>/acc_mean`` (± its ``acc_std``, over ``n_runs`` students) and each single
    evaluation ``eval/.../<model>/acc`` or ``eval/.../*_acc`` (QAT-ViT's models, point-video probes;
    a bare ``eval/acc`` is a row without a net)."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for col in ("set", "net", "accuracy (%)", "runs"):
        t.add_column(col)
    for k in sorted(metrics):
        if k.endswith("/acc_mean"):
            base, net = k[: -len("/acc_mean")].rsplit("/", 1)
            std = metrics.get(f"{base}/{net}/acc_std", float("nan"))
            n = metrics.get(f"{base}/{net}/n_runs", 0)
            t.add_row(base, net, f"{100 * metrics[k]:.2f} ± {100 * std:.2f}", str(int(n)))
        elif k.startswith("eval/") and k.endswith(("/acc", "_acc")) and isinstance(metrics[k], (int, float)):
            stem = k[: -len("/acc")] if k.endswith("/acc") else k
            base, net = stem.rsplit("/", 1) if "/" in stem else (stem, "")
            t.add_row(base, net, f"{100 * metrics[k]:.2f}", "1")
    Console().print(t)
    tim = ", ".join(f"{k.split('/', 1)[1]}={v:.0f}s" for k, v in sorted(metrics.items()) if k.startswith("timings/"))
    if tim:
        Console().print(f"timings: {tim}")
