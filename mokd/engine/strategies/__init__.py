"""Distribution strategies by name (parallel.strategy); the interface the trainer uses is base.Strategy.

Each name registers a loader of its class, so a strategy's module (and with it FSDP2 or DeepSpeed) is imported
only when the strategy is used; importing this package to learn the names imports none of them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

from mokd.config import register_choices
from mokd.registry import Registry

if TYPE_CHECKING:
    import torch

    from mokd.engine.distributed import World
    from mokd.engine.strategies.base import Strategy

STRATEGIES: Registry[Callable[[], type]] = Registry("parallel.strategy")
register_choices(STRATEGIES.key, STRATEGIES.helps)


@STRATEGIES.register("single", "one process (CPU or one GPU), the models as they are; DCP checkpoints")
def _single() -> type:
    from mokd.engine.strategies.base import SingleStrategy

    return SingleStrategy


@STRATEGIES.register("ddp", "DistributedDataParallel: whole models on every rank, gradients averaged; DCP checkpoints")
def _ddp() -> type:
    from mokd.engine.strategies.ddp import DDPStrategy

    return DDPStrategy


@STRATEGIES.register("fsdp", "FSDP2 fully_shard: each student and its teacher sharded alike over all ranks; DCP "
                             "checkpoints")
def _fsdp() -> type:
    from mokd.engine.strategies.fsdp import FSDPStrategy

    return FSDPStrategy


@STRATEGIES.register("deepspeed", "DeepSpeed ZeRO stage 1, 2 or 3 (parallel.zero_stage), one engine per student; "
                                  "DeepSpeed's own checkpoints")
def _deepspeed() -> type:
    from mokd.engine.strategies.deepspeed import DeepSpeedStrategy  # deepspeed itself only at setup

    return DeepSpeedStrategy


def strategy_class(name: str) -> type[Strategy]:
    """The class of strategy `name` (its module imported now); ConfigError naming parallel.strategy if unknown."""
    return STRATEGIES.get(name)()


def build_strategy(config, world: World, amp_dtype: Optional[torch.dtype]) -> Strategy:
    return strategy_class(config.parallel.strategy)(config, world, amp_dtype)


__all__ = ["STRATEGIES", "build_strategy", "strategy_class"]
