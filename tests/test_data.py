"""Tests of the data layer: real Fashion-MNIST files, ImageFolder on real image files, synthetic data,
multi-crop augmentation, and the deterministic resumable loader."""

from __future__ import annotations

import gzip
import random
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from torch.utils.data import Subset
from torchvision import transforms as T

from mokd.data import (
    EvalTransform,
    FashionMNIST,
    MultiCropDataset,
    MultiCropTransform,
    ResumableBatchSampler,
    build_dataset,
    build_eval_loader,
    build_train_loader,
    collate_crops,
    dataset_statistics,
    num_classes,
)
from mokd.data import fashion_mnist
from mokd.data.fashion_mnist import ENV_VAR
from mokd.data.transforms import _RandomGaussianBlur


# ---------------------------------------------------------------------------------------------- Fashion-MNIST


@pytest.fixture(scope="module")
def fashion_train() -> FashionMNIST:
    return FashionMNIST("train")


def test_fashion_mnist_reads_the_installed_files(fashion_train: FashionMNIST) -> None:
    test = FashionMNIST("test")
    assert (len(fashion_train), len(test)) == (60000, 10000)
    assert fashion_train.data.shape == (60000, 28, 28) and fashion_train.data.dtype == np.uint8
    assert test.data.shape == (10000, 28, 28)
    for split in (fashion_train, test):
        assert min(split.targets) == 0 and max(split.targets) == 9
        assert np.bincount(split.targets).min() > 0
    image, label = fashion_train[0]
    assert image.mode == "L" and image.size == (28, 28) and isinstance(label, int)
    assert np.array_equal(np.asarray(image), fashion_train.data[0])
    assert fashion_train.channels == 1 and len(fashion_train.classes) == 10
    assert num_classes(fashion_train) == 10
    assert len(FashionMNIST("val")) == 10000  # alias of test


def test_fashion_mnist_missing_directory_names_paths_and_apt(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(FileNotFoundError) as info:
        FashionMNIST("train", root=str(tmp_path))
    assert str(tmp_path) in str(info.value) and "apt-get install dataset-fashion-mnist" in str(info.value)

    env_dir = tmp_path / "env"
    env_dir.mkdir()
    monkeypatch.setenv(ENV_VAR, str(env_dir))
    with pytest.raises(FileNotFoundError) as info:
        FashionMNIST("test")
    assert str(env_dir) in str(info.value) and ENV_VAR in str(info.value) and "apt-get" in str(info.value)


@pytest.mark.skipif(shutil.which("dpkg") is None, reason="dpkg fallback exists only on Debian-like systems")
def test_fashion_mnist_falls_back_to_dpkg_listing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setattr(fashion_mnist, "DEFAULT_DIR", tmp_path / "absent")
    images, labels = fashion_mnist.locate_files("test")
    assert images.name.startswith("t10k-images") and labels.parent == images.parent != tmp_path / "absent"


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_split(directory: Path, images: bytes, labels: bytes, gzipped: bool) -> tuple[Path, Path]:
    suffix = ".gz" if gzipped else ""
    image_path = directory / f"train-images-idx3-ubyte{suffix}"
    label_path = directory / f"train-labels-idx1-ubyte{suffix}"
    image_path.write_bytes(gzip.compress(images) if gzipped else images)
    label_path.write_bytes(gzip.compress(labels) if gzipped else labels)
    return image_path, label_path


@pytest.mark.parametrize("gzipped", [False, True])
def test_fashion_mnist_reads_small_plain_and_gzipped_idx(tmp_path: Path, gzipped: bool) -> None:
    pixels = np.arange(5 * 28 * 28).reshape(5, 28, 28) % 256
    _write_split(tmp_path, _idx_bytes(pixels), _idx_bytes(np.array([0, 1, 2, 3, 9])), gzipped)
    dataset = FashionMNIST("train", root=tmp_path)
    assert len(dataset) == 5 and dataset.targets == [0, 1, 2, 3, 9]
    assert np.array_equal(np.asarray(dataset[4][0]), pixels[4])


def test_fashion_mnist_corrupt_idx_is_a_clear_error(tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (4, 28, 28))  # incompressible: gzip stream is long
    labels = _idx_bytes(np.array([0, 1, 2, 3]))

    bad_magic = b"\x12\x34" + _idx_bytes(pixels)[2:]
    image_path, _ = _write_split(tmp_path, bad_magic, labels, gzipped=False)
    with pytest.raises(ValueError, match="magic") as info:
        FashionMNIST("train", root=tmp_path)
    assert str(image_path) in str(info.value)

    image_path, _ = _write_split(tmp_path, _idx_bytes(pixels)[:-100], labels, gzipped=False)
    with pytest.raises(ValueError, match="truncated") as info:
        FashionMNIST("train", root=tmp_path)
    assert str(image_path) in str(info.value)

    for path in tmp_path.iterdir():
        path.unlink()
    image_path, _ = _write_split(tmp_path, _idx_bytes(pixels), labels, gzipped=True)
    image_path.write_bytes(image_path.read_bytes()[:60])  # cut inside the gzip stream
    with pytest.raises(ValueError, match="gzip") as info:
        FashionMNIST("train", root=tmp_path)
    assert str(image_path) in str(info.value)


# ------------------------------------------------------------------------------------------------ ImageFolder


def _write_image(path: Path, size: tuple[int, int], mode: str, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, 255 - value, 40)).save(path)


def test_imagefolder_on_real_files(tmp_path: Path) -> None:
    _write_image(tmp_path / "train" / "cat" / "a.png", (40, 30), "RGB", 10)
    _write_image(tmp_path / "train" / "cat" / "b.jpg", (50, 50), "RGB", 90)
    _write_image(tmp_path / "train" / "dog" / "c.png", (20, 64), "L", 200)
    _write_image(tmp_path / "val" / "cat" / "d.jpeg", (33, 33), "RGB", 120)
    _write_image(tmp_path / "val" / "dog" / "e.png", (33, 33), "RGB", 220)

    train = build_dataset("imagefolder", "train", str(tmp_path))
    assert len(train) == 3 and train.classes == ["cat", "dog"] and train.targets == [0, 0, 1]
    assert train.channels == 3 and num_classes(train) == 2
    image, label = train[2]
    assert image.mode == "RGB" and image.size == (20, 64) and label == 1  # grayscale PNG loaded as RGB

    test = build_dataset("imagefolder", "test", str(tmp_path))  # no test/: falls back to val/
    assert len(test) == 2 and test.targets == [0, 1]


def test_imagefolder_missing_and_empty_directories(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "train")):
        build_dataset("imagefolder", "train", str(tmp_path))
    (tmp_path / "val").mkdir()
    with pytest.raises(ValueError, match=str(tmp_path / "val")):
        build_dataset("imagefolder", "val", str(tmp_path))
    with pytest.raises(ValueError, match="data.root"):
        build_dataset("imagefolder", "train", None)


def test_unknown_source_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="fashion_mnist.*imagefolder.*synthetic"):
        build_dataset("cifar", "train", None)
    with pytest.raises(ValueError, match="fashion_mnist"):
        dataset_statistics("cifar")


# -------------------------------------------------------------------------------------------------- Synthetic


def test_synthetic_is_deterministic_and_splits_differ() -> None:
    first = build_dataset("synthetic", "train", None, synthetic_size=40, seed=3)
    second = build_dataset("synthetic", "train", None, synthetic_size=40, seed=3)
    test = build_dataset("synthetic", "test", None, synthetic_size=40, seed=3)
    other_seed = build_dataset("synthetic", "train", None, synthetic_size=40, seed=4)
    assert first.channels == 3 and num_classes(first) == 10 and first.targets == second.targets
    for index in (0, 17, 39):
        image, label = first[index]
        assert image.mode == "RGB" and image.size == (32, 32)
        assert np.array_equal(np.asarray(image), np.asarray(second[index][0])) and label == second[index][1]
        assert not np.array_equal(np.asarray(image), np.asarray(test[index][0]))
        assert not np.array_equal(np.asarray(image), np.asarray(other_seed[index][0]))
    gray = build_dataset("synthetic", "train", None, synthetic_size=8, synthetic_image_size=20,
                         synthetic_classes=4, synthetic_channels=1)
    assert gray[0][0].mode == "L" and gray[0][0].size == (20, 20) and gray.channels == 1 and num_classes(gray) == 4


def test_synthetic_classes_are_separable() -> None:
    """Nearest class centroid on phase-invariant features (FFT magnitude) of grayscale images: held-out
    images are classified almost perfectly, so the classes carry learnable structure."""
    def features(dataset):
        images = [np.asarray(dataset[i][0], dtype=np.float32) for i in range(len(dataset))]
        x = np.stack([np.abs(np.fft.fft2(image)).ravel() for image in images])
        return x / np.linalg.norm(x, axis=1, keepdims=True), np.array(dataset.targets)

    common = dict(synthetic_channels=1, synthetic_image_size=32)
    x_train, y_train = features(build_dataset("synthetic", "train", None, synthetic_size=200, **common))
    x_test, y_test = features(build_dataset("synthetic", "test", None, synthetic_size=100, **common))
    centroids = np.stack([x_train[y_train == k].mean(0) for k in range(10)])
    accuracy = (np.argmax(x_test @ centroids.T, axis=1) == y_test).mean()
    assert accuracy > 0.9


# ------------------------------------------------------------------------------------------------- Transforms


def _random_image(mode: str, size: tuple[int, int]) -> Image.Image:
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, shape, np.uint8))


def _multicrop(channels: int, n_local: int = 4, global_size: int = 24, local_size: int = 12) -> MultiCropTransform:
    mean, std = dataset_statistics("synthetic", channels)
    return MultiCropTransform(global_size, local_size, n_local, (0.25, 1.0), (0.05, 0.25), mean, std, channels)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize(("mode", "size"), [("L", (28, 28)), ("RGB", (40, 23)), ("L", (97, 64)), ("RGB", (17, 31))])
def test_multicrop_count_shapes_and_channels(channels: int, mode: str, size: tuple[int, int]) -> None:
    transform = _multicrop(channels, n_local=5, global_size=24, local_size=12)
    crops = transform(_random_image(mode, size))
    assert len(crops) == 2 + 5
    assert [tuple(c.shape) for c in crops[:2]] == [(channels, 24, 24)] * 2
    assert [tuple(c.shape) for c in crops[2:]] == [(channels, 12, 12)] * 5
    assert all(c.dtype == torch.float32 and torch.isfinite(c).all() for c in crops)


def _forced(transform: MultiCropTransform, flip: float, jitter: float, grayscale: float, blur: float,
            solarise: float) -> MultiCropTransform:
    """The same transform with every random branch's probability set (0: never, 1: always)."""
    kinds = ((T.RandomHorizontalFlip, flip), (T.RandomApply, jitter), (T.RandomGrayscale, grayscale),
             (_RandomGaussianBlur, blur), (T.RandomSolarize, solarise))
    for pipeline in (transform.global_1, transform.global_2, transform.local):
        for step in pipeline.transforms:
            for kind, p in kinds:
                if isinstance(step, kind):
                    step.p = p
    return transform


def _whole_image_crops(channels: int) -> MultiCropTransform:
    """Crops of the whole 24 x 24 image at 24 px: scale (1, 1) on a square image leaves RandomResizedCrop only its
    fallback, the full image, and a resize to the same size copies the pixels."""
    mean, std = dataset_statistics("synthetic", channels)
    return MultiCropTransform(24, 24, 1, (1.0, 1.0), (1.0, 1.0), mean, std, channels)


def _normalised(pixels: np.ndarray) -> torch.Tensor:
    """uint8 [H, W] or [H, W, 3] -> [C, H, W] with the synthetic statistics (0.5, 0.5)."""
    values = torch.from_numpy(pixels.astype(np.float64) / 255)
    values = values.unsqueeze(0) if values.dim() == 2 else values.permute(2, 0, 1)
    return ((values - 0.5) / 0.5).float()


