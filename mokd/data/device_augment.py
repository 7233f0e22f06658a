"""DINO multi-crop on the training device: workers decode, the device crops and colours whole batches.

With data.augment=device a data worker only decodes an image to a uint8 tensor and draws every random
parameter of every crop (`draw_parameters`): the same torch and Python random calls, in the same order, that
MultiCropTransform's torchvision pipeline makes under the same per-sample seed, so each crop gets exactly the
box, flip, jitter order and factors, grayscale, blur radius and solarisation it would get from PIL, and a
resumed run stays exact. The device (`DeviceMultiCrop`) then applies them batch by batch with tensor
operations that repeat Pillow's integer and single-precision arithmetic step by step:

- crop + resize: Pillow's antialiased bicubic resample of the crop box, as two matrix products (horizontal pass,
  then vertical, each with Pillow's 22-bit fixed-point coefficients and rounding to uint8 in between), one
  batched product per crop size; float64 holds every fixed-point sum exactly;
- colour jitter (ImageEnhance blends, truncated like Image.blend; hue through Pillow's 8-bit HSV), grayscale
  (ITU-R 601-2 integer luma), Gaussian blur (Pillow's three extended box blurs per axis, in 24-bit fixed
  point), solarisation and normalisation, each on the sub-batch of crops that drew it.

On CPU the result equals the PIL pipeline's pixel for pixel (tests/test_augment.py measures it).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Callable, NamedTuple, Optional

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from mokd.data.loader import collate_crops
from mokd.data.sources import data_statistics
from mokd.data.transforms import MultiCropTransform, _RandomGaussianBlur, _ToMode
from mokd.errors import ConfigError

AUGMENT_MODES = ("workers", "device")

# Columns of a crop's parameter row. Factors and radius that were not drawn are NaN, the jitter order -1.
TOP, LEFT, HEIGHT, WIDTH, FLIP, JITTER = range(6)
ORDER = slice(6, 10)  # torchvision's fn_idx: 0 brightness, 1 contrast, 2 saturation, 3 hue
BRIGHTNESS, CONTRAST, SATURATION, HUE, GRAYSCALE, BLUR, RADIUS, SOLARISE = range(10, 18)
N_PARAMETERS = 18

_NOT_DRAWN = float("nan")


def draw_parameters(pipeline: T.Compose, channels: int, height: int, width: int) -> torch.Tensor:
    """The parameter row of one crop of an image of height x width: the random draws `pipeline` (one of
    MultiCropTransform's) makes on that image, made here in the same order from the same generators."""
    row = torch.full((N_PARAMETERS,), _NOT_DRAWN, dtype=torch.float64)
    row[ORDER] = -1
    row[[FLIP, JITTER, GRAYSCALE, BLUR, SOLARISE]] = 0
    for step in pipeline.transforms:
        if isinstance(step, T.RandomResizedCrop):
            shape = torch.empty(1, 1, 1).expand(channels, height, width)  # get_params reads only the size
            row[[TOP, LEFT, HEIGHT, WIDTH]] = torch.tensor(step.get_params(shape, step.scale, step.ratio),
                                                           dtype=torch.float64)
        elif isinstance(step, T.RandomHorizontalFlip):
            row[FLIP] = float(torch.rand(1) < step.p)
        elif isinstance(step, T.RandomApply):
            (jitter,) = step.transforms
            if not step.p < torch.rand(1):
                order, *factors = T.ColorJitter.get_params(jitter.brightness, jitter.contrast, jitter.saturation,
                                                           jitter.hue)
                row[JITTER] = 1
                row[ORDER] = order.to(torch.float64)
                row[BRIGHTNESS:HUE + 1] = torch.tensor([_NOT_DRAWN if f is None else f for f in factors],
                                                       dtype=torch.float64)
        elif isinstance(step, T.RandomGrayscale):
            row[GRAYSCALE] = float(torch.rand(1) < step.p)
        elif isinstance(step, _RandomGaussianBlur):
            if random.random() < step.p:
                row[BLUR] = 1
                row[RADIUS] = random.uniform(step.radius_min, step.radius_max)
        elif isinstance(step, T.RandomSolarize):
            row[SOLARISE] = float(torch.rand(1).item() < step.p)
        elif not isinstance(step, (_ToMode, T.ToTensor, T.Normalize)):
            raise TypeError(f"draw_parameters does not know the random draws of {type(step).__name__}")
    return row


def image_tensor(image: Image.Image, mode: str) -> torch.Tensor:
    """A PIL image as a uint8 [channels, height, width] tensor, converted to `mode` ("L" or "RGB") first."""
    array = np.array(_ToMode(mode)(image), dtype=np.uint8)
    tensor = torch.from_numpy(array)
    return tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1).contiguous()


