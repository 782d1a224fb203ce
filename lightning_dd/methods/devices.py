"""How many processes a run's Trainers will have, from ``conf/trainer`` alone (before any work), and
the check of methods that support one process only."""
from __future__ import annotations

from lightning_dd.core.config import ConfigError


def planned_world_size(trainer_cfg) -> int | None:
    """``trainer.devices x trainer.num_nodes`` when ``devices`` is a count (``2``, ``"2"``) or a list
    of devices; 1 for ``devices=auto`` on ``accelerator=cpu`` (Lightning's CPU default); ``None``
    when only Lightning knows (``auto`` on GPUs, ``-1``, ``"0,1"``)."""
    devices, nodes = trainer_cfg.get("devices", 1), int(trainer_cfg.get("num_nodes", 1) or 1)
    if isinstance(devices, str) and devices.strip().isdigit():
        devices = int(devices)
    if devices == "auto" and trainer_cfg.get("accelerator") == "cpu":
        devices = 1
    if isinstance(devices, int) and devices > 0:
        return devices * nodes
    if not isinstance(devices, (str, int)) and devices is not None:
        return len(list(devices)) * nodes
    return None


def require_one_process(cfg, what: str, why: str) -> None:
    """Refuse a run of ``what`` over several processes (``trainer.devices x trainer.num_nodes > 1``,
    or a multi-process strategy).

    Raises:
        ConfigError: naming ``trainer.devices`` / ``trainer.strategy``, ``what`` and ``why``.
    """
    trainer = cfg.get("trainer") or {}
    world, strategy = planned_world_size(trainer), trainer.get("strategy", "auto")
    if (world is not None and world > 1) or (isinstance(strategy, str) and strategy.startswith(("ddp", "fsdp",
                                                                                               "deepspeed"))):
        raise ConfigError(f"trainer.devices={trainer.get('devices')} trainer.strategy={strategy}: {what} runs in one "
                          f"process ({why}); set trainer.devices=1 trainer.strategy=auto")