def test_multicrop_with_nothing_random_applied_gives_the_image_itself() -> None:
    pixels = np.random.default_rng(10).integers(0, 256, (24, 24, 3), np.uint8)
    crops = _forced(_whole_image_crops(3), 0, 0, 0, 0, 0)(Image.fromarray(pixels))
    assert len(crops) == 3
    for crop in crops:
        torch.testing.assert_close(crop, _normalised(pixels), rtol=0, atol=1e-6)


def test_flip_grayscale_and_solarise_give_the_literal_pixels() -> None:
    """Always flipped, greyed and (global 2) solarised: the mirror image, luma 0.299 R + 0.587 G + 0.114 B in all
    three channels, and every level >= 128 replaced by 255 - level; within one level (PIL's fixed-point luma)."""
    pixels = np.random.default_rng(11).integers(0, 256, (24, 24, 3), np.uint8)
    crops = _forced(_whole_image_crops(3), 1, 0, 1, 0, 1)(Image.fromarray(pixels))
    mirrored = pixels[:, ::-1].astype(np.float64)
    luma = np.rint(mirrored @ np.array([0.299, 0.587, 0.114]))
    solarised = np.where(luma >= 128, 255 - luma, luma)
    one_level = 2 / 255 + 1e-6  # one grey level after (x / 255 - 0.5) / 0.5
    for crop, expected in ((crops[0], luma), (crops[1], solarised), (crops[2], luma)):
        expected = _normalised(np.repeat(expected[..., None], 3, axis=2).astype(np.uint8))
        torch.testing.assert_close(crop, expected, rtol=0, atol=one_level)
        assert ((crop - expected).abs() > 1e-6).float().mean() < 0.1  # off by a level only at rounding ties


def test_one_channel_flip_and_solarise_give_the_literal_pixels() -> None:
    pixels = np.random.default_rng(12).integers(0, 256, (24, 24), np.uint8)
    crops = _forced(_whole_image_crops(1), 1, 0, 1, 0, 1)(Image.fromarray(pixels))
    mirrored = pixels[:, ::-1]
    solarised = np.where(mirrored >= 128, 255 - mirrored, mirrored).astype(np.uint8)
    for crop, expected in ((crops[0], mirrored), (crops[1], solarised), (crops[2], mirrored)):
        torch.testing.assert_close(crop, _normalised(np.ascontiguousarray(expected)), rtol=0, atol=1e-6)


def test_blur_radius_scales_with_the_crop_side() -> None:
    """Global 1 always blurs, with a radius drawn from blur_sigma scaled by side / 224: at 24 px a (14, 14) range
    becomes exactly 1.5 px, so the crop equals PIL's Gaussian blur of radius 1.5 of the image."""
    pixels = np.random.default_rng(13).integers(0, 256, (24, 24), np.uint8)
    mean, std = dataset_statistics("synthetic", 1)
    transform = MultiCropTransform(24, 24, 0, (1.0, 1.0), (1.0, 1.0), mean, std, 1, blur_sigma=(14.0, 14.0))
    crop = _forced(transform, 0, 0, 0, 1, 0)(Image.fromarray(pixels))[0]
    expected = np.asarray(Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(radius=1.5)))
    torch.testing.assert_close(crop, _normalised(expected), rtol=0, atol=1e-6)
    assert not torch.equal(crop, _normalised(pixels))


def test_multicrop_validates_normalisation_length() -> None:
    with pytest.raises(ValueError, match="one value per channel"):
        MultiCropTransform(24, 12, 2, (0.25, 1.0), (0.05, 0.25), (0.5,), (0.5,), 3)


