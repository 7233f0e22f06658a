"""Reading WebDataset tar shards: URL expansion, the manifest of sample counts, samples as raw bytes, decoding.

A shard is a plain tar file in WebDataset layout: the members of one sample are consecutive and share a key
(the member path up to the first dot of its file name); `KEY.jpg` (or png, webp, ...) holds the encoded image
exactly as it was stored, `KEY.cls` the class index as ASCII digits. A shard URL is a local path, a `file:` URL
or anything `webdataset.gopen` opens, notably `pipe:COMMAND` whose standard output is the tar stream (object
stores: `pipe:aws s3 cp s3://bucket/train-000000.tar -`).

The manifest (`manifest.json`, written by `mokd shards`) gives the number of samples of every shard. The
training loader needs it to plan equal batch counts per rank before reading anything, and to tell how many
samples a truncated shard lost.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

from PIL import Image
from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls

from mokd.errors import DataError

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "mokd-shards/1"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "tif", "tiff")
LABEL_EXTENSION = "cls"
_MODES = {1: "L", 3: "RGB"}
# The shard's file name inside a URL, also inside a pipe: command ("pipe:aws s3 cp s3://b/train-000001.tar -").
_TAR_NAME = re.compile(r"([^/\s'\"]+\.tar)(?![^\s'\"])")


class CorruptSample(ValueError):
    """A sample that cannot be used: undecodable image, missing image or label, bad label."""


def expand_shard_urls(pattern: str, key: str = "data.shards") -> list[str]:
    """Brace-expanded shard URLs of `pattern` ('::' separates several patterns), or every shard of a directory
    written by `mokd shards` (as its manifest lists them); `key` names the option."""
    if pattern and is_local(pattern) and local_path(pattern).is_dir():
        directory = local_path(pattern)
        manifest = read_manifest(directory / MANIFEST_NAME)
        return [str(directory / entry["name"]) for entry in manifest["shards"]]
    urls = expand_urls(pattern) if pattern else []
    if not urls:
        raise DataError(f"{key}={pattern!r} names no shard")
    return urls


def check_local_shards(urls: list[str], key: str = "data.shards") -> None:
    """Every local shard exists, checked at start: a missing one would otherwise surface only when a data
    worker reaches it, possibly hours in."""
    missing = [str(local_path(url)) for url in urls if is_local(url) and not local_path(url).is_file()]
    if missing:
        raise DataError(f"{key}: {len(missing)} of {len(urls)} shards missing: {', '.join(missing[:5])}"
                        f"{' ...' if len(missing) > 5 else ''}")


def is_local(url: str) -> bool:
    """A local path or file: URL (seekable), as opposed to pipe: commands and network URLs."""
    return not url.startswith("pipe:") and urlparse(url).scheme in ("", "file")


def local_path(url: str) -> Path:
    return Path(urlparse(url).path if url.startswith("file:") else url)


def shard_name(url: str) -> str:
    """The shard's file name: the basename of a path, or the *.tar name inside a pipe: command or URL."""
    if is_local(url):
        return local_path(url).name
    found = _TAR_NAME.findall(url)
    if not found:
        raise DataError(f"shard URL {url!r} names no *.tar file, so the manifest cannot be matched to it")
    return found[-1]


def manifest_path_for(urls: list[str], manifest: Optional[str]) -> Path:
    """`manifest` when given, else manifest.json beside local shards that all share one directory."""
    if manifest:
        return Path(manifest)
    if not all(is_local(url) for url in urls):
        raise DataError("data.shard_manifest must name the manifest.json of shards read through pipe: or network "
                         "URLs (it sits beside local shards, where it is found without the option)")
    directories = {local_path(url).parent for url in urls}
    if len(directories) != 1:
        raise DataError(f"shards span {len(directories)} directories; set data.shard_manifest to one manifest "
                         "that lists them all")
    return directories.pop() / MANIFEST_NAME


