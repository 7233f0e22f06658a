"""Distribution strategies (see base.py for the interface): single, ddp, fsdp, deepspeed."""

from __future__ import annotations

from typing import Optional

import torch

from mokd.engine.distributed import World
from mokd.engine.strategies.base import Strategy
from mokd.errors import ConfigError


def build_strategy(config, world: World, amp_dtype: Optional[torch.dtype]) -> Strategy:
    name = config.parallel.strategy
    if name == "single":
        if world.distributed:
            raise ConfigError(f"parallel.strategy=single but {world.world_size} processes were launched: choose "
                             f"ddp, fsdp or deepspeed, or launch one process")
        return Strategy(config, world, amp_dtype)
    if name == "ddp":
        from mokd.engine.strategies.ddp import DDPStrategy

        return DDPStrategy(config, world, amp_dtype)
    if name == "fsdp":
        from mokd.engine.strategies.fsdp import FSDPStrategy

        return FSDPStrategy(config, world, amp_dtype)
    from mokd.engine.strategies.zero import DeepSpeedStrategy  # deepspeed is imported only when asked for

    return DeepSpeedStrategy(config, world, amp_dtype)


__all__ = ["Strategy", "build_strategy"]
