"""What a DataModule of each family provides after ``setup()``: one :class:`typing.Protocol` per data
family. A method names its family's protocol in ``data_protocol`` and types ``ctx.dm`` against it;
the runner checks ``isinstance(dm, method.data_protocol)`` after ``setup()`` and before ``run``, so a
method handed the wrong kind of data fails at once, naming both. A new data family is a new
Protocol, a DataModule satisfying it and methods typed against it; nothing here changes.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class ImageData(Protocol):
    """In-memory image classification data in model space
    (:class:`lightning_dd.data.images.ImageDataModule` and its subclasses).

    Shapes:
        train_images: ``(N, C, H, W)`` float32, model space (after ``preprocessing``).
        train_labels: ``(N,)`` int64. test_images, test_labels: the same for the test split.
        image_shape: ``(C, H, W)``.
    """

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list[str]
    num_classes: int
    image_shape: tuple[int, int, int]
    preprocessing: object

    def identity(self) -> dict:
        """Everything that determines the served tensors (part of later stages' cache keys)."""

    def random_subset(self, ipc: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``ipc`` random training images per class and their labels."""

    def class_indices(self) -> list[torch.Tensor]:
        """Indices of each class's training images."""


@runtime_checkable
class ImageFolderData(ImageData, Protocol):
    """Image data read from an image-folder layout on disk
    (:class:`lightning_dd.data.imagenet.ImageNetDataModule`), which a method may also stream from
    ``root`` (``layout``: ``imagenet`` | ``tiny`` | ``flat``) instead of the in-memory tensors."""

    root: object
    layout: str
    image_size: int
    resize_size: int
    subset_seed: int


@runtime_checkable
class GraphData(Protocol):
    """One real graph (:class:`lightning_dd.data.graphs.GraphDataModule`): ``data`` is a
    ``torch_geometric.data.Data`` with ``x (N, F)``, ``y (N,)``, ``edge_index (2, E)`` and the split
    masks; ``task`` is ``node`` or ``anomaly``."""

    name: str
    data: object
    num_classes: int
    classes: list[str]
    task: str


@runtime_checkable
class PointVideoData(Protocol):
    """Point-cloud videos and their skeletons (:class:`lightning_dd.data.point_video.PointVideoDataModule`).

    Shapes:
        train_labels, test_labels: ``(V,)`` int64, one per video.
    """

    name: str
    num_classes: int
    train_labels: torch.Tensor
    test_labels: torch.Tensor

    def clips(self, split: str = "train", videos: torch.Tensor | None = None, train: bool | None = None,
              views: int = 1):
        """The clip dataset of ``split`` (optionally of some videos only; ``views`` augmented views per clip)."""

    def loader(self, ds, shuffle: bool, drop_last: bool = False):
        """A DataLoader over ``ds`` with the module's batch size and workers."""

    def labelled_subset(self, fraction: float, seed: int) -> torch.Tensor:
        """Indices of a class-balanced ``fraction`` of the training videos."""

    def skeletons(self):
        """``(joint arrays per video, labels, subjects)``."""


@runtime_checkable
class SkeletonData(Protocol):
    """What the skeleton classifier reads of a point-video DataModule
    (:class:`lightning_dd.data.point_video.PointVideoDataModule`, ``format: skeleton``): the joint
    sequences, not the videos (``load_videos: false`` leaves those, and their labels, unread).

    Shapes:
        ``skeletons()``: ``(joints (T, 20, 3) metres per video, labels (V,), subjects (V,))``.
    """

    name: str
    num_classes: int
    train_subjects: tuple[int, ...]

    def skeletons(self):
        """``(joint arrays per video, labels, subjects)``."""