def read_manifest(path: Path) -> dict:
    """The manifest written by `mokd shards`; ValueError naming the file when it is missing or malformed."""
    try:
        manifest = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"shard manifest {path} not found (written by `mokd shards`; set "
                                "data.shard_manifest to its path)") from None
    except json.JSONDecodeError as error:
        raise DataError(f"shard manifest {path} is not valid JSON: {error}") from None
    if manifest.get("format") != MANIFEST_FORMAT or not isinstance(manifest.get("shards"), list):
        raise DataError(f"shard manifest {path} is not a {MANIFEST_FORMAT} manifest (no 'format'/'shards' entry)")
    return manifest


def shard_sample_counts(urls: list[str], manifest: Optional[str]) -> list[int]:
    """Number of samples of every shard of `urls`, looked up by shard name in the manifest."""
    path = manifest_path_for(urls, manifest)
    counts = {entry["name"]: int(entry["samples"]) for entry in read_manifest(path)["shards"]}
    result = []
    for url in urls:
        name = shard_name(url)
        if name not in counts:
            raise DataError(f"shard {name} ({url}) is not listed in the manifest {path}")
        result.append(counts[name])
    return result


@dataclass
class RawSample:
    """One sample as stored: its key, its position in the shard, encoded image bytes and label bytes."""

    key: str
    index: int
    image: Optional[bytes] = None
    image_extension: str = ""
    label: Optional[bytes] = None


def split_member_name(name: str) -> tuple[str, str]:
    """'dir/n0001.jpg' -> ('dir/n0001', 'jpg'); the extension starts at the first dot of the file name."""
    directory, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), (extension.lower() if dot else "")


def iter_shard(url: str, strict: bool = False) -> Iterator[RawSample]:
    """Samples of one shard in stored order, read as a stream (pipe: URLs cannot seek).

    A truncated or otherwise unreadable tar ends the iteration early (strict: raises ValueError naming the
    shard) instead of raising: the caller compares what it got with the manifest and counts the samples lost.
    The last sample before such an end may be incomplete (no image or no label) and is then left to the
    decoder to reject.
    """
    stream = gopen(url, "rb")
    try:
        current: Optional[RawSample] = None
        index = 0
        try:
            with tarfile.open(fileobj=stream, mode="r|") as archive:
                for member in archive:
                    if not member.isfile():
                        continue
                    key, extension = split_member_name(member.name)
                    data = archive.extractfile(member).read()
                    if current is None or key != current.key:
                        if current is not None:
                            yield current
                            index += 1
                        current = RawSample(key, index)
                    if extension in IMAGE_EXTENSIONS and current.image is None:
                        current.image, current.image_extension = data, extension
                    elif extension == LABEL_EXTENSION:
                        current.label = data
        except (tarfile.TarError, EOFError, OSError) as error:
            if strict:
                raise DataError(f"shard {url} is truncated or damaged after {index} samples: {error}") from None
            # Otherwise what was read so far stands, and the caller counts the rest as lost.
        if current is not None:
            yield current
    finally:
        stream.close()


def decode_label(sample: RawSample, shard: str) -> int:
    """The class index of a sample; CorruptSample naming shard and key when missing or not a non-negative int."""
    where = f"shard {shard}, sample {sample.key!r}"
    if sample.label is None:
        raise CorruptSample(f"{where}: no .{LABEL_EXTENSION} member")
    try:
        label = int(sample.label.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise CorruptSample(f"{where}: label {sample.label[:20]!r} is not an integer") from None
    if label < 0:
        raise CorruptSample(f"{where}: negative label {label}")
    return label


def decode_sample(sample: RawSample, channels: int, shard: str) -> tuple[Image.Image, int]:
    """(PIL image in mode L or RGB, class index); CorruptSample naming shard and key when unusable."""
    where = f"shard {shard}, sample {sample.key!r}"
    if sample.image is None:
        raise CorruptSample(f"{where}: no image member ({'/'.join(IMAGE_EXTENSIONS)})")
    label = decode_label(sample, shard)
    try:
        image = Image.open(io.BytesIO(sample.image))
        image = image.convert(_MODES[channels])  # forces the full decode, so truncated files fail here
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise CorruptSample(f"{where}: undecodable .{sample.image_extension} ({error})") from None
    return image, label

