"""Deterministic, resumable multi-crop data loading.

The batch sampler, not the workers, decides everything random about a sample: its position in the epoch
(a permutation that depends on (seed, epoch) only) and the seed of its augmentations (a hash of
(seed, epoch, index)). A batch is therefore the same whatever the number of workers, whichever process
computes it, and after a resume from the middle of an epoch.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mokd.errors import DataError
from mokd.signals import ignore_stop_signals

_SEED_MASK = (1 << 63) - 1


def _hash63(domain: bytes, *values: int) -> int:
    """A 63-bit integer hash of `values`, stable across processes, platforms and Python versions.

    Python's hash() is salted per process and so unusable here; `domain` keeps different uses independent.
    """
    digest = hashlib.blake2b(":".join(map(str, values)).encode(), digest_size=8, person=domain).digest()
    return int.from_bytes(digest, "little") & _SEED_MASK


class EpochPosition:
    """Where the next iteration of a training loader starts: its epoch, and how many of that epoch's batches to
    skip (an exact mid-epoch resume). Shared by ResumableBatchSampler and the shard loader; the trainer sets it."""

    epoch: int = 0
    start_batch: int = 0

    def __len__(self) -> int:
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration yields."""
        self.epoch = epoch

    def set_start_batch(self, start_batch: int) -> None:
        """Skip the first `start_batch` batches of the next iteration (exact mid-epoch resume); used once."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch must be in [0, {len(self)}], got {start_batch}")
        self.start_batch = start_batch


class ResumableBatchSampler(EpochPosition, Sampler[list[tuple[int, int]]]):
    """Batches of (dataset_index, sample_seed) for one rank, reproducible from (seed, epoch) alone.

    Every rank sees the same permutation of the dataset and takes the disjoint strided slice
    permutation[rank::world_size]. With drop_last the permutation is cut to a multiple of
    world_size * batch_size; without it, it is padded by wrapping around (as DistributedSampler does) so that
    every rank has the same number of batches, the last one possibly short.
    """

    def __init__(
        self,
        dataset_size: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
        shuffle: bool = True,
    ) -> None:
        if dataset_size <= 0 or batch_size <= 0:
            raise ValueError(f"dataset_size and batch_size must be positive, got {dataset_size}, {batch_size}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if drop_last and dataset_size < batch_size * world_size:
            raise DataError(
                f"dataset of {dataset_size} samples cannot fill one batch of train.batch_size={batch_size} on each "
                f"of {world_size} rank(s) with drop_last; lower the batch size or use more data"
            )
        self.dataset_size, self.batch_size, self.seed = dataset_size, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.drop_last, self.shuffle = drop_last, shuffle
        self.epoch = 0
        self.start_batch = 0
        if drop_last:
            self._samples_per_rank = dataset_size // (batch_size * world_size) * batch_size
        else:
            self._samples_per_rank = -(-dataset_size // world_size)

    def __len__(self) -> int:
        return -(-self._samples_per_rank // self.batch_size)

    def _permutation(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.dataset_size)
        generator = torch.Generator().manual_seed(_hash63(b"mokd-perm", self.seed, self.epoch))
        return torch.randperm(self.dataset_size, generator=generator)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = self._permutation()
        total = self._samples_per_rank * self.world_size
        if total > len(order):  # pad by wrapping, possibly several times for tiny datasets
            order = order.repeat(-(-total // len(order)))
        indices = order[:total][self.rank :: self.world_size].tolist()
        # The skip is consumed here so that the following epoch starts from its first batch again.
        start, self.start_batch = self.start_batch, 0
        seed, epoch = self.seed, self.epoch
        for begin in range(start * self.batch_size, len(indices), self.batch_size):
            batch = indices[begin : begin + self.batch_size]
            yield [(index, _hash63(b"mokd-sample", seed, epoch, index)) for index in batch]


def seeded_transform(transform: Callable[[Any], Any], image: Any, sample_seed: int) -> Any:
    """transform(image) under torch's CPU generator and Python's `random` seeded with sample_seed.

    Both states are restored afterwards: in the trainer's own process (num_workers=0) the model's random stream
    (dropout, drop-path, ...) must not depend on data augmentation.
    """
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    try:
        # Only the CPU generator: torch.manual_seed would also reseed (and so disturb) CUDA generators.
        torch.default_generator.manual_seed(sample_seed)
        random.seed(sample_seed)
        return transform(image)
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(python_state)


class MultiCropDataset(Dataset):
    """Wraps a (PIL image, label) dataset; item (index, sample_seed) -> (list of crops, label).

    The transform runs through `seeded_transform`, so the crops depend on sample_seed alone.
    """

    def __init__(self, base: Dataset, transform: Callable[[Any], list[torch.Tensor]]) -> None:
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, item: tuple[int, int]) -> tuple[list[torch.Tensor], int]:
        if not isinstance(item, tuple) or len(item) != 2:
            raise TypeError(
                f"MultiCropDataset takes (index, sample_seed) pairs from ResumableBatchSampler, got {item!r}"
            )
        index, sample_seed = item
        image, label = self.base[index]
        return seeded_transform(self.transform, image, sample_seed), label


class _TransformedDataset(Dataset):
    """Wraps a (PIL image, label) dataset; item index -> (transform(image), label)."""

    def __init__(self, base: Dataset, transform: Callable[[Any], torch.Tensor]) -> None:
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.base[index]
        return self.transform(image), label


def collate_crops(batch: Sequence[tuple[Sequence[torch.Tensor], int]]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """[(crops, label)] * B -> (one [B, C, H, W] tensor per crop position, [B] int64 labels)."""
    n_crops = len(batch[0][0])
    crops = [torch.stack([sample[0][position] for sample in batch]) for position in range(n_crops)]
    labels = torch.tensor([sample[1] for sample in batch], dtype=torch.long)
    return crops, labels


def build_train_loader(
    dataset: Dataset,
    transform: Callable[[Any], list[torch.Tensor]],
    batch_size: int,
    seed: int,
    num_workers: int,
    rank: int = 0,
    world_size: int = 1,
    collate: Callable[[Sequence[Any]], Any] = collate_crops,
) -> tuple[DataLoader, ResumableBatchSampler]:
    """Multi-crop training loader of this rank and its sampler (call set_epoch / set_start_batch on it).

    `batch_size` is per rank. Batches are `collate`'s (by default ([crop tensors [B, C, H, W]], labels [B]));
    incomplete batches are dropped so every step has the same shape on every rank.
    """
    sampler = ResumableBatchSampler(len(dataset), batch_size, seed, rank, world_size, drop_last=True, shuffle=True)
    loader = DataLoader(
        MultiCropDataset(dataset, transform),
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,  # worker start-up is paid once, not every epoch
        worker_init_fn=ignore_stop_signals,
        # Its own generator: starting an iterator draws a worker base seed, which must not consume the global
        # RNG that the model's stochastic depth uses (a resumed run starts one more iterator).
        generator=torch.Generator().manual_seed(seed),
    )
    return loader, sampler


def build_eval_loader(
    dataset: Dataset, transform: Callable[[Any], torch.Tensor], batch_size: int, num_workers: int
) -> DataLoader:
    """Evaluation loader of (images [B, C, H, W], labels [B]) in dataset order, keeping the last short batch.

    Workers are not persistent: evaluation loaders are built per evaluation and would otherwise keep idle
    processes alive between evaluations.
    """
    return DataLoader(
        _TransformedDataset(dataset, transform),
        batch_size=batch_size,
        shuffle=False,
        drop_last=False,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
    )
