"""The strategy interface (`Strategy`), what the strategies share (`StrategyBase`), and `single`.

A strategy owns how each student is wrapped, how its gradients are synchronised and clipped, how its optimiser
steps, how its teacher is kept (sharded exactly like the student, so the EMA touches local tensors only), and
how both are written to and read from a checkpoint directory. The trainer sees only the `Strategy` protocol.
`StrategyBase` keeps whole modules, one GradScaler per model and DCP checkpoints; `single` uses it as it is,
`ddp` and `fsdp` change the wrapping (and FSDP2 the clipping), `deepspeed` most of it.
"""

from __future__ import annotations

import contextlib
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Optional, Protocol, runtime_checkable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from mokd.engine.batchnorm import convert_to_global_batchnorm
from mokd.engine.checkpoint import failure_message
from mokd.engine.distributed import World
from mokd.errors import CheckpointError, ConfigError
from mokd.engine.optim import GroupValues, clip_gradients_, drop_last_layer_gradients_, set_schedule
from mokd.kernels import EmaPlan, ema_per_tensor_

OptimizerFactory = Callable[[nn.Module, int], torch.optim.Optimizer]


class MemoryLayout(NamedTuple):
    """How a strategy lays each model's state out over W ranks (`mokd plan` estimates from it)."""

    label: str  # the plan's column name
    sharded: tuple[bool, bool, bool, bool]  # student parameters, teacher parameters, gradients, optimiser state: / W
    master_partition: bool = False  # fp32 master weights, partitioned (ZeRO)
    gathers_units: bool = False  # one unit gathered whole at a time (parameters and gradients)
    gradient_buckets: bool = False  # a second copy of the gradients (DDP's buckets)


@runtime_checkable
class Strategy(Protocol):
    """What the trainer uses of a strategy (and `mokd plan`: memory_layout). The module attributes exist after
    `setup`."""

    name: str  # its parallel.strategy value, written into every checkpoint
    checkpoint_format: str  # "dcp" or "deepspeed": a checkpoint resumes under any strategy of the same format
    students: tuple  # what the step calls: the students as wrapped
    teachers: tuple
    networks: tuple  # the student modules themselves (parameters, last layers)
    teacher_networks: tuple
    optimizers: list
    scalers: list  # one GradScaler per model (disabled unless fp16)

    def setup(self, students, teachers, make_optimizer: OptimizerFactory) -> None:
        """Wrap students and teachers and build one optimiser per student."""

    def set_schedule(self, index: int, values: GroupValues, freeze_last_layer: bool) -> None:
        """This step's lr and weight decay per parameter-group schedule of student `index`, before its step."""

    def backward(self, totals: list[torch.Tensor]) -> None:
        """One backward of L_1 + ... + L_N."""

    def prepare_gradients(self, index: int, clip_grad: float, freeze_last_layer: bool) -> Optional[torch.Tensor]:
        """Unscale and clip student `index`'s gradients: its gradient norm (None if only the step knows it)."""

    def apply_gradients(self, index: int, skip: bool) -> tuple[Optional[torch.Tensor], bool]:
        """The optimiser step of student `index`, or none (a non-finite step); gradients cleared. (The norm if
        only the step knew it, whether the fp16 GradScaler skipped the step.)"""

    def update_teachers(self, momenta: list[float]) -> None:
        """The shard-local EMA of every teacher, no collective."""

    def save(self, directory: Path, background: bool = False) -> Optional[Future]:
        """Students, teachers and optimisers under `directory` (the trainer adds the rest); with `background`,
        the future of the writing where the format can write in the background."""

    def load(self, directory: Path) -> None:
        """What `save` wrote (CheckpointError if it cannot be read)."""

    def teacher_state_dicts(self) -> list[dict]:
        """Full teacher weights on rank 0 (evaluation, export); every rank must call."""

    def local_tensors(self, module: nn.Module) -> list[torch.Tensor]:
        """The parameters of `module` as this rank holds them."""

    def memory_report(self) -> dict[str, int]:
        """Bytes this rank holds per component (parameters, optimiser state)."""

    @classmethod
    def memory_layout(cls, config) -> MemoryLayout:
        """How this strategy would lay the models' state out under `config` (before anything is built)."""