def test_eval_transform_large_small_and_exact_sizes() -> None:
    mean, std = dataset_statistics("synthetic", 3)
    transform = EvalTransform(32, mean, std, 3)
    assert transform(Image.new("RGB", (100, 60))).shape == (3, 32, 32)
    assert transform(Image.new("L", (20, 26))).shape == (3, 32, 32)
    pixels = np.random.default_rng(2).integers(0, 256, (32, 32, 3), np.uint8)
    exact = transform(Image.fromarray(pixels))  # already the right size: no resampling at all
    expected = (torch.from_numpy(pixels).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
    assert torch.allclose(exact, expected, atol=1e-6)
    gray = EvalTransform(28, *dataset_statistics("fashion_mnist"), channels=1)
    assert gray(Image.new("RGB", (28, 28))).shape == (1, 28, 28)


def test_fashion_mnist_statistics_are_those_of_the_real_train_split(fashion_train) -> None:
    """The engine's constants against the mean and std of all 60000 x 784 train pixels; the constants are quoted
    to four decimals, so they must lie within half a unit of the fourth decimal (5e-5)."""
    counts = np.bincount(fashion_train.data.ravel(), minlength=256).astype(np.float64)  # a histogram of levels
    levels = np.arange(256) / 255
    pixel_mean = (counts * levels).sum() / counts.sum()
    pixel_std = np.sqrt((counts * (levels - pixel_mean) ** 2).sum() / counts.sum())
    mean, std = dataset_statistics("fashion_mnist")
    assert mean == pytest.approx((pixel_mean,), abs=5e-5)
    assert std == pytest.approx((pixel_std,), abs=5e-5)
    assert dataset_statistics("fashion_mnist", 3) == (mean * 3, std * 3)


def test_dataset_statistics_reduce_to_one_channel_with_the_luma_weights() -> None:
    mean, std = dataset_statistics("imagefolder")
    assert len(mean) == len(std) == 3
    gray_mean, gray_std = dataset_statistics("imagefolder", 1)
    assert gray_mean == pytest.approx((0.299 * mean[0] + 0.587 * mean[1] + 0.114 * mean[2],), abs=5e-5)
    assert gray_std == pytest.approx((0.299 * std[0] + 0.587 * std[1] + 0.114 * std[2],), abs=5e-5)
    assert dataset_statistics("synthetic", 1) == ((0.5,), (0.5,))
    with pytest.raises(ValueError, match="unknown"):
        dataset_statistics("cifar")


# ---------------------------------------------------------------------------------------------------- Loading


@pytest.fixture(scope="module")
def synthetic_small():
    return build_dataset("synthetic", "train", None, synthetic_size=48, synthetic_image_size=24)


def test_same_index_and_seed_give_identical_crops(synthetic_small) -> None:
    dataset = MultiCropDataset(synthetic_small, _multicrop(3))
    crops_a, label_a = dataset[(5, 1234)]
    crops_b, label_b = dataset[(5, 1234)]
    assert label_a == label_b and all(torch.equal(a, b) for a, b in zip(crops_a, crops_b))
    crops_c, _ = dataset[(5, 1235)]
    assert not all(torch.equal(a, c) for a, c in zip(crops_a, crops_c))
    with pytest.raises(TypeError, match="sample_seed"):
        dataset[5]


def test_augmentation_leaves_the_callers_rng_untouched(synthetic_small) -> None:
    dataset = MultiCropDataset(synthetic_small, _multicrop(3))
    torch.manual_seed(7)
    random.seed(7)
    torch_state, python_state, numpy_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    dataset[(3, 99)]
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == python_state
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), numpy_state))
    after_call = (torch.rand(3), random.random())
    torch.manual_seed(7)
    random.seed(7)
    assert torch.equal(after_call[0], torch.rand(3)) and after_call[1] == random.random()


def _epoch_batches(loader, sampler, epoch: int) -> list:
    sampler.set_epoch(epoch)
    return list(loader)


def test_batches_identical_for_zero_and_two_workers(synthetic_small) -> None:
    transform = _multicrop(3, n_local=2, global_size=16, local_size=8)
    serial, serial_sampler = build_train_loader(synthetic_small, transform, 8, seed=11, num_workers=0)
    parallel, parallel_sampler = build_train_loader(synthetic_small, transform, 8, seed=11, num_workers=2)
    for epoch in (0, 1):
        expected, got = _epoch_batches(serial, serial_sampler, epoch), _epoch_batches(parallel, parallel_sampler, epoch)
        assert len(expected) == len(got) == len(serial_sampler) == 6
        for (crops_e, labels_e), (crops_g, labels_g) in zip(expected, got):
            assert torch.equal(labels_e, labels_g)
            assert len(crops_e) == 4 and crops_e[0].shape == (8, 3, 16, 16) and crops_e[2].shape == (8, 3, 8, 8)
            assert all(torch.equal(a, b) for a, b in zip(crops_e, crops_g))


