"""Multi-crop training batches streamed from WebDataset tar shards, with an exact per-rank plan.

Equal batches per rank, by an exact plan rather than by resampling. Each epoch the shard order is shuffled
with (seed, epoch); the samples of the shards in that order form one sequence of N samples (N from the
manifest). Every rank gets S = N // (world_size * batch_size) batches: rank r takes the contiguous stretch
[r*S*B, (r+1)*S*B) of the sequence, and splits it between its W data workers by whole batches (worker w of
W gets S//W batches, plus one for the first S%W workers). So every rank yields the same number of batches,
every sample is used at most once per epoch, and only the N - world_size*S*B samples at the end of the
shuffled sequence (a different set each epoch) are left out. Resampling with a fixed epoch length would
give equal counts too, but sees some samples twice and others never within an epoch, and its position in an
epoch cannot be restored. A stretch may start or end inside a shard: the worker reads that shard from its
beginning and skips (without decoding) the samples before its stretch.

Within a worker, a shuffle buffer (data.shuffle_buffer samples, held as encoded bytes, seeded by
(seed, epoch, rank, worker)) mixes samples across its shards; images are decoded as they leave the buffer and
augmented with a seed of (seed, epoch, position of the sample in the epoch's sequence).

Corrupt samples (undecodable image, missing member, bad label) and samples missing from a truncated shard
(fewer than the manifest lists) are skipped and counted; a worker stops with ShardDataError once it has
skipped more than data.max_corrupt_fraction of its stretch. A worker that falls short of its batches because
of skipped samples reads its stretch again from the start (new augmentations) until its batches are full, so
the batch counts stay equal.

Resume is exact: the batches of an epoch are a function of (seed, epoch, world_size, W, batch size, the
shards) alone. Batch b comes from worker b % W; on set_start_batch(k) each worker replays its part of the
batches before k (reading and decoding, but without augmentation, so the shuffle buffer and the skipped
samples are the same) and the workers are rotated so that the loader yields batch k first. A restarted run
therefore sees exactly the batches the interrupted one would have seen, provided the shards, the world size
and data.num_workers are unchanged.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mokd.data.loader import EpochPosition, _hash63, collate_crops, seeded_transform
from mokd.data.shards import (CorruptSample, RawSample, check_local_shards, decode_sample, expand_shard_urls,
                              iter_shard, shard_name, shard_sample_counts)
from mokd.errors import DataError
from mokd.signals import ignore_stop_signals

# Columns of the shared statistics table, one row per worker.
_READ, _CORRUPT, _MISSING = range(3)


class ShardDataError(DataError):
    """Too many corrupt or missing samples, or none usable: training stops rather than learn from garbage."""


@dataclass(frozen=True)
class Stretch:
    """Samples [start, stop) of shard `shard` (index into the URL list); `position` is the epoch-sequence
    position of sample `start`."""

    shard: int
    start: int
    stop: int
    position: int


@dataclass(frozen=True)
class WorkerPlan:
    batches: int
    stretches: tuple[Stretch, ...]

    @property
    def samples(self) -> int:
        return sum(stretch.stop - stretch.start for stretch in self.stretches)


def batches_per_rank(counts: list[int], batch_size: int, world_size: int) -> int:
    return sum(counts) // (batch_size * world_size)


def shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(_hash63(b"mokd-shardord", seed, epoch))
    return torch.randperm(num_shards, generator=generator).tolist()


def epoch_plan(counts: list[int], batch_size: int, seed: int, epoch: int, rank: int, world_size: int,
               workers: int) -> list[WorkerPlan]:
    """The stretches of the epoch's shuffled sample sequence that each of this rank's `workers` reads."""
    per_rank = batches_per_rank(counts, batch_size, world_size)
    order = shard_order(len(counts), seed, epoch)
    plans, begin = [], rank * per_rank * batch_size
    for worker in range(workers):
        batches = per_rank // workers + (worker < per_rank % workers)
        end = begin + batches * batch_size
        stretches, offset = [], 0
        for shard in order:  # intersect [begin, end) with each shard's span [offset, offset + count)
            low, high = max(begin, offset), min(end, offset + counts[shard])
            if low < high:
                stretches.append(Stretch(shard, low - offset, high - offset, low))
            offset += counts[shard]
        plans.append(WorkerPlan(batches, tuple(stretches)))
        begin = end
    return plans


class ShardStream(IterableDataset):
    """The batches of one rank: ([crop tensors [B, C, H, W]], labels [B]) per item, already collated.

    The epoch and start batch live in a shared tensor so that persistent workers see what the main process
    set; the per-worker statistics (samples read, corrupt, missing) live in another, read by `statistics`.
    """

    def __init__(self, urls: list[str], counts: list[int], transform: Callable[[Any], list[torch.Tensor]],
                 channels: int, batch_size: int, seed: int, rank: int, world_size: int, workers: int,
                 shuffle_buffer: int, max_corrupt_fraction: float,
                 collate: Callable[[list], Any] = collate_crops) -> None:
        self.urls, self.counts, self.transform, self.channels = urls, counts, transform, channels
        self.collate = collate
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.workers, self.shuffle_buffer, self.max_corrupt_fraction = workers, shuffle_buffer, max_corrupt_fraction
        self.position = torch.zeros(2, dtype=torch.int64).share_memory_()  # (epoch, start batch)
        self.stats = torch.zeros(workers, 3, dtype=torch.int64).share_memory_()

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        info = get_worker_info()
        physical = 0 if info is None else info.id
        epoch, start = (int(value) for value in self.position)
        # Rotation: the DataLoader asks worker 0 first, and batch `start` belongs to worker start % W.
        worker = (physical + start) % self.workers
        skip = max(0, -(-(start - worker) // self.workers))  # this worker's batches before `start`
        plan = epoch_plan(self.counts, self.batch_size, self.seed, epoch, self.rank, self.world_size,
                          self.workers)[worker]
        return self._batches(plan, epoch, worker, skip)

    def _batches(self, plan: WorkerPlan, epoch: int, worker: int,
                 skip: int) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        if plan.batches == 0:  # fewer batches per rank than workers: this one has none
            return
        batch: list = []
        produced = 0
        for image, label, sample_seed in self._samples(plan, epoch, worker):
            if produced < skip:  # replay: decoded (so skips match) but not augmented
                batch.append(None)
            else:
                batch.append((seeded_transform(self.transform, image, sample_seed), label))
            if len(batch) == self.batch_size:
                if produced >= skip:
                    yield self.collate(batch)
                produced += 1
                batch = []
                if produced == plan.batches:
                    return

    def _samples(self, plan: WorkerPlan, epoch: int, worker: int) -> Iterator[tuple[Any, int, int]]:
        """Decoded (image, label, augmentation seed) in shuffle-buffer order, cycling over the worker's
        stretches until the caller has its batches."""
        rng = random.Random(_hash63(b"mokd-shardbuf", self.seed, epoch, self.rank, worker))
        stats = self.stats[worker]  # a view of shared memory: the main process reads it for the metrics
        buffer: list[tuple[RawSample, int, int, str]] = []
        usable_in_pass = [0]
        # Counted for this epoch's first pass only: the rate refers to the worker's share of this epoch.
        skipped = [0]

        def skip(count: int, reason: str) -> None:
            skipped[0] += count
            allowed = int(self.max_corrupt_fraction * plan.samples)
            if skipped[0] > allowed:
                raise ShardDataError(
                    f"rank {self.rank} worker {worker}: {skipped[0]} of the {plan.samples} samples of its share of "
                    f"epoch {epoch} are corrupt or missing, more than data.max_corrupt_fraction="
                    f"{self.max_corrupt_fraction} allows ({allowed}); last: {reason}")

        def emit() -> Iterator[tuple[Any, int, int]]:
            index = rng.randrange(len(buffer))
            buffer[index], buffer[-1] = buffer[-1], buffer[index]
            raw, position, passes, name = buffer.pop()
            try:
                image, label = decode_sample(raw, self.channels, name)
            except CorruptSample as error:
                if passes == 0:
                    stats[_CORRUPT] += 1
                    skip(1, str(error))
                return
            usable_in_pass[0] += 1
            yield image, label, _hash63(b"mokd-shardaug", self.seed, epoch, position, passes)

        passes = 0
        while True:
            for stretch in plan.stretches:
                url, name = self.urls[stretch.shard], shard_name(self.urls[stretch.shard])
                seen = 0
                for raw in self._stretch_samples(url, name, stretch):
                    seen += 1
                    if passes == 0:
                        stats[_READ] += 1
                    buffer.append((raw, stretch.position + raw.index - stretch.start, passes, name))
                    if len(buffer) >= self.shuffle_buffer:
                        yield from emit()
                missing = (stretch.stop - stretch.start) - seen
                if missing and passes == 0:
                    stats[_MISSING] += missing
                    skip(missing, f"shard {name} ({url}) ended after {stretch.start + seen} of the "
                         f"{self.counts[stretch.shard]} samples its manifest lists (truncated?)")
            while buffer:
                yield from emit()
            if usable_in_pass[0] == 0:
                names = ", ".join(shard_name(self.urls[stretch.shard]) for stretch in plan.stretches)
                raise ShardDataError(f"rank {self.rank} worker {worker}: no decodable sample in its share of "
                                     f"epoch {epoch} (shards {names})")
            passes += 1
            usable_in_pass[0] = 0

    def _stretch_samples(self, url: str, name: str, stretch: Stretch) -> Iterator[RawSample]:
        """The samples [start, stop) of a shard; more samples than the manifest lists is an error."""
        for raw in iter_shard(url):
            if raw.index >= self.counts[stretch.shard]:
                raise ShardDataError(f"shard {name} ({url}) holds more samples than the {self.counts[stretch.shard]} "
                                     "its manifest lists: the manifest is stale, rewrite it with `mokd shards`")
            if raw.index >= stretch.stop:
                return
            if raw.index >= stretch.start:
                yield raw


class ShardLoader(EpochPosition):
    """The training loader over shards, with the position interface of ResumableBatchSampler.

    Iterating yields len(self) batches of ([crop tensors], labels) for this rank; set_epoch selects the
    epoch's shard order, set_start_batch skips the first batches of the next iteration (exact resume, used
    once). `statistics` are counts since the loader was built (a resumed run counts again what it replays).
    """

    def __init__(self, stream: ShardStream, num_workers: int, seed: int) -> None:
        self.stream = stream
        self.epoch, self.start_batch = 0, 0
        self._length = batches_per_rank(stream.counts, stream.batch_size, stream.world_size)
        self.loader = DataLoader(
            stream, batch_size=None, num_workers=num_workers, pin_memory=torch.cuda.is_available(),
            persistent_workers=num_workers > 0, worker_init_fn=ignore_stop_signals,
            # Its own generator, as in build_train_loader: starting an iterator must not consume the global RNG.
            generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        self.stream.position[0], self.stream.position[1] = self.epoch, self.start_batch
        self.start_batch = 0
        return iter(self.loader)

    def statistics(self) -> dict[str, float]:
        """Samples read, and skipped as corrupt or missing from truncated shards, by all of this rank's workers."""
        read, corrupt, missing = (int(value) for value in self.stream.stats.sum(dim=0))
        skipped = corrupt + missing
        return {"data/samples_read": float(read), "data/samples_corrupt": float(corrupt),
                "data/samples_missing": float(missing),
                "data/skipped_fraction": skipped / max(1, read + missing)}


