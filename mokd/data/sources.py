"""Dataset sources by name (data.source): Fashion-MNIST, an ImageFolder tree, synthetic images made on the fly,
or WebDataset tar shards.

Every dataset returned here yields (PIL image, int label) and exposes `.channels` (1 or 3), `.targets`
(list of int labels) and `.classes`.
"""

from __future__ import annotations

import colorsys
import os
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset
from torchvision.datasets import ImageFolder

from mokd.config import DataConfig, register_choices
from mokd.data.fashion_mnist import FashionMNIST
from mokd.data.shard_dataset import ShardDataset
from mokd.data.transforms import dataset_statistics
from mokd.errors import DataError
from mokd.registry import Registry


class ImageFolderDataset(ImageFolder):
    """torchvision ImageFolder (root/<class>/<image>); its default loader converts every image to RGB."""

    channels: int = 3


class SyntheticDataset(Dataset):
    """Images with class-dependent structure, generated deterministically from (seed, split, index).

    Class k is an oriented sinusoidal grating (orientation k*pi/K, 2 + k%3 cycles across the image) tinted
    with the hue k/K (3 channels) under a random phase and Gaussian noise. Orientation and frequency survive
    cropping, flipping and colour jitter only partially, hue adds a second cue: enough for a self-supervised
    learner to separate the classes while not being trivially linearly separable in pixel space.
    Train and test draw from different noise streams, so the two splits share no image.
    """

    def __init__(
        self, size: int, image_size: int, num_classes: int, channels: int, seed: int, split: str
    ) -> None:
        if channels not in (1, 3):
            raise DataError(f"synthetic_channels must be 1 or 3, got {channels}")
        if size <= 0 or image_size <= 0 or num_classes <= 0:
            raise DataError(
                f"synthetic_size, synthetic_image_size and synthetic_classes must be positive, "
                f"got {size}, {image_size}, {num_classes}"
            )
        if seed < 0:
            raise DataError(f"synthetic seed must be non-negative, got {seed}")
        self.size, self.image_size, self.channels, self.seed = size, image_size, channels, seed
        self.split = split
        # Any split other than train is a held-out one; all of them share one stream distinct from train's.
        self._split_code = 0 if split == "train" else 1
        self.classes = [f"class_{k}" for k in range(num_classes)]
        self.targets: list[int] = [i % num_classes for i in range(size)]  # balanced classes
        self._colours = np.array(
            [colorsys.hsv_to_rgb(k / num_classes, 0.8, 1.0) for k in range(num_classes)], dtype=np.float32
        )
        grid = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size
        self._ys, self._xs = np.meshgrid(grid, grid, indexing="ij")

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        if not 0 <= index < self.size:
            raise IndexError(f"synthetic index {index} out of range [0, {self.size})")
        label = self.targets[index]
        # A private generator per item: the image depends only on (seed, split, index), never on call order.
        rng = np.random.default_rng([self.seed, self._split_code, index])
        num_classes = len(self.classes)
        angle = np.pi * label / num_classes + rng.normal(0.0, 0.05)
        cycles = 2.0 + label % 3
        phase = rng.uniform(0.0, 2.0 * np.pi)
        wave = np.sin(2.0 * np.pi * cycles * (self._xs * np.cos(angle) + self._ys * np.sin(angle)) + phase)
        intensity = 0.5 + 0.4 * wave
        if self.channels == 3:
            pixels = intensity[..., None] * self._colours[label]
        else:
            pixels = intensity
        pixels = pixels + rng.normal(0.0, 0.08, size=pixels.shape)
        array = (np.clip(pixels, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        return Image.fromarray(array), label  # uint8 HxW -> "L", HxWx3 -> "RGB"


def _imagefolder_directory(root: str | os.PathLike | None, split: str) -> Path:
    """root/<split>; "test" falls back to root/val because ImageNet-style trees ship only train and val."""
    if root is None:
        raise DataError("data source 'imagefolder' needs data.root (a directory with train/ and val/)")
    if split not in ("train", "val", "test"):
        raise DataError(f"imagefolder split {split!r} is unknown; valid splits: ['test', 'train', 'val']")
    base = Path(root)
    candidates = [base / split] + ([base / "val"] if split == "test" else [])
    for directory in candidates:
        if directory.is_dir():
            return directory
    raise FileNotFoundError(
        f"ImageFolder split {split!r} not found: searched {', '.join(str(c) for c in candidates)} "
        f"(expected <data.root>/{split}/<class>/<image>)"
    )


class DataSource(NamedTuple):
    """What a data.source name builds, from a run's `data` section."""

    build: Callable[[Any, str, int], Dataset]  # (data section, split, seed) -> that split's dataset
    channels: Callable[[Any], int]  # the images' channels, read from the data section without opening the data


SOURCES: Registry[DataSource] = Registry("data.source")
register_choices(SOURCES.key, SOURCES.helps)


def _fashion_mnist(data, split: str, seed: int) -> Dataset:
    return FashionMNIST(split, data.root)


def _imagefolder(data, split: str, seed: int) -> Dataset:
    directory = _imagefolder_directory(data.root, split)
    try:
        return ImageFolderDataset(str(directory))
    except FileNotFoundError as exc:  # torchvision's message for a tree with no classes or no images
        raise DataError(
            f"ImageFolder directory {directory} holds no images in class subdirectories "
            f"(expected {directory}/<class>/<image>): {exc}"
        ) from None


def _synthetic(data, split: str, seed: int) -> Dataset:
    return SyntheticDataset(data.synthetic_size, data.synthetic_image_size, data.synthetic_classes,
                            data.synthetic_channels, seed, split)


def _webdataset(data, split: str, seed: int) -> Dataset:
    key = "data.shards" if split == "train" else "data.eval_shards"
    pattern = data.shards if split == "train" else data.eval_shards
    if not pattern:
        raise DataError(f"data.source=webdataset: the {split!r} split needs {key} (shard URLs)")
    return ShardDataset(pattern, data.shard_channels, key)


SOURCES.add("fashion_mnist", DataSource(_fashion_mnist, lambda data: 1),
            "Fashion-MNIST's IDX files, in data.root or else searched for where installers put them")
SOURCES.add("imagefolder", DataSource(_imagefolder, lambda data: 3),
            "an ImageFolder tree, `data.root/train/<class>/<image>` and `data.root/val/...`")
SOURCES.add("synthetic", DataSource(_synthetic, lambda data: data.synthetic_channels),
            "images made on the fly, shaped by the `data.synthetic_*` options (tests, smoke runs)")
SOURCES.add("webdataset", DataSource(_webdataset, lambda data: data.shard_channels),
            "tar shards streamed in order (data.shards, data.eval_shards; written by `mokd shards`)")


def build_dataset(
    source: str,
    split: str,
    root: str | os.PathLike | None,
    synthetic_size: int = 512,
    synthetic_image_size: int = 32,
    synthetic_classes: int = 10,
    synthetic_channels: int = 3,
    seed: int = 0,
) -> Dataset:
    """The `split` ("train", "val" or "test") of data source `source` (one of SOURCES) from explicit settings.

    `root` is the data directory (Fashion-MNIST: optional, searched for otherwise; ImageFolder: required).
    The synthetic_* arguments and `seed` only affect the synthetic source.
    """
    data = DataConfig(source=source, root=None if root is None else str(root), synthetic_size=synthetic_size,
                      synthetic_image_size=synthetic_image_size, synthetic_classes=synthetic_classes,
                      synthetic_channels=synthetic_channels)
    return SOURCES.get(source).build(data, split, seed)


def num_classes(dataset: Dataset) -> int:
    """Number of classes of a dataset from this module (or a torch Subset of one)."""
    while isinstance(dataset, Subset):  # label-subset fine-tuning wraps datasets in Subset
        dataset = dataset.dataset
    classes = getattr(dataset, "classes", None)
    if classes is not None:
        return len(classes)
    targets = getattr(dataset, "targets", None)
    if targets is None or len(targets) == 0:
        raise TypeError(f"{type(dataset).__name__} exposes neither .classes nor non-empty .targets")
    return int(max(targets)) + 1


class IndexedSubset(Subset):
    """The samples of `dataset` at `indices`, keeping the dataset's `.channels`, `.classes` and `.targets`."""

    def __init__(self, dataset: Dataset, indices: list[int]) -> None:
        super().__init__(dataset, indices)
        self.channels = dataset.channels
        self.classes = getattr(dataset, "classes", None)
        self.targets = [dataset.targets[index] for index in indices]


def _random_indices(length: int, seed: int) -> torch.Tensor:
    # Random rather than the first N: an ImageFolder is sorted by class, so its first N images are a few classes.
    return torch.randperm(length, generator=torch.Generator().manual_seed(seed))


def limit_size(dataset: Dataset, size: int, seed: int) -> Dataset:
    """The dataset itself when `size` is 0 or not smaller, else a fixed random subset of `size` samples."""
    if size <= 0 or size >= len(dataset):
        return dataset
    return IndexedSubset(dataset, _random_indices(len(dataset), seed)[:size].sort().values.tolist())


# The validation split is the same for every run (independent of train.seed), so tuning runs of different seeds
# are scored on the same images.
VALIDATION_SEED = 20_240_229


def carve_validation(train_set: Dataset, size: int, split: str, key: str = "data.validation_samples") -> Dataset:
    """`size` fixed random images of the training split as "validation", the rest as "train" (disjoint)."""
    if not 0 < size < len(train_set):
        raise DataError(f"{key}={size} must be between 1 and {len(train_set) - 1} (the training split has "
                         f"{len(train_set)} images)")
    order = _random_indices(len(train_set), VALIDATION_SEED)
    chosen = order[:size] if split == "validation" else order[size:]
    return IndexedSubset(train_set, chosen.sort().values.tolist())


def dataset_for(data_config, split: str, seed: int) -> Dataset:
    """`build_dataset` with the arguments of a run's `data` config section (its source, root and synthetic_*).

    data.source=webdataset: the shards of data.shards ("train") or data.eval_shards (any other split), in order.
    data.validation_samples > 0: "validation" is that many fixed images carved from the training split, and
    "train" is the rest of it (hyper-parameters are tuned on "validation", never on "test").
    """
    if split == "validation" or (split == "train" and data_config.validation_samples > 0):
        if data_config.validation_samples <= 0:
            raise DataError("the validation split needs data.validation_samples > 0 (images carved from train)")
        train_set = _source_split(data_config, "train", seed)
        return carve_validation(train_set, data_config.validation_samples, split)
    return _source_split(data_config, split, seed)


def _source_split(data_config, split: str, seed: int) -> Dataset:
    return SOURCES.get(data_config.source).build(data_config, split, seed)


def data_statistics(data_config, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation (mean, std) of a run's data: its source's, or data.shard_statistics' for shards."""
    source = data_config.shard_statistics if data_config.source == "webdataset" else data_config.source
    return dataset_statistics(source, channels)