def test_collate_crops_stacks_per_position() -> None:
    batch = [([torch.zeros(1, 4, 4), torch.ones(1, 2, 2)], 3), ([torch.ones(1, 4, 4), torch.zeros(1, 2, 2)], 5)]
    crops, labels = collate_crops(batch)
    assert [tuple(c.shape) for c in crops] == [(2, 1, 4, 4), (2, 1, 2, 2)]
    assert labels.tolist() == [3, 5] and labels.dtype == torch.long


def test_eval_loader_keeps_order_and_last_batch(synthetic_small) -> None:
    loader = build_eval_loader(synthetic_small, EvalTransform(24, *dataset_statistics("synthetic"), channels=3),
                               batch_size=20, num_workers=0)
    batches = list(loader)
    assert [len(labels) for _, labels in batches] == [20, 20, 8]
    assert torch.cat([labels for _, labels in batches]).tolist() == synthetic_small.targets
    assert batches[0][0].shape == (20, 3, 24, 24)


@pytest.mark.parametrize("drop_last", [True, False])
def test_sampler_ranks_equal_and_disjoint(drop_last: bool) -> None:
    size, batch, world = 103, 8, 3
    samplers = [ResumableBatchSampler(size, batch, seed=5, rank=r, world_size=world, drop_last=drop_last)
                for r in range(world)]
    per_rank = [[index for b in s for index, _ in b] for s in samplers]
    counts = [len(list(s)) for s in samplers]
    assert counts == [len(samplers[0])] * world == [4 if drop_last else 5] * world
    if drop_last:
        assert all(len(b) == batch for s in samplers for b in s)
        assert sum(len(set(indices)) for indices in per_rank) == len(set().union(*map(set, per_rank))) == 96
    else:  # every sample seen, padding only wraps around
        assert set().union(*map(set, per_rank)) == set(range(size)) and sum(map(len, per_rank)) == 105


def test_sampler_order_depends_on_seed_and_epoch_only() -> None:
    def epoch_items(seed: int, epoch: int) -> list:
        sampler = ResumableBatchSampler(64, 8, seed=seed)
        sampler.set_epoch(epoch)
        return [item for b in sampler for item in b]

    assert epoch_items(1, 0) == epoch_items(1, 0)
    assert [i for i, _ in epoch_items(1, 0)] != [i for i, _ in epoch_items(1, 1)]
    assert [i for i, _ in epoch_items(1, 0)] != [i for i, _ in epoch_items(2, 0)]
    seeds_0 = dict(epoch_items(1, 0))
    seeds_1 = dict(epoch_items(1, 1))
    assert all(0 <= s < 2**63 for s in seeds_0.values()) and len(set(seeds_0.values())) == 64
    assert all(seeds_0[i] != seeds_1[i] for i in range(64))  # fresh augmentations every epoch
    unshuffled = ResumableBatchSampler(16, 4, seed=0, shuffle=False)
    assert [i for b in unshuffled for i, _ in b] == list(range(16))


def test_set_start_batch_resumes_with_the_exact_tail() -> None:
    sampler = ResumableBatchSampler(100, 7, seed=9, rank=1, world_size=2)
    sampler.set_epoch(3)
    full = list(sampler)
    resumed = ResumableBatchSampler(100, 7, seed=9, rank=1, world_size=2)
    resumed.set_start_batch(4)
    resumed.set_epoch(3)
    assert list(resumed) == full[4:] and len(resumed) == len(full) == 7
    assert list(resumed) == full  # the skip applies to one epoch only
    with pytest.raises(ValueError, match="start_batch"):
        resumed.set_start_batch(8)


def test_resume_through_the_loader_matches_uninterrupted(synthetic_small) -> None:
    transform = _multicrop(1, n_local=1, global_size=12, local_size=8)
    loader, sampler = build_train_loader(synthetic_small, transform, 6, seed=2, num_workers=0)
    full = _epoch_batches(loader, sampler, 1)
    sampler.set_start_batch(5)
    tail = _epoch_batches(loader, sampler, 1)
    assert len(tail) == len(full) - 5
    for (crops_f, labels_f), (crops_t, labels_t) in zip(full[5:], tail):
        assert torch.equal(labels_f, labels_t) and all(torch.equal(a, b) for a, b in zip(crops_f, crops_t))


