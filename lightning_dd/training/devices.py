"""Devices and processes of a run: the device a one-device run computes on (:func:`run_device`), how many processes a run's Trainers will have, from ``conf/trainer`` alone (before any work); the
strategy check of methods that shard their own work over DDP ranks (:func:`require_ddp`);
:func:`gather_objects`, the all-gather of picklable per-rank results between their fits."""
from __future__ import annotations

import torch

from lightning_dd.core.config import ConfigError
from lightning_dd.core.trainer import TrainerFactory

ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")


def planned_world_size(make_trainer: TrainerFactory) -> int | None:
    """``trainer.devices x trainer.num_nodes`` of the run's Trainer factory when ``devices`` is a
    count (``2``, ``"2"``) or a list of devices; 1 for ``devices=auto`` on ``accelerator=cpu``
    (Lightning's CPU default); ``None`` when only Lightning knows (``auto`` on GPUs, ``-1``, ``"0,1"``)."""
    devices, nodes = make_trainer.devices, int(make_trainer.num_nodes or 1)
    if isinstance(devices, str) and devices.strip().isdigit():
        devices = int(devices)
    if devices == "auto" and make_trainer.accelerator == "cpu":
        devices = 1
    if isinstance(devices, int) and devices > 0:
        return devices * nodes
    if not isinstance(devices, (str, int)) and devices is not None:
        return len(list(devices)) * nodes
    return None


def require_ddp(make_trainer: TrainerFactory, what: str) -> None:
    """Refuse every strategy but one device (``auto``, ``single_device``) and ``ddp`` (Lightning
    starts the script once per device) for ``what``, a method that shards its own work over the
    ranks and passes state between several fits. ``ddp_spawn`` / ``ddp_fork`` / ``ddp_notebook``
    run each fit in worker processes that hand back only rank 0's weights, so the state a rank
    keeps between fits (recovered batches, loss histories) would be lost; FSDP / DeepSpeed shard
    the parameters the method updates itself.

    Raises:
        ConfigError: naming ``trainer.strategy`` and ``what``.
    """
    strategy = make_trainer.strategy
    if not isinstance(strategy, str):
        return  # a strategy object: the method's fit-time check decides
    if not (strategy in ("auto", "single_device") or strategy.startswith("ddp")):
        raise ConfigError(f"trainer.strategy: {what} runs on one device or under DDP (auto, ddp), not {strategy!r}")
    if any(k in strategy for k in ("spawn", "fork", "notebook")):
        raise ConfigError(f"trainer.strategy={strategy}: {what} keeps state between its fits, but these fits run in "
                          f"worker processes that hand back only rank 0's weights; use trainer.strategy=ddp "
                          f"(Lightning starts train.py once per device)")


def gather_objects(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]``: ``torch.distributed.all_gather_object`` over the
    default process group (every rank gets the list; a collective: every rank must call it), or
    ``[obj]`` without an initialized group of several processes. ``obj`` must be picklable; with
    NCCL it travels through the current CUDA device (Lightning sets it per rank)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def run_device(accelerator: str = "auto") -> torch.device:
    """The device a one-device Lightning run with ``trainer.accelerator`` computes on: ``cpu``;
    ``gpu``/``cuda`` -> ``cuda``; ``mps``; ``auto`` -> ``cuda`` if available, else ``mps`` if
    available, else ``cpu`` (Lightning's order). The teachers, their statistics passes, test
    accuracy and soft labels run there, not only the Lightning fits.

    Raises:
        ValueError: an accelerator not in :data:`ACCELERATORS` (the method's ``check`` rejects it
            before any work).
    """
    a = str(accelerator).lower()
    if a == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    if a in ("gpu", "cuda"):
        return torch.device("cuda")
    if a in ("cpu", "mps"):
        return torch.device(a)
    raise ValueError(f"trainer.accelerator must be {'|'.join(ACCELERATORS)} "
                     f"got {accelerator!r}")