def build_shard_loader(urls: list[str], counts: list[int], transform: Callable[[Any], list[torch.Tensor]],
                       channels: int, batch_size: int, seed: int, num_workers: int, rank: int, world_size: int,
                       shuffle_buffer: int, max_corrupt_fraction: float,
                       collate: Callable[[list], Any] = collate_crops) -> ShardLoader:
    """The training loader of this rank over shards `urls` with per-shard sample `counts` (from the manifest).

    Raises ValueError when there are fewer shards than ranks x workers, or too few samples for one batch per
    rank.
    """
    workers = max(1, num_workers)
    if len(urls) < world_size * workers:
        raise DataError(f"data.shards has {len(urls)} shards, fewer than {world_size} ranks x {workers} workers "
                         f"= {world_size * workers}: every data worker needs at least one shard; write more, "
                         "smaller shards (mokd shards --shards N) or lower data.num_workers")
    if batches_per_rank(counts, batch_size, world_size) == 0:
        raise DataError(f"data.shards holds {sum(counts)} samples, fewer than one batch of {batch_size} on each "
                         f"of {world_size} ranks")
    stream = ShardStream(urls, counts, transform, channels, batch_size, seed, rank, world_size, workers,
                         shuffle_buffer, max_corrupt_fraction, collate)
    return ShardLoader(stream, num_workers, seed)


def shard_train_loader(data_config, transform: Callable[[Any], Any], batch_size: int, seed: int,
                       rank: int, world_size: int, collate: Callable[[list], Any] = collate_crops) -> ShardLoader:
    """`build_shard_loader` with the options of a run's `data` section (data.shards, data.shard_manifest, ...)."""
    urls = expand_shard_urls(data_config.shards, "data.shards")
    check_local_shards(urls, "data.shards")
    counts = shard_sample_counts(urls, data_config.shard_manifest)
    return build_shard_loader(urls, counts, transform, data_config.shard_channels, batch_size, seed,
                              data_config.num_workers, rank, world_size, data_config.shuffle_buffer,
                              data_config.max_corrupt_fraction, collate)


def loader_statistics(loader: Any) -> dict[str, float]:
    """The data metrics of a training loader: a ShardLoader's sample counts; none for map-style loaders."""
    return loader.statistics() if isinstance(loader, ShardLoader) else {}
