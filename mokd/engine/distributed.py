"""The process group of a run: who this process is, which device it drives, and the few collectives the
engine needs beyond what the strategies' wrappers do.

Launchers set the environment: torchrun and the DeepSpeed launcher set RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT; under SLURM's srun (one task per GPU, see scripts/slurm.sbatch) the same values are
read from SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID, with MASTER_ADDR/MASTER_PORT exported by the batch script.
Without any of them the run is a single process and no process group is created.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

from mokd.errors import CollectiveError, ConfigError

# What gloo and NCCL say when a peer does not answer in time or has died: a hung rank, not a bug.
_PEER_FAILURES = ("Timed out", "timed out", "Connection closed by peer", "Connection reset by peer", "Broken pipe",
                  "NCCL communicator was aborted", "collective operation timeout")
_timeout_minutes = 0.0


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launch_environment() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun / DeepSpeed launcher variables, else SLURM's, else (0, 1, 0)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def init_world(device: torch.device, parallel_config) -> World:
    """Join the process group (when launched with several processes) and pin this process to its device."""
    rank, world_size, local_rank = launch_environment()
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    # One process is a legal world for every strategy (a checkpoint resharded to one process, say), but the
    # wrappers of ddp, fsdp and deepspeed need a process group even then.
    needs_group = world_size > 1 or parallel_config.strategy != "single"
    if needs_group and not dist.is_initialized():
        if world_size == 1:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        for key in ("MASTER_ADDR", "MASTER_PORT"):
            if key not in os.environ:
                raise ConfigError(f"{world_size} processes but {key} is not set: launch with torchrun, the DeepSpeed "
                                   f"launcher, or export it in the SLURM batch script")
        for key, value in (("RANK", rank), ("WORLD_SIZE", world_size), ("LOCAL_RANK", local_rank)):
            os.environ.setdefault(key, str(value))  # env:// rendezvous reads these (srun sets only SLURM_*)
        backend = parallel_config.backend
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        global _timeout_minutes
        _timeout_minutes = parallel_config.timeout_minutes
        timeout = datetime.timedelta(minutes=parallel_config.timeout_minutes)
        store, _, _ = next(dist.rendezvous("env://", rank, world_size, timeout=timeout))
        # torchrun's static rendezvous keeps one store across the restarts of a group (--max-restarts): the
        # addresses the previous attempt's ranks published there, a killed rank's among them, must not be read by
        # this attempt's connections (gloo then dials a dead port), so every attempt keys its own prefix.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(backend, store=dist.PrefixStore(f"mokd/attempt_{attempt}", store), rank=rank,
                                world_size=world_size, timeout=timeout,
                                device_id=device if device.type == "cuda" else None)
    return World(rank, world_size, local_rank, device)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def collective(name: str) -> Iterator[None]:
    """Name the collectives run inside the block: a peer that hangs past parallel.timeout_minutes or dies becomes a
    CollectiveError naming `name` and this rank, instead of a transport error from deep inside gloo or NCCL."""
    try:
        yield
    except RuntimeError as error:
        if not dist.is_initialized() or not (isinstance(error, dist.DistError)
                                             or any(sign in str(error) for sign in _PEER_FAILURES)):
            raise
        detail = str(error).strip().splitlines()[0][-200:]
        raise CollectiveError(f"rank {dist.get_rank()}: collective '{name}' failed (parallel.timeout_minutes="
                              f"{_timeout_minutes:g}): another rank is hung or dead ({detail})") from None


def any_rank(flags: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of a small flag vector over ranks, in one all-reduce: every rank decides alike."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        flags = flags.clone()
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags


def broadcast_object(value: Any) -> Any:
    """Rank 0's `value` on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def all_gather_objects(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def all_reduce_mean(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mean over ranks of scalar metrics, in one collective (each rank's loss is over its own images)."""
    if not dist.is_initialized() or dist.get_world_size() == 1 or not values:
        return values
    stacked = torch.stack([value.detach().float().reshape(()) for value in values.values()])
    dist.all_reduce(stacked)
    stacked /= dist.get_world_size()
    return dict(zip(values, stacked.unbind()))


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of `tensor` (a new tensor; the input is left as it is)."""
    total = tensor.clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total)
    return total


class CentreSync:
    """The centres' column sums and row counts all-reduced as one flat buffer, once per step, optionally
    started early (async) so that the transfer overlaps the backward pass."""

    def __init__(self, sums: torch.Tensor, rows: torch.Tensor, async_op: bool) -> None:
        self.sums, self.rows = sums, rows
        self.flat: Optional[torch.Tensor] = None  # the reduced buffer; None in one process (nothing to reduce)
        self.handle: Optional[dist.Work] = None  # only an async all-reduce has one to wait on
        if dist.is_initialized() and dist.get_world_size() > 1:
            self.flat = torch.cat([sums.detach().reshape(-1), rows.detach().to(sums.dtype)])
            self.handle = dist.all_reduce(self.flat, async_op=async_op)

    def wait(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(global column sums [6, K], global teacher rows [6])."""
        if self.flat is None:
            return self.sums, self.rows
        if self.handle is not None:
            self.handle.wait()
        count = self.sums.numel()
        return self.flat[:count].view(self.sums.shape), self.flat[count:]
