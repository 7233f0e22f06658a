"""Images/s of DINO's multi-crop (2 x 224 + 10 x 96 px) from ImageNet-sized JPEGs: PIL per worker against
data.augment=device.

Three stages are timed in this process, one thread (a data worker is one process on one core):
  pil     decode + MultiCropTransform, the work of one worker with data.augment=workers;
  decode  decode + the parameter draws (DecodeAndDraw), the work of one worker with data.augment=device;
  device  DeviceMultiCrop on collated batches, on --device (the training device's share; on CPU one thread).
On a CPU the device path costs one core 1 / (1/decode + 1/device) images/s; on a GPU the workers only decode.
Runs alternate between the stages; medians are reported. JPEGs are generated (benchmarks/dataloader.py's).

    python benchmarks/augmentation.py --json benchmarks/results/augmentation_cpu.json
    python benchmarks/augmentation.py --device cuda --stages device --batch-size 64 --json OUT.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dataloader import make_images  # noqa: E402  (the same generated JPEGs as the loader benchmark)

from mokd.data import (DecodeAndDraw, DeviceMultiCrop, MultiCropTransform, collate_decoded,  # noqa: E402
                       dataset_statistics)
from mokd.data.loader import seeded_transform  # noqa: E402


def decode(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def time_pil(paths: list[Path], transform: MultiCropTransform) -> float:
    start = time.perf_counter()
    for seed, path in enumerate(paths):
        seeded_transform(transform, decode(path), seed)
    return len(paths) / (time.perf_counter() - start)


def time_decode(paths: list[Path], draw: DecodeAndDraw) -> tuple[float, list]:
    start = time.perf_counter()
    samples = [(seeded_transform(draw, decode(path), seed), 0) for seed, path in enumerate(paths)]
    return len(paths) / (time.perf_counter() - start), samples


def time_device(batches: list, augment: DeviceMultiCrop, device: torch.device) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    augment(batches[0], device)  # warm-up: allocations, kernels
    sync()
    start, images = time.perf_counter(), 0
    for batch in batches:
        crops = augment(batch, device)
        images += crops[0].shape[0]
    sync()
    return images / (time.perf_counter() - start)


def agreement_with_cpu(batch, augment: DeviceMultiCrop, device: torch.device) -> float:
    """The largest difference, in 0-255 levels, between the device's crops and the CPU's for 4 images."""
    few = type(batch)(batch.images[:4], batch.parameters[:4])
    std = torch.tensor(augment.std)[:, None, None]
    return max(float(((cpu - on_device.cpu()) * std * 255).abs().max())
               for cpu, on_device in zip(augment(few, torch.device("cpu")), augment(few, device)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48, help="JPEGs generated (and augmented per run)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per batch of the device stage")
    parser.add_argument("--runs", type=int, default=5, help="runs per stage (medians reported)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--stages", default="pil,decode,device")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    stages = args.stages.split(",")
    mean, std = dataset_statistics("imagefolder")
    transform = MultiCropTransform(224, 96, 10, (0.25, 1.0), (0.05, 0.25), mean, std, 3)
    draw, augment = DecodeAndDraw(transform), DeviceMultiCrop(transform)
    rates: dict[str, list[float]] = {stage: [] for stage in stages}
    with tempfile.TemporaryDirectory() as directory:
        make_images(Path(directory), args.images, classes=4, seed=0)
        paths = sorted(Path(directory).rglob("*.jpg"))
        _, samples = time_decode(paths, draw)
        batches = [collate_decoded(samples[begin:begin + args.batch_size])[0]
                   for begin in range(0, len(samples) - args.batch_size + 1, args.batch_size)]
        for run in range(args.runs):
            for stage in stages:
                if stage == "pil":
                    rates[stage].append(time_pil(paths, transform))
                elif stage == "decode":
                    rates[stage].append(time_decode(paths, draw)[0])
                else:
                    rates[stage].append(time_device(batches, augment, device))
                print(f"run {run} {stage}: {rates[stage][-1]:.1f} images/s", flush=True)
        agreement = agreement_with_cpu(batches[0], augment, device) if device.type != "cpu" else None
    medians = {stage: statistics.median(values) for stage, values in rates.items()}
    record = {
        "what": "images/s of 2 x 224 + 10 x 96 multi-crop from ImageNet-sized JPEGs (400-600 x 300-500 px)",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "load_average": os.getloadavg(), "torch": torch.__version__,
                    "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"},
        "settings": {key: str(value) for key, value in vars(args).items()},
        "median_images_per_second": medians,
        "runs_images_per_second": rates,
    }
    if agreement is not None:
        record["max_level_difference_to_cpu_first_4_images"] = agreement
    if {"decode", "device"} <= medians.keys() and device.type == "cpu":
        record["device_path_one_core_images_per_second"] = 1 / (1 / medians["decode"] + 1 / medians["device"])
    print(json.dumps(record["median_images_per_second"], indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