def convert_batchnorm(network: nn.Module, backend: str) -> nn.Module:
    """Make every BatchNorm layer normalise over the global batch of all ranks (in place).

    Under NCCL (CUDA) torch's SyncBatchNorm, whose fused CUDA kernels gather the statistics in one collective;
    elsewhere (gloo, CPU) GlobalBatchNorm, which works on any device. The network's root is never a BatchNorm,
    so the conversion keeps the module object."""
    if backend == "nccl":
        return nn.SyncBatchNorm.convert_sync_batchnorm(network)
    return convert_to_global_batchnorm(network)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class StrategyBase:
    """Whole students and teachers, one GradScaler per model, DINO's per-parameter clipping, DCP checkpoints;
    subclasses change the wrapping and whatever their wrappers do differently."""

    name: str
    checkpoint_format = "dcp"  # reshardable across world sizes and the strategies that keep it
    students: tuple
    teachers: tuple
    networks: tuple
    teacher_networks: tuple
    optimizers: list
    scalers: list

    def __init__(self, config, world: World, amp_dtype: Optional[torch.dtype]) -> None:
        self.config, self.world, self.amp_dtype = config, world, amp_dtype
        fp16 = amp_dtype == torch.float16
        self.scalers = [torch.amp.GradScaler(world.device.type, enabled=fp16) for _ in config.models]

    @classmethod
    def memory_layout(cls, config) -> MemoryLayout:
        return MemoryLayout(cls.name, (False, False, False, False))

    # ---- wrapping ------------------------------------------------------------------------------
    def setup(self, students, teachers, make_optimizer: OptimizerFactory) -> None:
        self.networks = tuple(students)  # the modules themselves (parameters, last layers)
        self.teacher_networks = tuple(teachers)
        self.students, self.teachers = self.wrap(self.networks, self.teacher_networks)
        self.optimizers = [make_optimizer(network, i) for i, network in enumerate(self.networks)]
        self.prepare_teacher_updates()

    def prepare_teacher_updates(self) -> None:
        """Pair each teacher's local tensors with its student's, once (fused: one EmaPlan per model)."""
        self.teacher_pairs = [(self.local_tensors(t), self.local_tensors(s))
                              for t, s in zip(self.teacher_networks, self.networks)]
        self.teacher_emas = [EmaPlan(targets, sources) for targets, sources in self.teacher_pairs]

    def wrap(self, students, teachers) -> tuple[tuple, tuple]:
        return students, teachers

    def local_tensors(self, module: nn.Module) -> list[torch.Tensor]:
        """The parameters as this rank holds them (whole here; local shards under FSDP2)."""
        return list(module.parameters())

    # ---- the step ------------------------------------------------------------------------------
    def set_schedule(self, index: int, values: GroupValues, freeze_last_layer: bool) -> None:
        set_schedule(self.optimizers[index], values)

    def backward(self, totals: list[torch.Tensor]) -> None:
        # L_i depends only on student i: one backward trains every student.
        sum(scaler.scale(total) for scaler, total in zip(self.scalers, totals)).backward()

    def prepare_gradients(self, index: int, clip_grad: float, freeze_last_layer: bool) -> Optional[torch.Tensor]:
        """Unscale, clip and (while frozen) drop the last layers' gradients of student `index`; returns its
        gradient norm before clipping (None where only the optimiser step knows it)."""
        network, optimizer, scaler = self.networks[index], self.optimizers[index], self.scalers[index]
        scaler.unscale_(optimizer)
        norm = self.clip_gradients(network, clip_grad)
        if freeze_last_layer:
            drop_last_layer_gradients_(network.last_layers())
        return norm

    def apply_gradients(self, index: int, skip: bool) -> tuple[Optional[torch.Tensor], bool]:
        """The optimiser step of student `index` (none when `skip`), gradients cleared. Returns (the gradient norm
        if only the step knew it, whether the fp16 GradScaler skipped the step for inf/NaN gradients)."""
        optimizer, scaler = self.optimizers[index], self.scalers[index]
        scale = scaler.get_scale() if scaler.is_enabled() else 0.0
        if not skip:
            scaler.step(optimizer)
        scaler.update()  # also after a skip: it resets the unscale_ bookkeeping (and lowers the scale on inf)
        optimizer.zero_grad(set_to_none=True)
        return None, not skip and scaler.is_enabled() and scaler.get_scale() < scale

    def clip_gradients(self, network: nn.Module, max_norm: float) -> torch.Tensor:
        return clip_gradients_(network, max_norm)

    @torch.no_grad()
    def update_teachers(self, momenta: list[float]) -> None:
        """Shard-local EMA: the fused kernel (perf.fused_ema), or DINO's per-tensor loop."""
        for (targets, sources), plan, momentum in zip(self.teacher_pairs, self.teacher_emas, momenta):
            if self.config.perf.fused_ema:
                plan.update(momentum)
            else:
                ema_per_tensor_(targets, sources, momentum)

    # ---- checkpoints: DCP (reshardable across world sizes and the strategies of this format) -------
    def _dcp_state(self) -> dict:
        state = {}
        for i, (student, teacher, optimizer) in enumerate(zip(self.networks, self.teacher_networks, self.optimizers)):
            state[f"model{i + 1}"] = {
                "student": get_model_state_dict(student),
                "teacher": get_model_state_dict(teacher),
                "optimizer": get_optimizer_state_dict(student, optimizer),
                "scaler": self.scalers[i].state_dict(),
            }
        return state

    def save(self, directory: Path, background: bool = False) -> Optional[Future]:
        """Write models and optimisers under directory/dcp. `background`: stage a CPU copy now and return the
        future of the writing (DCP async_save; its collectives run on a process group of their own)."""
        path = str(directory / "dcp")
        with _single_process_quiet():
            if not background:
                dcp.save(self._dcp_state(), checkpoint_id=path)
                return None
            return dcp.async_save(self._dcp_state(), checkpoint_id=path, process_group=self._checkpoint_group())

    def _checkpoint_group(self) -> Optional[dist.ProcessGroup]:
        if not dist.is_initialized():
            return None
        if getattr(self, "checkpoint_group", None) is None:  # created once, by every rank alike
            self.checkpoint_group = dist.new_group(backend="gloo")
        return self.checkpoint_group

    def load(self, directory: Path) -> None:
        try:
            with _single_process_quiet():
                self._load_dcp(str(directory / "dcp"))
        except (Exception, CheckpointException) as error:  # noqa: BLE001 - DCP's readers raise anything
            raise CheckpointError(f"cannot read checkpoint {directory / 'dcp'}: {failure_message(error)}") from error

    def _load_dcp(self, path: str) -> None:
        state = self._dcp_state()
        # The template has optimiser state for every parameter (torch initialises it to build the template);
        # the checkpoint has none for parameters that never stepped (the last layers while frozen). Load only
        # what was saved, so those parameters stay without state, exactly as in the uninterrupted run.
        saved = set(dcp.FileSystemReader(path).read_metadata().state_dict_metadata)
        for i in range(len(self.networks)):
            optimizer_state = state[f"model{i + 1}"]["optimizer"]["state"]
            for fqn in list(optimizer_state):
                prefix = f"model{i + 1}.optimizer.state.{fqn}."
                if not any(key.startswith(prefix) for key in saved):
                    del optimizer_state[fqn]
        dcp.load(state, checkpoint_id=path)
        for i, (student, teacher, optimizer) in enumerate(zip(self.networks, self.teacher_networks, self.optimizers)):
            part = state[f"model{i + 1}"]
            set_model_state_dict(student, part["student"])
            set_model_state_dict(teacher, part["teacher"])
            set_optimizer_state_dict(student, optimizer, part["optimizer"],
                                     options=StateDictOptions(strict=False))  # stateless last layers, see above
            self.scalers[i].load_state_dict(part["scaler"])

    def teacher_state_dicts(self) -> list[dict]:
        """Full teacher weights (plain tensors on CPU) on rank 0; every rank must call (FSDP2 gathers)."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return [get_model_state_dict(teacher, options=options) for teacher in self.teacher_networks]

    # ---- accounting ----------------------------------------------------------------------------
    def memory_report(self) -> dict[str, int]:
        """Bytes this rank holds for the students' parameters, their optimiser states and the teachers
        (gradients are transient: counted by the plan command, not here)."""
        optimizer_state = [value for optimizer in self.optimizers for state in optimizer.state.values()
                           for value in state.values() if isinstance(value, torch.Tensor) and value.dim() > 0]
        return {
            "student_parameter_bytes": tensor_bytes(t for n in self.networks for t in self.local_tensors(n)),
            "teacher_parameter_bytes": tensor_bytes(t for n in self.teacher_networks for t in self.local_tensors(n)),
            "optimizer_state_bytes": tensor_bytes(_local(value) for value in optimizer_state),
        }


class SingleStrategy(StrategyBase):
    """`single`: one process (CPU or one GPU), the modules as they are."""

    name = "single"

    def __init__(self, config, world: World, amp_dtype: Optional[torch.dtype]) -> None:
        if world.distributed:
            raise ConfigError(f"parallel.strategy=single but {world.world_size} processes were launched: choose "
                              f"ddp, fsdp or deepspeed, or launch one process")
        super().__init__(config, world, amp_dtype)


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """Without a process group DCP warns on every call that it assumes a single process: that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is (disabled|unavailable)")
        yield


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor
