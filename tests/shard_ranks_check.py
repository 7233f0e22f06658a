"""Run under torchrun: every rank builds the training data of a config (the trainer's TrainData) with
its rank and world size from torch.distributed (gloo), reads one epoch, and the ranks compare batch counts.

    torchrun --standalone --nproc_per_node 2 tests/shard_ranks_check.py OUT.json key=value ...

Rank 0 writes [{"length", "batches", "labels"} per rank] to OUT.json; the script exits non-zero when the
ranks' batch counts differ or two of them saw the same sample.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist

from mokd.config import load_config
from mokd.engine.train_data import TrainData


def main(out: Path, overrides: list[str]) -> None:
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    config = load_config(None, overrides)
    data = TrainData.build(config, rank, world_size)
    loader, position = data.loader, data.sampler
    position.set_epoch(0)
    labels = [int(label) for _, batch_labels in loader for label in batch_labels]
    mine = {"length": len(position), "batches": len(labels) // config.train.batch_size, "labels": labels}
    everyone: list = [None] * world_size
    dist.all_gather_object(everyone, mine)
    dist.barrier()
    if rank == 0:
        out.write_text(json.dumps(everyone))
    counts = {entry["batches"] for entry in everyone}
    ranks_per_sample = Counter(label for entry in everyone for label in set(entry["labels"]))
    overlap = [label for label, ranks in ranks_per_sample.items() if ranks > 1]
    dist.destroy_process_group()
    if len(counts) != 1 or overlap:
        sys.exit(f"rank {rank}: batch counts per rank {sorted(counts)}, samples seen by several ranks {sorted(overlap)}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]), sys.argv[2:])
