"""DINO multi-crop augmentation, the evaluation transform, and per-source normalisation statistics.

All randomness comes from torch's global CPU generator (torchvision transforms) and Python's `random`
(blur), so that seeding both per sample (see loader.MultiCropDataset) makes every crop reproducible.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from PIL import Image, ImageFilter
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

_MODES = {1: "L", 3: "RGB"}

# Native statistics per source: (mean, std) in [0, 1] pixel units.
_STATISTICS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet
    "fashion_mnist": ((0.2860,), (0.3530,)),  # Fashion-MNIST train split
    "synthetic": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
# ITU-R 601-2 luma weights, the ones PIL's convert("L") uses.
_LUMA = (0.299, 0.587, 0.114)


def dataset_statistics(source: str, channels: int | None = None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) for normalising images of `source`, one value per channel.

    `channels` defaults to the source's native count (fashion_mnist 1, the others 3). When it differs, 1-channel
    statistics are repeated, and 3-channel ones are reduced with the luma weights (exact for the mean, an
    approximation for the std) to match a transform that converts the images.
    """
    try:
        mean, std = _STATISTICS[source]
    except KeyError:
        raise ValueError(f"data source {source!r} is unknown; valid sources: {sorted(_STATISTICS)}") from None
    if channels is None or channels == len(mean):
        return mean, std
    if channels == 3:
        return mean * 3, std * 3
    if channels == 1:
        # Rounded like the quoted statistics, and so that equal channels (synthetic 0.5) stay exactly equal.
        def luma(values: tuple[float, ...]) -> tuple[float, ...]:
            return (round(sum(w * v for w, v in zip(_LUMA, values)), 4),)

        return luma(mean), luma(std)
    raise ValueError(f"channels must be 1 or 3, got {channels}")


def _check_normalisation(mean: Sequence[float], std: Sequence[float], channels: int) -> None:
    if channels not in _MODES:
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean {tuple(mean)} and std {tuple(std)} must have one value per channel ({channels})")


class _ToMode:
    """Convert a PIL image to "L" or "RGB" (a no-op when it already is)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, image: Image.Image) -> Image.Image:
        return image if image.mode == self.mode else image.convert(self.mode)


class _RandomGaussianBlur:
    """DINO's blur: with probability p, PIL Gaussian blur of radius uniform in [radius_min, radius_max]."""

    def __init__(self, p: float, radius_min: float, radius_max: float) -> None:
        self.p, self.radius_min, self.radius_max = p, radius_min, radius_max

    def __call__(self, image: Image.Image) -> Image.Image:
        if random.random() >= self.p:
            return image
        return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.radius_min, self.radius_max)))


BLUR_REFERENCE_SIDE = 224  # the crop side DINO's blur radii (0.1-2 px) were chosen for


class MultiCropTransform:
    """DINO multi-crop: a PIL image -> [global_1, global_2, local_1, ..., local_n] normalised tensors.

    Per crop: random resized crop (bicubic), horizontal flip p=0.5, colour jitter (0.4, 0.4, 0.2, 0.1) with
    p=0.8, grayscale p=0.2, Gaussian blur (p 1.0 / 0.1 / 0.5 for global 1 / global 2 / locals), solarise p=0.2
    on global 2 only. The blur radius range `blur_sigma` is given for 224 px and scaled by each crop's side / 224,
    so a 20 px crop is blurred as much, relative to its size, as a 224 px one. With channels=1 the input is
    converted to "L" and saturation, hue and grayscale are left out: they have no effect on a single channel.
    """

    def __init__(
        self,
        global_crop_size: int,
        local_crop_size: int,
        n_local_crops: int,
        global_crop_scale: tuple[float, float],
        local_crop_scale: tuple[float, float],
        mean: Sequence[float],
        std: Sequence[float],
        channels: int,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
    ) -> None:
        _check_normalisation(mean, std, channels)
        if n_local_crops < 0:
            raise ValueError(f"n_local_crops must be >= 0, got {n_local_crops}")
        self.channels = channels
        self.n_local_crops = n_local_crops
        self.mean, self.std = tuple(mean), tuple(std)
        self.crop_sizes = (global_crop_size,) * 2 + (local_crop_size,) * n_local_crops
        self.solarize_threshold = 128
        to_mode = _ToMode(_MODES[channels])
        if channels == 3:
            colour = [
                T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
                T.RandomGrayscale(p=0.2),
            ]
        else:
            colour = [T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4)], p=0.8)]
        flip_and_colour = [T.RandomHorizontalFlip(p=0.5), *colour]
        normalise = [T.ToTensor(), T.Normalize(tuple(mean), tuple(std))]

        def crop(size: int, scale: tuple[float, float]) -> T.RandomResizedCrop:
            return T.RandomResizedCrop(size, scale=tuple(scale), interpolation=InterpolationMode.BICUBIC)

        def blur(p: float, size: int) -> _RandomGaussianBlur:
            factor = size / BLUR_REFERENCE_SIDE
            return _RandomGaussianBlur(p, blur_sigma[0] * factor, blur_sigma[1] * factor)

        self.global_1 = T.Compose(
            [to_mode, crop(global_crop_size, global_crop_scale), *flip_and_colour, blur(1.0, global_crop_size),
             *normalise]
        )
        self.global_2 = T.Compose(
            [to_mode, crop(global_crop_size, global_crop_scale), *flip_and_colour, blur(0.1, global_crop_size),
             T.RandomSolarize(threshold=self.solarize_threshold, p=0.2), *normalise]
        )
        self.local = T.Compose(
            [to_mode, crop(local_crop_size, local_crop_scale), *flip_and_colour, blur(0.5, local_crop_size),
             *normalise]
        )

    def pipelines(self) -> list[T.Compose]:
        """The pipeline of each crop position, in the order the crops are made (and their randomness drawn)."""
        return [self.global_1, self.global_2] + [self.local] * self.n_local_crops

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        return [pipeline(image) for pipeline in self.pipelines()]


class EvalTransform:
    """Deterministic evaluation view: a PIL image -> one normalised [channels, image_size, image_size] tensor.

    Images larger than image_size get the ImageNet protocol (shorter side to image_size * resize_ratio, then a
    centre crop); images already no larger than image_size (28-32 px sources) are only brought to image_size
    (shorter side resized, centre crop), which is a no-op when they already match.
    """

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        channels: int,
        resize_ratio: float = 256 / 224,
    ) -> None:
        _check_normalisation(mean, std, channels)
        self.image_size = image_size
        self.channels = channels
        self._to_mode = _ToMode(_MODES[channels])
        self._large = T.Compose(
            [T.Resize(round(image_size * resize_ratio), interpolation=InterpolationMode.BICUBIC),
             T.CenterCrop(image_size)]
        )
        self._small = T.Compose(
            [T.Resize(image_size, interpolation=InterpolationMode.BICUBIC), T.CenterCrop(image_size)]
        )
        self._normalise = T.Compose([T.ToTensor(), T.Normalize(tuple(mean), tuple(std))])

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = self._to_mode(image)
        if min(image.size) > self.image_size:
            image = self._large(image)
        elif image.size != (self.image_size, self.image_size):
            image = self._small(image)
        return self._normalise(image)
