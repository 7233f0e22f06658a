"""`ddp`: every rank holds whole students and teachers; DistributedDataParallel averages the gradients.

BatchNorm layers of students and teachers become SyncBatchNorm under NCCL and GlobalBatchNorm elsewhere, so a
rank of B images normalises with the statistics of all ranks' images, as one process with the global batch would
(DINO uses SyncBatchNorm for the same reason). The teacher is a plain replicated module: identical updates on
identical weights keep the replicas equal, and its EMA is local.
"""

from __future__ import annotations

import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from mokd.engine.strategies.base import MemoryLayout, StrategyBase, convert_batchnorm


class DDPStrategy(StrategyBase):
    name = "ddp"

    @classmethod
    def memory_layout(cls, config) -> MemoryLayout:
        return MemoryLayout(cls.name, (False, False, False, False), gradient_buckets=True)

    def wrap(self, students, teachers):
        for network in (*students, *teachers):
            convert_batchnorm(network, dist.get_backend())
        device_ids = [self.world.device.index] if self.world.device.type == "cuda" else None
        # Buffers (BN running statistics) are equal on every rank by construction: no broadcast each forward.
        # (DDP still broadcasts them once when it wraps, which changes nothing; `broadcast_buffers=False`, the
        # older spelling that skipped that too, is deprecated and warns on every wrap.)
        wrapped = tuple(DistributedDataParallel(student, device_ids=device_ids, forward_sync_buffers=False)
                        for student in students)
        return wrapped, teachers
