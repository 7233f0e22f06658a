"""Writing WebDataset tar shards and their manifest (`mokd shards`).

Sources: an ImageFolder tree (ROOT/<class>/<image>, classes numbered in sorted order as torchvision does), a
Fashion-MNIST split (the 28x28 images encoded once as lossless PNG, since IDX is not an image format), or a
file list (one `PATH LABEL` per line). Image files are copied byte for byte (a JPEG stays the same JPEG); every
sample is `KEY.<ext>` + `KEY.cls`. Samples are shuffled with a seed before they are cut into shards: an
ImageFolder is sorted by class, and shards of one class each would defeat the readers' shuffle buffer.
The manifest (manifest.json in the output directory) lists every shard with its number of samples.
"""

from __future__ import annotations

import io
import json
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from PIL import Image
from webdataset import TarWriter

from mokd.data.fashion_mnist import CLASSES as FASHION_MNIST_CLASSES
from mokd.data.fashion_mnist import FashionMNIST
from mokd.data.shards import IMAGE_EXTENSIONS, LABEL_EXTENSION, MANIFEST_FORMAT, MANIFEST_NAME
from mokd.errors import DataError

WRITER_SOURCES = ("imagefolder", "fashion_mnist", "filelist")


@dataclass(frozen=True)
class SourceSample:
    """A sample to write: its encoded image (read when written) and class index."""

    read: Callable[[], bytes]
    extension: str
    label: int


def _extension(path: Path) -> str:
    extension = path.suffix.lower().lstrip(".")
    if extension not in IMAGE_EXTENSIONS:
        raise DataError(f"{path}: extension .{extension} is not an image extension ({', '.join(IMAGE_EXTENSIONS)})")
    return extension


def _file_sample(path: Path, label: int) -> SourceSample:
    return SourceSample(path.read_bytes, _extension(path), label)


def imagefolder_samples(root: Path) -> tuple[list[SourceSample], list[str]]:
    """Samples of ROOT/<class>/<image> and the sorted class names (class index = position in that list)."""
    if not root.is_dir():
        raise FileNotFoundError(f"ImageFolder root {root} is not a directory")
    classes = sorted(entry.name for entry in root.iterdir() if entry.is_dir())
    samples = [_file_sample(path, label)
               for label, name in enumerate(classes)
               for path in sorted((root / name).rglob("*"))
               if path.is_file() and path.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS]
    if not samples:
        raise DataError(f"ImageFolder root {root} holds no images in class subdirectories ({root}/<class>/<image>)")
    return samples, classes


def filelist_samples(listing: Path) -> list[SourceSample]:
    """Samples of a text file of `PATH LABEL` lines (relative paths are relative to the list's directory)."""
    samples = []
    for number, line in enumerate(listing.read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        path_text, _, label_text = line.strip().rpartition(" ")
        if not path_text or not label_text.isdigit():
            raise DataError(f"{listing}:{number}: expected 'PATH LABEL' with a non-negative integer label, got {line!r}")
        path = Path(path_text.strip())
        path = path if path.is_absolute() else listing.parent / path
        if not path.is_file():
            raise FileNotFoundError(f"{listing}:{number}: image {path} not found")
        samples.append(_file_sample(path, int(label_text)))
    if not samples:
        raise DataError(f"file list {listing} lists no image")
    return samples


def fashion_mnist_samples(split: str, root: Optional[Path]) -> list[SourceSample]:
    dataset = FashionMNIST(split, root)

    def png(index: int) -> Callable[[], bytes]:
        def encode() -> bytes:
            buffer = io.BytesIO()
            Image.fromarray(dataset.data[index]).save(buffer, format="PNG")
            return buffer.getvalue()
        return encode

    return [SourceSample(png(index), "png", label) for index, label in enumerate(dataset.targets)]


def _chunks(samples: list[SourceSample], per_shard: int) -> Iterator[list[SourceSample]]:
    for begin in range(0, len(samples), per_shard):
        yield samples[begin:begin + per_shard]


def write_shards(samples: list[SourceSample], out: Path, prefix: str, samples_per_shard: int = 0, shards: int = 0,
                 seed: int = 0, limit: int = 0, classes: Optional[list[str]] = None, source: str = "") -> dict:
    """Write `samples` (shuffled with `seed`, the first `limit` if > 0) as OUT/PREFIX-NNNNNN.tar and OUT/manifest.json.

    Give either `samples_per_shard` or the number of `shards` (samples spread evenly). Returns the manifest.
    """
    if (samples_per_shard > 0) == (shards > 0):
        raise DataError("give exactly one of --samples-per-shard and --shards (a positive number)")
    order = list(samples)
    random.Random(seed).shuffle(order)
    if limit > 0:
        order = order[:limit]
    per_shard = samples_per_shard or math.ceil(len(order) / shards)
    out.mkdir(parents=True, exist_ok=True)
    if (out / MANIFEST_NAME).exists() or any(out.glob(f"{prefix}-*.tar")):
        raise FileExistsError(f"{out} already holds shards or a manifest: choose an empty directory")
    entries = []
    for number, chunk in enumerate(_chunks(order, per_shard)):
        name = f"{prefix}-{number:06d}.tar"
        with TarWriter(str(out / name), encoder=False, mtime=0.0) as writer:  # mtime 0: reproducible bytes
            for offset, sample in enumerate(chunk):
                key = f"{prefix}-{number * per_shard + offset:09d}"
                writer.write({"__key__": key, sample.extension: sample.read(),
                              LABEL_EXTENSION: str(sample.label).encode()})
        entries.append({"name": name, "samples": len(chunk)})
    last = len(entries) - 1
    manifest = {"format": MANIFEST_FORMAT, "source": source, "samples": len(order), "seed": seed,
                "pattern": str(out / f"{prefix}-{{{0:06d}..{last:06d}}}.tar"), "classes": classes,
                "shards": entries}
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def write_shards_from(source: str, out: Path, prefix: str, input_path: Optional[Path] = None, split: str = "train",
                      **options) -> dict:
    """`write_shards` over WRITER_SOURCES: `input_path` is the ImageFolder root, the file list, or the
    Fashion-MNIST directory (optional: found like data.root); `split` selects the Fashion-MNIST split."""
    classes: Optional[list[str]] = None
    if source == "imagefolder":
        if input_path is None:
            raise DataError("--source imagefolder needs --input ROOT (ROOT/<class>/<image>)")
        samples, classes = imagefolder_samples(input_path)
    elif source == "filelist":
        if input_path is None:
            raise DataError("--source filelist needs --input FILE (lines of 'PATH LABEL')")
        samples = filelist_samples(input_path)
    elif source == "fashion_mnist":
        samples, classes = fashion_mnist_samples(split, input_path), list(FASHION_MNIST_CLASSES)
    else:
        raise DataError(f"shard source {source!r} is unknown; valid sources: {list(WRITER_SOURCES)}")
    return write_shards(samples, out, prefix, classes=classes, source=source, **options)
