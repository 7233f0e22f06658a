"""Images/s per data worker of the DINO multi-crop pipeline (2 x 224 + 10 x 96 px): tar shards vs ImageFolder.

Both pipelines read the same JPEG files (ImageNet-like sizes, generated here) with one worker process and
the same MultiCropTransform; the shards are written from the ImageFolder tree by `mokd shards`' writer, so
they hold the identical JPEG bytes. Each run builds a fresh loader, and the clock starts when its first batch
arrives (worker start-up excluded); runs alternate between the two pipelines, and which goes first flips every
run, so that load on a shared machine hits both alike. Results (every run, medians, machine load) go to a JSON file.

    python benchmarks/dataloader.py --json benchmarks/results/dataloader_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mokd.data import ImageFolderDataset, MultiCropTransform, build_shard_loader, build_train_loader, dataset_statistics
from mokd.data.shard_writer import write_shards_from
from mokd.data.shards import expand_shard_urls, shard_sample_counts


def make_images(root: Path, count: int, classes: int, seed: int) -> None:
    """`count` JPEGs (quality 90) of ImageNet-like sizes: smooth colour fields with texture and noise."""
    rng = np.random.default_rng(seed)
    for index in range(count):
        width, height = int(rng.integers(400, 600)), int(rng.integers(300, 500))
        coarse = rng.uniform(0, 255, size=(6, 8, 3)).astype(np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float32)
        pixels = np.clip(field + rng.normal(0, 12, size=field.shape), 0, 255).astype(np.uint8)
        directory = root / f"class_{index % classes:02d}"
        directory.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(directory / f"{index:05d}.jpg", quality=90)


def time_loader(loader) -> float:
    """Images/s after the first batch (which includes starting the worker)."""
    iterator = iter(loader)
    next(iterator)
    start, images = time.perf_counter(), 0
    for crops, _ in iterator:
        images += crops[0].shape[0]
    return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256, help="JPEG images generated")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--runs", type=int, default=8, help="runs per pipeline (medians reported)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (figures are per worker)")
    parser.add_argument("--samples-per-shard", type=int, default=64)
    parser.add_argument("--json", type=Path, default=None, help="write results here")
    args = parser.parse_args()

    mean, std = dataset_statistics("imagefolder")
    transform = MultiCropTransform(224, 96, 10, (0.25, 1.0), (0.05, 0.25), mean, std, 3)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as work:
        tree, out = Path(work) / "train", Path(work) / "shards"
        make_images(tree, args.images, classes=8, seed=0)
        manifest = write_shards_from("imagefolder", out, "train", tree, samples_per_shard=args.samples_per_shard)
        urls = expand_shard_urls(manifest["pattern"])
        counts = shard_sample_counts(urls, None)
        folder = ImageFolderDataset(str(tree))
        jpeg_bytes = sum(path.stat().st_size for path in tree.rglob("*.jpg"))

        def shards() -> float:
            loader = build_shard_loader(urls, counts, transform, 3, args.batch_size, 0, args.workers, 0, 1,
                                        shuffle_buffer=256, max_corrupt_fraction=0.0)
            return time_loader(loader)

        def imagefolder() -> float:
            loader, _ = build_train_loader(folder, transform, args.batch_size, 0, args.workers)
            return time_loader(loader)

        runs: dict[str, list[float]] = {"shards": [], "imagefolder": []}
        pipelines = [("shards", shards), ("imagefolder", imagefolder)]
        for run in range(args.runs):
            # The order flips every run, so that neither pipeline always follows the other (load varies by the second).
            for name, pipeline in (pipelines if run % 2 == 0 else pipelines[::-1]):
                rate = pipeline() / args.workers
                runs[name].append(rate)
                print(f"run {run + 1}/{args.runs} {name:<11} {rate:7.1f} images/s per worker", flush=True)

    medians = {name: statistics.median(rates) for name, rates in runs.items()}
    results = {
        "benchmark": "multi-crop data loading, 2 x 224 + 10 x 96 px, images/s per worker",
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "load_average_1_5_15_before": load_before, "load_average_1_5_15_after": os.getloadavg(),
                    "note": "shared machine (other jobs running); runs alternate between the pipelines, order flipped every run"},
        "torch": torch.__version__,
        "images": args.images, "jpeg_megabytes": round(jpeg_bytes / 2**20, 1), "shards": len(urls),
        "batch_size": args.batch_size, "workers": args.workers, "runs": runs,
        "median_images_per_second_per_worker": medians,
        "shards_over_imagefolder": medians["shards"] / medians["imagefolder"],
    }
    print(f"median images/s per worker: shards {medians['shards']:.1f}, ImageFolder {medians['imagefolder']:.1f} "
          f"(ratio {results['shards_over_imagefolder']:.3f})")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
