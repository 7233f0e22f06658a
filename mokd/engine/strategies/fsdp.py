"""`fsdp`: FSDP2 (`fully_shard`) shards students and teachers alike over all ranks, unit by unit: the units are
the ones the network declares (Network.sharding_units), each below the network's root unit.

Each teacher is sharded with the same mesh and the same units as its student, so teacher shard k and student
shard k hold the same elements and the EMA runs on local shards with no communication. A teacher forward
under no_grad leaves its root unit's parameters gathered, so the teacher callable reshards after it.
Gradient clipping is DINO's per-parameter clipping: every rank computes the squared norms of its local gradient
shards, one all-reduce sums them per parameter, and every rank scales its own shards.
BatchNorm layers become SyncBatchNorm (NCCL) or GlobalBatchNorm (statistics of the global batch), as under DDP.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from mokd.engine.optim import clip_gradients_
from mokd.engine.strategies.base import MemoryLayout, StrategyBase, convert_batchnorm


class _ReshardingTeacher:
    """Calls the sharded teacher, then frees its gathered parameters (no backward will do it)."""

    def __init__(self, teacher: nn.Module) -> None:
        self.teacher = teacher

    def __call__(self, *args, **kwargs):
        output = self.teacher(*args, **kwargs)
        self.teacher.reshard()
        return output


class FSDPStrategy(StrategyBase):
    name = "fsdp"

    @classmethod
    def memory_layout(cls, config) -> MemoryLayout:
        return MemoryLayout(cls.name, (True, True, True, True), gathers_units=True)

    def wrap(self, students, teachers):
        mesh = init_device_mesh(self.world.device.type, (self.world.world_size,))
        policy = MixedPrecisionPolicy(param_dtype=self.amp_dtype if self.amp_dtype == torch.bfloat16 else None,
                                      reduce_dtype=torch.float32)
        # A teacher always reshards after its forward: it has no backward that would reshard it later, and its EMA
        # writes the local shards, which a unit left gathered would not read again.
        plan = [(student, self.config.parallel.reshard_after_forward) for student in students]
        plan += [(teacher, True) for teacher in teachers]
        for network, reshard in plan:
            convert_batchnorm(network, dist.get_backend())
            for unit in network.sharding_units():
                fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
            fully_shard(network, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
        return students, tuple(_ReshardingTeacher(teacher) for teacher in teachers)

    def local_tensors(self, module: nn.Module) -> list[torch.Tensor]:
        return [parameter.to_local() for parameter in module.parameters()]

    @torch.no_grad()
    def clip_gradients(self, network: nn.Module, max_norm: float) -> torch.Tensor:
        return clip_gradients_(network, max_norm, sharded=True)