def test_num_classes_of_subset(synthetic_small) -> None:
    assert num_classes(Subset(synthetic_small, [0, 1, 2])) == 10


def test_sampler_rejects_impossible_sizes() -> None:
    with pytest.raises(ValueError, match="cannot fill one batch"):
        ResumableBatchSampler(10, 8, seed=0, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        ResumableBatchSampler(10, 2, seed=0, rank=2, world_size=2)


def test_limit_size_is_a_fixed_random_subset_that_keeps_the_metadata():
    from mokd.data import limit_size

    dataset = build_dataset("synthetic", "train", None, synthetic_size=100, synthetic_channels=1)
    assert limit_size(dataset, 0, seed=0) is dataset and limit_size(dataset, 100, seed=0) is dataset
    subset = limit_size(dataset, 30, seed=0)
    again = limit_size(dataset, 30, seed=0)
    assert len(subset) == 30 and subset.indices == again.indices
    assert subset.indices != list(range(30))  # not the first N (an ImageFolder is sorted by class)
    assert subset.channels == 1 and subset.targets == [dataset.targets[i] for i in subset.indices]
    assert limit_size(dataset, 30, seed=1).indices != subset.indices


def test_validation_split_is_carved_from_train_disjoint_and_fixed() -> None:
    from mokd.config import load_config
    from mokd.data import dataset_for, limit_size

    def images_of(dataset) -> set[bytes]:
        return {np.asarray(dataset[i][0]).tobytes() for i in range(len(dataset))}

    overrides = ["data.source=synthetic", "data.synthetic_size=120", "data.validation_samples=30"]
    config = load_config("demo", overrides)
    full = images_of(dataset_for(load_config("demo", overrides[:2]).data, "train", 0))
    train, validation = dataset_for(config.data, "train", 0), dataset_for(config.data, "validation", 0)
    assert (len(train), len(validation)) == (90, 30)
    train_images, validation_images = images_of(train), images_of(validation)
    assert not train_images & validation_images and train_images | validation_images == full
    assert validation.targets == [label for _, label in (validation[i] for i in range(30))]
    # The same images whatever the run's seed (tuning runs of every seed are scored on one split)...
    assert dataset_for(config.data, "validation", 7).indices == validation.indices
    # ...and train.seed's training subset is drawn from what is left.
    subset = limit_size(train, 40, seed=3)
    assert len(subset) == 40 and not images_of(subset) & validation_images


def test_validation_split_options_are_checked() -> None:
    from mokd.config import ConfigError, load_config
    from mokd.data import dataset_for
    from mokd.eval.run_evaluation import eval_dataset

    with pytest.raises(ConfigError, match="eval.split=validation needs data.validation_samples"):
        load_config("demo", ["eval.split=validation"])
    with pytest.raises(ConfigError, match="data.validation_samples=-1 must be >= 0"):
        load_config("demo", ["data.validation_samples=-1"])
    with pytest.raises(ConfigError, match="eval.split='val' is not one of"):
        load_config("demo", ["eval.split=val"])
    with pytest.raises(ConfigError, match="data.validation_samples=5 carves a map-style dataset: add data.validation_samples=0"):
        load_config("demo", ["data.source=webdataset", "data.shards=/x/a.tar", "data.validation_samples=5"])
    too_many = load_config("demo", ["data.source=synthetic", "data.synthetic_size=50", "data.validation_samples=50"])
    with pytest.raises(ValueError, match="data.validation_samples=50 must be between 1 and 49"):
        dataset_for(too_many.data, "train", 0)
    # Evaluation scores the held-out split eval.split names.
    config = load_config("demo", ["data.source=synthetic", "data.synthetic_size=60", "data.validation_samples=20",
                                  "eval.split=validation"])
    assert eval_dataset(config, "test").indices == dataset_for(config.data, "validation", 0).indices
    assert len(eval_dataset(config, "train")) == 40
