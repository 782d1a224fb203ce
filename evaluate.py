"""Evaluate a saved result: ``python evaluate.py result=PATH [eval.nets=[ConvNet,AlexNet]] [eval.num_eval=5]``.

``PATH`` is a ``distilled.pt`` (or a run directory holding one). The test set is rebuilt from the
data config stored in the result (override with ``data=cifar10 paths.data_dir=...``). Writes
``metrics.json`` into the Hydra run directory and prints the table.
"""
import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    from lightning_dd.evaluate.standalone import evaluate_saved

    metrics = evaluate_saved(cfg)
    key = cfg.get("optimized_metric")
    return metrics.get(key) if key else None


if __name__ == "__main__":
    main()