class DecodeAndDraw:
    """The worker's side of data.augment=device: PIL image -> (uint8 [C, H, W] tensor, [n_crops, N_PARAMETERS]
    parameters drawn as `transform` would draw them). Run it under loader.seeded_transform, as the PIL path."""

    def __init__(self, transform: MultiCropTransform) -> None:
        self.transform = transform
        self.mode = "RGB" if transform.channels == 3 else "L"

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = image_tensor(image, self.mode)
        _, height, width = pixels.shape
        channels = self.transform.channels
        rows = [draw_parameters(pipeline, channels, height, width) for pipeline in self.transform.pipelines()]
        return pixels, torch.stack(rows)


class DecodedBatch(NamedTuple):
    """Images [B, C, H, W] uint8, zero-padded to the largest of the batch, and their crops' parameters
    [B, n_crops, N_PARAMETERS] (every crop box lies inside its image's own size)."""

    images: torch.Tensor
    parameters: torch.Tensor

    def to(self, device: torch.device) -> "DecodedBatch":
        return DecodedBatch(self.images.to(device, non_blocking=True), self.parameters.to(device, non_blocking=True))


def collate_decoded(batch: Sequence[tuple[tuple[torch.Tensor, torch.Tensor], int]]) -> tuple[DecodedBatch, torch.Tensor]:
    """[((image, parameters), label)] * B -> (DecodedBatch, [B] int64 labels)."""
    images = [sample[0][0] for sample in batch]
    height, width = max(image.shape[1] for image in images), max(image.shape[2] for image in images)
    padded = torch.zeros(len(images), images[0].shape[0], height, width, dtype=torch.uint8)
    for slot, image in zip(padded, images):
        slot[:, :image.shape[1], :image.shape[2]] = image
    parameters = torch.stack([sample[0][1] for sample in batch])
    return DecodedBatch(padded, parameters), torch.tensor([sample[1] for sample in batch], dtype=torch.long)


# ---- Pillow's arithmetic as batched tensor operations ----------------------------------------------------------
# Pixel tensors hold integer values 0..255 in float32 between operations, as the uint8 images of the PIL path.

_PRECISION_BITS = 22  # Resample.c: 32 - 8 - 2


def _bicubic(x: torch.Tensor) -> torch.Tensor:
    """Resample.c's bicubic_filter (a = -0.5), float64, in its order of operations."""
    a = -0.5
    x = x.abs()
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def resample_weights(extent: torch.Tensor, out_size: int, span: int) -> torch.Tensor:
    """[N, out_size, span] fixed-point coefficients (as float64) of Pillow's bicubic resize of N lines of
    `extent` pixels (positions >= extent get 0) to out_size: precompute_coeffs + normalize_coeffs_8bpc."""
    extent = extent.to(torch.float64)[:, None, None]
    scale = extent / out_size
    filterscale = scale.clamp(min=1.0)
    support = 2.0 * filterscale
    center = (torch.arange(out_size, dtype=torch.float64, device=extent.device)[None, :, None] + 0.5) * scale
    position = torch.arange(span, dtype=torch.float64, device=extent.device)[None, None, :]
    low = torch.trunc(center - support + 0.5).clamp(min=0)
    high = torch.minimum(torch.trunc(center + support + 0.5), extent)
    weights = _bicubic((position - center + 0.5) * (1.0 / filterscale))
    weights = torch.where((position >= low) & (position < high), weights, torch.zeros_like(weights))
    total = weights.sum(dim=-1, keepdim=True)
    weights = torch.where(total != 0, weights / total, weights)
    scaled = weights * (1 << _PRECISION_BITS)
    return torch.trunc(torch.where(weights < 0, scaled - 0.5, scaled + 0.5))


