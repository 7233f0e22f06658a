"""Data layer: datasets by source, DINO multi-crop transforms, deterministic resumable loaders, tar shards."""

from mokd.data.device_augment import (AUGMENT_MODES, DecodeAndDraw, DecodedBatch, DeviceMultiCrop, collate_decoded,
                                     multicrop_transform, train_augmentation)
from mokd.data.fashion_mnist import FashionMNIST
from mokd.data.loader import (
    MultiCropDataset,
    ResumableBatchSampler,
    build_eval_loader,
    build_train_loader,
    collate_crops,
)
from mokd.data.shard_dataset import ShardDataset
from mokd.data.shard_loader import ShardDataError, ShardLoader, build_shard_loader, loader_statistics, shard_train_loader
from mokd.data.sources import (SOURCES, ImageFolderDataset, SyntheticDataset, build_dataset, data_statistics, dataset_for,
                               limit_size, num_classes)
from mokd.data.transforms import EvalTransform, MultiCropTransform, dataset_statistics

__all__ = [
    "AUGMENT_MODES",
    "DecodeAndDraw",
    "DecodedBatch",
    "DeviceMultiCrop",
    "collate_decoded",
    "multicrop_transform",
    "train_augmentation",
    "SOURCES",
    "ShardDataError",
    "ShardDataset",
    "ShardLoader",
    "EvalTransform",
    "FashionMNIST",
    "ImageFolderDataset",
    "MultiCropDataset",
    "MultiCropTransform",
    "ResumableBatchSampler",
    "SyntheticDataset",
    "build_dataset",
    "build_eval_loader",
    "build_shard_loader",
    "build_train_loader",
    "collate_crops",
    "data_statistics",
    "dataset_for",
    "limit_size",
    "loader_statistics",
    "shard_train_loader",
    "dataset_statistics",
    "num_classes",
]
