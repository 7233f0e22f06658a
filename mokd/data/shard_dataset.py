"""Shards as an ordered, finite, map-style dataset: the evaluation splits (k-NN bank, linear probe, test).

Evaluation needs what a map-style dataset offers (a length, the labels up front, a fixed random subset, a
class-balanced label subset), so the shards are indexed once, in URL order and stored order, without
shuffling. Local shards are indexed by the byte offset of each image inside its tar file (only headers and
labels are read; images are read on access); shards behind pipe: or network URLs cannot seek, so their
encoded images are read into memory in one pass.

Evaluation does not skip bad data: an accuracy over a silently smaller test set would not be comparable, so a
damaged shard or an undecodable image raises an error naming the shard and the sample.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from typing import Optional, Union

from PIL import Image
from torch.utils.data import Dataset

from mokd.data.shards import (IMAGE_EXTENSIONS, LABEL_EXTENSION, MANIFEST_NAME, CorruptSample, RawSample,
                              decode_label, decode_sample, expand_shard_urls, is_local, iter_shard, local_path,
                              read_manifest, shard_name, split_member_name)
from mokd.errors import DataError


@dataclass(frozen=True)
class _Entry:
    shard: int
    key: str
    label: int
    image: Union[bytes, tuple[int, int]]  # the encoded bytes, or (offset, size) inside a local tar file
    extension: str


class ShardDataset(Dataset):
    """(PIL image, label) for every sample of the shards of `pattern`, in order; `.channels`, `.targets`,
    `.classes` (from a manifest beside local shards, when there is one). `key` names the option in errors."""

    def __init__(self, pattern: str, channels: int, key: str) -> None:
        self.urls = expand_shard_urls(pattern, key)
        self.key = key
        self.channels = channels
        self._entries: Optional[list[_Entry]] = None  # indexed on first use: building a model needs only channels
        self.classes: Optional[list[str]] = None
        manifest = local_path(self.urls[0]).parent / MANIFEST_NAME if is_local(self.urls[0]) else None
        if manifest is not None and manifest.exists():
            self.classes = read_manifest(manifest).get("classes")

    @property
    def entries(self) -> list[_Entry]:
        if self._entries is None:
            self._entries = [entry for shard in range(len(self.urls)) for entry in self._index(shard)]
            if not self._entries:
                raise DataError(f"{self.key}: the shards hold no sample ({self.urls[0]} ...)")
        return self._entries

    @property
    def targets(self) -> list[int]:
        return [entry.label for entry in self.entries]

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        entry = self.entries[index]
        data = entry.image
        if not isinstance(data, bytes):
            offset, size = data
            with open(local_path(self.urls[entry.shard]), "rb") as file:
                file.seek(offset)
                data = file.read(size)
        raw = RawSample(entry.key, index, data, entry.extension, str(entry.label).encode())
        return decode_sample(raw, self.channels, shard_name(self.urls[entry.shard]))

    def _index(self, shard: int) -> list[_Entry]:
        url = self.urls[shard]
        if is_local(url):
            samples = self._local_samples(local_path(url))
        else:
            samples = [(raw, raw.image) for raw in iter_shard(url, strict=True)]
        entries = []
        for raw, location in samples:
            if raw.image is None:
                raise CorruptSample(f"shard {shard_name(url)}, sample {raw.key!r}: no image member")
            entries.append(_Entry(shard, raw.key, decode_label(raw, shard_name(url)), location, raw.image_extension))
        return entries

    @staticmethod
    def _local_samples(path) -> list[tuple[RawSample, tuple[int, int]]]:
        """Headers and labels only: each image is remembered by its offset and size in the tar file."""
        samples: list[tuple[RawSample, tuple[int, int]]] = []
        try:
            with tarfile.open(path, "r:") as archive:
                for member in archive:
                    if not member.isfile():
                        continue
                    key, extension = split_member_name(member.name)
                    if not samples or samples[-1][0].key != key:
                        samples.append((RawSample(key, len(samples)), (0, 0)))
                    raw = samples[-1][0]
                    if extension in IMAGE_EXTENSIONS and raw.image is None:
                        raw.image, raw.image_extension = b"", extension
                        samples[-1] = (raw, (member.offset_data, member.size))
                    elif extension == LABEL_EXTENSION:
                        raw.label = archive.extractfile(member).read()
        except (tarfile.TarError, EOFError, OSError) as error:
            raise DataError(f"shard {path} is damaged: {error}") from None
        end = max((offset + size for _, (offset, size) in samples), default=0)
        if path.stat().st_size < end:
            raise DataError(f"shard {path} is truncated: {path.stat().st_size} bytes, its images reach byte {end}")
        return samples
