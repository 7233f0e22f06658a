"""The training data of a run: the dataset, its loader, where in an epoch the loader stands, and the step that
turns a loader batch into crop tensors on the device (data.augment=device augments there)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from mokd.config import MOKDConfig
from mokd.data import build_train_loader, dataset_for, limit_size, shard_train_loader, train_augmentation
from mokd.errors import DataError


@dataclass
class TrainData:
    dataset: Any
    loader: Any
    sampler: Any  # the loader's position: set_epoch, set_start_batch, len (ResumableBatchSampler or ShardLoader)
    to_crops: Callable  # (loader batch, device) -> list of crop tensors

    @classmethod
    def build(cls, config: MOKDConfig, rank: int = 0, world_size: int = 1) -> "TrainData":
        """This rank's share of the training split; refuses a batch larger than the data before any work."""
        data = config.data
        dataset = dataset_for(data, "train", config.train.seed)
        if data.source != "webdataset":  # shards are never indexed for training: the manifest has the counts
            dataset = limit_size(dataset, data.train_samples, config.train.seed)
        augmentation = train_augmentation(data, dataset.channels)
        if data.source == "webdataset":
            loader = shard_train_loader(data, augmentation.transform, config.train.batch_size, config.train.seed,
                                        rank, world_size, augmentation.collate)
            sampler = loader
        else:
            loader, sampler = build_train_loader(dataset, augmentation.transform, config.train.batch_size,
                                                 config.train.seed, data.num_workers, rank=rank,
                                                 world_size=world_size, collate=augmentation.collate)
        if len(sampler) == 0:
            raise DataError(f"train.batch_size={config.train.batch_size} is larger than the {len(dataset)} "
                            f"training images of data.source={data.source}: no full batch per epoch")
        return cls(dataset, loader, sampler, augmentation.to_device)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.sampler)

    def position(self, step: int) -> dict[str, int]:
        """The data position after `step` steps, as a checkpoint records it."""
        return {"epoch": step // self.steps_per_epoch, "batch_in_epoch": step % self.steps_per_epoch}
