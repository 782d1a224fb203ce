"""Data: readers of on-disk formats and LightningDataModules."""
from lightning_dd.data.batches import TensorBatches, batch_loader
from lightning_dd.data.images import CIFARDataModule, DigitsDataModule, ImageDataModule, Preprocessing
from lightning_dd.data.readers import DataNotFoundError, ImageSet, atomic_save, read_cifar, read_class_folders

__all__ = ["TensorBatches", "batch_loader", "CIFARDataModule", "DigitsDataModule", "ImageDataModule",
           "Preprocessing", "DataNotFoundError", "ImageSet", "atomic_save", "read_cifar", "read_class_folders"]
