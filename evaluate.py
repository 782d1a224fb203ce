"""Evaluate a saved result: ``python evaluate.py result=PATH [eval.nets=[ConvNet,AlexNet]] [eval.num_eval=5]``.

``PATH`` is a ``distilled.pt`` (or a run directory holding one). The test set is rebuilt from the
data config stored in the result (override with ``data=cifar10 paths.data_dir=...``). Writes
``metrics.json`` into the Hydra run directory and prints the table. A failed evaluation leaves no
output directory behind (Hydra creates it before the evaluation starts; it is removed again when
it holds nothing but Hydra's own ``.hydra/`` and ``evaluate.log``).
"""
import shutil
from pathlib import Path

import hydra
from omegaconf import DictConfig

HYDRA_FILES = {".hydra", "evaluate.log"}


def _remove_if_only_hydra_files(out: Path) -> None:
    """Remove ``out`` when everything in it was written by Hydra (never a directory with results)."""
    if out.is_dir() and {p.name for p in out.iterdir()} <= HYDRA_FILES:
        shutil.rmtree(out, ignore_errors=True)


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    from lightning_dd.evaluate_run import evaluate_saved

    try:
        metrics = evaluate_saved(cfg)
    except BaseException:
        _remove_if_only_hydra_files(Path(cfg.paths.output_dir))
        raise
    key = cfg.get("optimized_metric")
    return metrics.get(key) if key else None


if __name__ == "__main__":
    main()
