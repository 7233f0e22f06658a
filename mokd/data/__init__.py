"""Data layer: datasets by source, DINO multi-crop transforms, deterministic resumable loaders."""

from mokd.data.fashion_mnist import FashionMNIST
from mokd.data.loader import (
    MultiCropDataset,
    ResumableBatchSampler,
    build_eval_loader,
    build_train_loader,
    collate_crops,
)
from mokd.data.sources import SOURCES, ImageFolderDataset, SyntheticDataset, build_dataset, dataset_for, limit_size, num_classes
from mokd.data.transforms import EvalTransform, MultiCropTransform, dataset_statistics

__all__ = [
    "SOURCES",
    "EvalTransform",
    "FashionMNIST",
    "ImageFolderDataset",
    "MultiCropDataset",
    "MultiCropTransform",
    "ResumableBatchSampler",
    "SyntheticDataset",
    "build_dataset",
    "build_eval_loader",
    "build_train_loader",
    "collate_crops",
    "dataset_for",
    "limit_size",
    "dataset_statistics",
    "num_classes",
]
