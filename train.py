"""Train entry point: ``python train.py experiment=NAME [scale=cpu] [key=value ...]``.

Composes ``conf/train.yaml`` with Hydra and hands it to :func:`lightning_dd.runner.run`.
"""
import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from lightning_dd.runner import run

    metrics = run(cfg)
    key = cfg.get("optimized_metric")
    return metrics.get(key) if key else None


if __name__ == "__main__":
    main()