def _fixed_point_to_uint8(sums: torch.Tensor) -> torch.Tensor:
    """Resample.c's clip8 of (2^21 + sum): floor division by 2^22, clamped to 0..255."""
    return torch.floor((sums + (1 << (_PRECISION_BITS - 1))) / (1 << _PRECISION_BITS)).clamp(0, 255)


# Crops resampled together at most: the float64 crop regions of a batch of ImageNet images would otherwise take
# gigabytes (2 x 64 global crops of up to 500 x 600 px).
_RESAMPLE_ELEMENTS = 1 << 25


def resized_crops(images: torch.Tensor, image_index: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Pillow's img.crop(box).resize((size, size), BICUBIC) for N crops at once: [N, C, size, size] float32.

    images [B, C, H, W] uint8; image_index [N] (which image each crop is of); boxes [N, 4] (top, left, height,
    width) as torchvision's RandomResizedCrop draws them.
    """
    top, left, height, width = boxes.long().unbind(dim=1)
    span_h, span_w = int(height.max()), int(width.max())
    chunk = max(1, _RESAMPLE_ELEMENTS // (images.shape[1] * span_h * span_w))
    if len(boxes) > chunk:
        return torch.cat([resized_crops(images, image_index[begin:begin + chunk], boxes[begin:begin + chunk], size)
                          for begin in range(0, len(boxes), chunk)])
    rows = (top[:, None] + torch.arange(span_h, device=images.device)).clamp(max=images.shape[2] - 1)
    cols = (left[:, None] + torch.arange(span_w, device=images.device)).clamp(max=images.shape[3] - 1)
    region = images[image_index[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # [N, span_h, span_w, C]
    region = region.permute(0, 3, 1, 2).to(torch.float64)
    horizontal = resample_weights(width, size, span_w)  # [N, size, span_w]
    vertical = resample_weights(height, size, span_h)  # [N, size, span_h]
    # Horizontal pass first, rounded to uint8, as Pillow's ImagingResampleInner up to Pillow 12.
    passed = _fixed_point_to_uint8(region @ horizontal.transpose(1, 2)[:, None])  # [N, C, span_h, size]
    return _fixed_point_to_uint8(vertical[:, None] @ passed).to(torch.float32)


def luma(pixels: torch.Tensor) -> torch.Tensor:
    """Pillow's convert("L") of [N, 3, H, W] RGB: (19595 R + 38470 G + 7471 B + 2^15) >> 16, as [N, 1, H, W].
    Every partial sum stays below 2^24, so float32 holds it exactly."""
    red, green, blue = pixels.unbind(dim=1)
    return torch.floor((red * 19595 + green * 38470 + blue * 7471 + 32768) / 65536)[:, None]


def _grey(pixels: torch.Tensor) -> torch.Tensor:
    return pixels if pixels.shape[1] == 1 else luma(pixels)


def blend(degenerate: torch.Tensor, pixels: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Image.blend(degenerate, pixels, factor) (the ImageEnhance operations): float32 degenerate +
    factor * (pixels - degenerate), truncated and clipped to 0..255; factor [N]."""
    return (degenerate + factor.float()[:, None, None, None] * (pixels - degenerate)).trunc().clamp(0, 255)


def adjust_brightness(pixels: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return blend(torch.zeros_like(pixels), pixels, factor)


def adjust_contrast(pixels: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Contrast: towards the mean grey level of each image, rounded to an integer."""
    grey = _grey(pixels)
    mean = grey.to(torch.float64).sum(dim=(1, 2, 3)) / grey[0].numel()
    mean = torch.floor(mean + 0.5).to(torch.float32)[:, None, None, None]
    return blend(mean.expand_as(pixels), pixels, factor)


def adjust_saturation(pixels: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Color: towards the image's own grey version."""
    return blend(_grey(pixels).expand_as(pixels), pixels, factor)


def _f32(values: torch.Tensor) -> torch.Tensor:
    """Round float64 values to single precision and back: where Pillow's C stores a double into a float."""
    return values.to(torch.float32).to(torch.float64)


def rgb_to_hsv(pixels: torch.Tensor) -> torch.Tensor:
    """Pillow's convert("HSV") (Convert.c rgb2hsv_row): [N, 3, H, W] 0..255 -> 8-bit H, S, V, float64."""
    rgb = pixels.to(torch.float64)
    red, green, blue = rgb.unbind(dim=1)
    maxc, minc = rgb.amax(dim=1), rgb.amin(dim=1)
    grey = maxc == minc
    cr = torch.where(grey, torch.ones_like(maxc), maxc - minc)  # any non-zero value where unused
    saturation = _f32(cr / torch.where(maxc == 0, torch.ones_like(maxc), maxc))
    rc, gc, bc = (_f32((maxc - channel) / cr) for channel in (red, green, blue))
    hue = torch.where(red == maxc, _f32(bc - gc), torch.where(green == maxc, _f32(2.0 + rc - bc),
                                                               _f32(4.0 + gc - rc)))
    hue = _f32(torch.fmod(hue / 6.0 + 1.0, 1.0))
    h8 = torch.where(grey, torch.zeros_like(hue), torch.trunc(hue * 255.0).clamp(0, 255))
    s8 = torch.where(grey, torch.zeros_like(hue), torch.trunc(saturation * 255.0).clamp(0, 255))
    return torch.stack([h8, s8, maxc], dim=1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Pillow's HSV -> RGB (Convert.c hsv2rgb): [N, 3, H, W] 8-bit H, S, V (float64) -> RGB 0..255 float32."""
    h, s, v = hsv.unbind(dim=1)
    sector = torch.floor(h * 6.0 / 255.0)
    f = _f32(h * 6.0 / 255.0 - sector)
    fs = _f32(s / 255.0)

    def round_clip(x: torch.Tensor) -> torch.Tensor:  # C round(): half away from zero; the values are >= 0
        return torch.floor(x + 0.5).clamp(0, 255)

    p = round_clip(v * (1.0 - fs))
    q = round_clip(v * (1.0 - _f32(fs * f)))
    t = round_clip(v * (1.0 - fs * (1.0 - f)))
    sector = torch.remainder(sector, 6)
    table = {0: (v, t, p), 1: (q, v, p), 2: (p, v, t), 3: (p, q, v), 4: (t, p, v), 5: (v, p, q)}
    red, green, blue = (torch.zeros_like(v) for _ in range(3))
    for index, (r, g, b) in table.items():
        chosen = sector == index
        red, green, blue = (torch.where(chosen, new, old) for new, old in ((r, red), (g, green), (b, blue)))
    rgb = torch.stack([red, green, blue], dim=1)
    return torch.where((s == 0)[:, None], v[:, None].expand_as(rgb), rgb).to(torch.float32)


def adjust_hue(pixels: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's PIL adjust_hue: the 8-bit hue channel shifted by int(factor * 255), wrapping mod 256."""
    hsv = rgb_to_hsv(pixels)
    shift = torch.trunc(factor.to(torch.float64) * 255)[:, None, None]
    hue = torch.remainder(hsv[:, 0] + shift, 256)
    return hsv_to_rgb(torch.stack([hue, hsv[:, 1], hsv[:, 2]], dim=1))


def grayscale(pixels: torch.Tensor) -> torch.Tensor:
    """torchvision's PIL rgb_to_grayscale with three output channels."""
    return luma(pixels).expand_as(pixels).clone()


def box_blur_radius(radius: torch.Tensor) -> torch.Tensor:
    """BoxBlur.c's _gaussian_blur_radius(radius, 3 passes): the extended box radius, in single precision with
    C's promotions to double where its source has double literals."""
    radius = radius.to(torch.float32)
    sigma2 = radius * radius / 3
    length = torch.sqrt(12.0 * sigma2.double() + 1.0).float()
    whole = torch.floor((length.double() - 1.0) / 2.0).float()
    fraction = (2 * whole + 1) * (whole * (whole + 1) - 3 * sigma2)
    fraction = fraction / (6 * (sigma2 - (whole + 1) * (whole + 1)))
    return whole + fraction


def _box_blur_lines(pixels: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """One BoxBlur.c horizontal pass over the last dimension of int64 pixels [N, C, H, W], per-image box radius
    [N] float32: window sum x ww plus the two pixels beyond it x fw, in 24-bit fixed point, edges repeated."""
    whole = radius.long()
    ww = (float(1 << 24) / (radius * 2 + 1)).long()  # float32 division, truncated to UINT32
    fw = ((1 << 24) - (whole * 2 + 1) * ww) // 2
    reach = int(whole.max()) + 1
    length = pixels.shape[-1]
    index = torch.arange(-reach, length + reach, device=pixels.device).clamp(0, length - 1)
    padded = pixels[..., index]
    total = torch.zeros_like(pixels)
    for offset in range(-reach, reach + 1):
        distance = abs(offset)
        weight = torch.where(distance <= whole, ww, torch.where(distance == whole + 1, fw, torch.zeros_like(ww)))
        total += weight[:, None, None, None] * padded[..., reach + offset: reach + offset + length]
    return (total + (1 << 23)) >> 24


def gaussian_blur(pixels: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """PIL's ImageFilter.GaussianBlur(radius) per image (radius [N]): three box-blur passes along the rows, then
    three along the columns, each rounded to uint8."""
    box = box_blur_radius(radius)
    lines = pixels.to(torch.int64)
    for _ in range(3):
        lines = _box_blur_lines(lines, box)
    lines = lines.transpose(2, 3)
    for _ in range(3):
        lines = _box_blur_lines(lines, box)
    return lines.transpose(2, 3).to(torch.float32)


def solarize(pixels: torch.Tensor, threshold: int) -> torch.Tensor:
    """ImageOps.solarize: values >= threshold are inverted."""
    return torch.where(pixels >= threshold, 255 - pixels, pixels)


def normalise(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """ToTensor's division by 255, then Normalize, in their order and precision: equal to the PIL path's bits."""
    mean_, std_ = (torch.tensor(v, dtype=torch.float32, device=pixels.device)[:, None, None] for v in (mean, std))
    return pixels.div(255).sub(mean_).div(std_)


_JITTER = {BRIGHTNESS: adjust_brightness, CONTRAST: adjust_contrast, SATURATION: adjust_saturation, HUE: adjust_hue}


def _apply_where(pixels: torch.Tensor, chosen: torch.Tensor, operation: Callable[..., torch.Tensor],
                 *arguments: torch.Tensor) -> torch.Tensor:
    """operation on the crops where `chosen` [N] is true, with their rows of `arguments`; the rest unchanged."""
    index = chosen.nonzero().squeeze(1)
    if index.numel() == 0:
        return pixels
    pixels = pixels.clone()
    pixels[index] = operation(pixels[index], *(argument[index] for argument in arguments))
    return pixels


def augment_crops(images: torch.Tensor, image_index: torch.Tensor, parameters: torch.Tensor, size: int,
                  solarize_threshold: int) -> torch.Tensor:
    """Every operation of the multi-crop pipeline, in its order, for N crops of one size: [N, C, size, size]
    0..255 float32 (before normalisation). parameters [N, N_PARAMETERS]."""
    pixels = resized_crops(images, image_index, parameters[:, TOP:WIDTH + 1], size)
    pixels = _apply_where(pixels, parameters[:, FLIP] > 0, lambda x: x.flip(-1))
    order = parameters[:, ORDER].long()
    jittered = parameters[:, JITTER] > 0
    for slot in range(4):  # torchvision applies the four adjustments in a random order of its own per crop
        for operation, column in enumerate((BRIGHTNESS, CONTRAST, SATURATION, HUE)):
            chosen = jittered & (order[:, slot] == operation) & torch.isfinite(parameters[:, column])
            pixels = _apply_where(pixels, chosen, _JITTER[column], parameters[:, column])
    pixels = _apply_where(pixels, parameters[:, GRAYSCALE] > 0, grayscale)
    pixels = _apply_where(pixels, parameters[:, BLUR] > 0, gaussian_blur, parameters[:, RADIUS])
    return _apply_where(pixels, parameters[:, SOLARISE] > 0, lambda x: solarize(x, solarize_threshold))


class DeviceMultiCrop:
    """The device's side of data.augment=device: DecodedBatch -> the normalised crops [B, C, S, S] of every
    position, as MultiCropTransform would have made them; one resample per crop size."""

    def __init__(self, transform: MultiCropTransform) -> None:
        self.sizes = transform.crop_sizes
        self.mean, self.std = transform.mean, transform.std
        self.solarize_threshold = transform.solarize_threshold

    def __call__(self, batch: DecodedBatch, device: torch.device) -> list[torch.Tensor]:
        images, parameters = batch.to(device)
        count = images.shape[0]
        crops: list[Optional[torch.Tensor]] = [None] * len(self.sizes)
        for size in dict.fromkeys(self.sizes):
            positions = [p for p, s in enumerate(self.sizes) if s == size]
            chosen = parameters[:, positions].transpose(0, 1).reshape(-1, N_PARAMETERS)  # position-major
            image_index = torch.arange(count, device=device).repeat(len(positions))
            pixels = augment_crops(images, image_index, chosen, size, self.solarize_threshold)
            normalised = normalise(pixels, self.mean, self.std)
            for slot, position in enumerate(positions):
                crops[position] = normalised[slot * count:(slot + 1) * count]
        return crops


# ---- the choice between the two modes ----------------------------------------------------------------------------

def multicrop_transform(data_config, channels: int) -> MultiCropTransform:
    """The PIL multi-crop transform of a run's `data` section for images of `channels`."""
    mean, std = data_statistics(data_config, channels)
    return MultiCropTransform(data_config.global_crop_size, data_config.local_crop_size, data_config.n_local_crops,
                              tuple(data_config.global_crop_scale), tuple(data_config.local_crop_scale), mean, std,
                              channels, tuple(data_config.blur_sigma))


def _crops_to_device(crops: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    return [crop.to(device, non_blocking=True) for crop in crops]


class TrainAugmentation(NamedTuple):
    """Where the multi-crop augmentation of training runs. `transform` runs per sample in the data workers,
    `collate` makes their batch, and `to_device(batch, device)` gives the trainer its list of crop tensors."""

    transform: Callable[[Any], Any]
    collate: Callable[[Sequence[Any]], tuple[Any, torch.Tensor]]
    to_device: Callable[[Any, torch.device], list[torch.Tensor]]


def train_augmentation(data_config, channels: int) -> TrainAugmentation:
    """data.augment=workers: PIL in the workers; device: workers decode and draw, the device augments."""
    transform = multicrop_transform(data_config, channels)
    if data_config.augment == "workers":
        return TrainAugmentation(transform, collate_crops, _crops_to_device)
    if data_config.augment == "device":
        return TrainAugmentation(DecodeAndDraw(transform), collate_decoded, DeviceMultiCrop(transform))
    raise ConfigError(f"data.augment={data_config.augment!r} is unknown; valid: {', '.join(AUGMENT_MODES)}")
