"""Fashion-MNIST read straight from its IDX files (as shipped by the Debian package `dataset-fashion-mnist`).

No download, no torchvision dataset class: the four IDX files (gzipped or plain) are located, validated and
decoded once into numpy uint8 arrays; items are 28x28 PIL images of mode "L" with an int label.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import zlib
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from mokd.errors import DataError

ENV_VAR = "MOKD_FASHION_MNIST_DIR"
DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_PACKAGE = "dataset-fashion-mnist"

CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# File stem per split; "val" is an alias of "test" because Fashion-MNIST has no separate validation set.
_SPLIT_PREFIX = {"train": "train", "test": "t10k", "val": "t10k"}
_IDX_UBYTE = 0x08  # IDX type code for unsigned bytes, the only one Fashion-MNIST uses
_GZIP_MAGIC = b"\x1f\x8b"


def _split_files(split: str) -> tuple[str, str]:
    """Base names (without .gz) of the image and label files of `split`."""
    try:
        prefix = _SPLIT_PREFIX[split]
    except KeyError:
        raise DataError(f"Fashion-MNIST split {split!r} is unknown; valid splits: {sorted(_SPLIT_PREFIX)}") from None
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def _find_file(directory: Path, name: str) -> Path | None:
    """`directory/name` or `directory/name.gz`, whichever exists (plain first: it needs no decompression)."""
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _dpkg_directory() -> Path | None:
    """Directory holding the IDX files according to `dpkg -L`, or None where dpkg or the package is absent."""
    if shutil.which("dpkg") is None:
        return None
    try:
        listing = subprocess.run(
            ["dpkg", "-L", DEBIAN_PACKAGE], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in listing.splitlines():
        if line.strip().endswith("train-images-idx3-ubyte.gz"):
            return Path(line.strip()).parent
    return None


def _candidate_directories(root: str | os.PathLike | None) -> list[tuple[str, Path]]:
    """Directories to search, each with where it came from.

    An explicit root or environment variable is authoritative (only it is searched) so that a wrong setting
    fails loudly instead of silently falling back to another copy of the data.
    """
    if root is not None:
        return [("root argument / data.root", Path(root))]
    env = os.environ.get(ENV_VAR)
    if env:
        return [(f"${ENV_VAR}", Path(env))]
    candidates = [("default", DEFAULT_DIR)]
    dpkg_dir = _dpkg_directory()
    if dpkg_dir is not None and dpkg_dir != DEFAULT_DIR:
        candidates.append((f"dpkg -L {DEBIAN_PACKAGE}", dpkg_dir))
    return candidates


def locate_files(split: str, root: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """Paths of the (images, labels) IDX files of `split`.

    Raises FileNotFoundError naming every directory searched and how to install the data.
    """
    image_name, label_name = _split_files(split)
    candidates = _candidate_directories(root)
    for _, directory in candidates:
        images, labels = _find_file(directory, image_name), _find_file(directory, label_name)
        if images is not None and labels is not None:
            return images, labels
    searched = "; ".join(f"{directory} ({origin})" for origin, directory in candidates)
    raise FileNotFoundError(
        f"Fashion-MNIST {split!r} files {image_name}[.gz] and {label_name}[.gz] not found. Searched: {searched}. "
        f"Install them with `apt-get install {DEBIAN_PACKAGE}`, or set {ENV_VAR} / data.root to the directory "
        f"that holds them."
    )


def read_idx(path: Path, expected_ndim: int) -> np.ndarray:
    """Decode one IDX file (gzipped or plain) of unsigned bytes into an array of its declared shape.

    Raises ValueError naming the file when it is not valid gzip, has a bad magic number, or is truncated.
    """
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC:  # detect by content, not by name: a misnamed file still reads
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{path}: corrupt gzip stream ({exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    dtype_code, ndim = raw[2], raw[3]
    if dtype_code != _IDX_UBYTE:
        raise DataError(f"{path}: IDX data type 0x{dtype_code:02x}, expected unsigned bytes (0x08)")
    if ndim != expected_ndim:
        raise DataError(f"{path}: IDX has {ndim} dimensions, expected {expected_ndim}")
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header_size})")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header_size + int(np.prod(shape))
    if len(raw) != expected:
        kind = "truncated" if len(raw) < expected else "has trailing bytes"
        raise DataError(f"{path}: {kind}: header declares shape {shape} ({expected} bytes), file has {len(raw)}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(shape)


class FashionMNIST(Dataset):
    """Fashion-MNIST split ("train": 60000, "test"/"val": 10000) of (PIL "L" 28x28 image, int label).

    The whole split is decoded once at construction; `data` is [N, 28, 28] uint8, `targets` a list of ints.
    """

    classes: tuple[str, ...] = CLASSES
    channels: int = 1

    def __init__(self, split: str, root: str | os.PathLike | None = None) -> None:
        images_path, labels_path = locate_files(split, root)
        self.split = split
        self.data = read_idx(images_path, expected_ndim=3)
        labels = read_idx(labels_path, expected_ndim=1)
        if len(labels) != len(self.data):
            raise DataError(
                f"{labels_path} has {len(labels)} labels but {images_path} has {len(self.data)} images"
            )
        if len(labels) and int(labels.max()) >= len(CLASSES):
            raise DataError(f"{labels_path}: label {int(labels.max())} outside 0..{len(CLASSES) - 1}")
        self.targets: list[int] = labels.tolist()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.data[index]), self.targets[index]
