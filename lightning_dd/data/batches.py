"""In-memory minibatches for small tensor data sets (distilled sets, CIFAR held as tensors).

A :class:`torch.utils.data.DataLoader` over a per-sample Dataset costs a Python call and a
collate per image; for data already in one tensor, slicing a shuffled index is far cheaper.
:class:`TensorBatches` yields whole batches and the DataLoader is used with ``batch_size=None``.
"""
from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader, IterableDataset


class TensorBatches(IterableDataset):
    """Minibatches of aligned tensors, ``epochs`` shuffled passes per iteration of the loader.

    Args:
        tensors: aligned tensors with the same first dimension ``N``.
        batch_size: batch size ``B`` (the last batch of a pass may be smaller).
        epochs: passes over the data per ``iter()``.
        seed: shuffle seed; ``None`` keeps the order. Each ``iter()`` continues the shuffle
            stream, so successive Lightning epochs see different orders, reproducibly.
        shard: under ``torch.distributed`` with ``W > 1`` processes (Lightning's DDP), each process
            yields its part of every batch (:func:`shard_batch`), so the ``W`` parts together are the
            one-process batch and DDP's averaged gradient is the batch mean (Lightning shards a
            map-style DataLoader with a ``DistributedSampler`` the same way); same number of batches
            on every process. ``False``: every process sees whole batches.

    Raises:
        ValueError: empty tensors, mismatched first dimensions or a non-positive batch size.
    """

    def __init__(self, tensors: tuple[torch.Tensor, ...], batch_size: int, epochs: int = 1, seed: int | None = None,
                 shard: bool = True):
        n = {t.shape[0] for t in tensors}
        if len(n) != 1:
            raise ValueError(f"tensors must share their first dimension, got {[tuple(t.shape) for t in tensors]}")
        if batch_size <= 0 or not tensors or next(iter(n)) == 0:
            raise ValueError(f"need a positive batch size and non-empty tensors (batch_size={batch_size})")
        self.tensors, self.n = tensors, next(iter(n))
        self.batch_size, self.epochs, self.seed, self.shard = min(batch_size, self.n), epochs, seed, shard
        self._passes = 0

    def steps_per_epoch(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def __len__(self) -> int:
        return self.epochs * self.steps_per_epoch()

    def __iter__(self):
        for _ in range(self.epochs):
            if self.seed is None:
                order = torch.arange(self.n)
            else:
                g = torch.Generator().manual_seed(self.seed * 100_003 + self._passes)
                order = torch.randperm(self.n, generator=g)
            self._passes += 1
            for idx in order.split(self.batch_size):
                if self.shard:
                    idx = shard_batch(idx)
                yield tuple(t[idx] for t in self.tensors)


def shard_batch(idx: torch.Tensor) -> torch.Tensor:
    """This process's part of the batch ``idx (B,)`` under ``torch.distributed`` (rank ``r`` of
    ``W``): ``idx[r::W]`` after padding ``idx`` to a multiple of ``W`` by repeating its first entries
    (as ``DistributedSampler`` pads), so every process gets ``ceil(B / W)`` samples, never an empty
    batch. Unchanged on one process or without an initialized process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return idx
    world, rank = dist.get_world_size(), dist.get_rank()
    size = math.ceil(len(idx) / world) * world
    if size != len(idx):
        idx = idx.repeat(math.ceil(size / len(idx)))[:size]
    return idx[rank::world]


def batch_loader(images: torch.Tensor, labels: torch.Tensor, batch_size: int, epochs: int = 1,
                 seed: int | None = None, shard: bool = True) -> DataLoader:
    """A DataLoader of ``(images[idx], labels[idx])`` batches (see :class:`TensorBatches`; under DDP
    each process gets its part of every batch unless ``shard=False``)."""
    return DataLoader(TensorBatches((images, labels), batch_size, epochs, seed, shard), batch_size=None)


class StepLoader:
    """The "data" of a stage whose steps draw their own inputs (distillation, recovery): yields the
    step indices ``0 .. n-1``, one per optimizer step, and is resumable the way Lightning expects
    (``state_dict`` / ``load_state_dict``), so a run resumed mid-way continues at the step it
    stopped at: no "dataloader is not resumable" warning and a progress bar that counts
    ``k .. n`` of ``n``.

    Args:
        n: number of steps (the stage's ``max_steps``).
        position: returns the number of steps done (e.g. ``lambda: module.global_step``), saved
            in checkpoints.
    """

    def __init__(self, n: int, position):
        self.n, self.position, self.start = n, position, 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        start, self.start = self.start, 0
        return iter(range(start, self.n))

    def state_dict(self) -> dict:
        return {"next": int(self.position())}

    def load_state_dict(self, state: dict) -> None:
        self.start = int(state.get("next", 0))
