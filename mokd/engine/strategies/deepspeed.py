"""`deepspeed`: one DeepSpeed engine per student, ZeRO stage 1, 2 or 3, client torch optimisers.

Teachers: under ZeRO-1/2 parameters are replicated on every rank, so the teacher is a plain replicated module;
under ZeRO-3 the teacher gets its own (optimiser-less) ZeRO-3 engine, which partitions it exactly as the
student (same parameters, same order, same world size), so teacher partition k and student partition k hold
the same elements and the EMA runs on the local partitions (`ds_tensor`) with no communication.

Two documented deviations from DINO, because ZeRO-2/3 never materialise a whole parameter's gradient on one
rank: `optim.clip_grad` is applied as a clip of the global gradient norm (DeepSpeed's `gradient_clipping`),
not per parameter; and the heads' last layers are frozen during `freeze_last_layer_epochs` by a zero learning
rate and zero weight decay on their parameter groups (their optimiser state still sees the gradients),
instead of by dropping their gradients. BatchNorm layers become SyncBatchNorm (NCCL) or GlobalBatchNorm, as under
DDP.
Checkpoints are DeepSpeed's own format (each engine's `save_checkpoint`), plus the consolidated teachers.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import ContextManager, Optional

import torch
import torch.distributed as dist
from torch import nn

from mokd.engine.checkpoint import failure_message, load_teachers_file
from mokd.engine.optim import GroupValues, set_schedule
from mokd.engine.strategies.base import MemoryLayout, StrategyBase, convert_batchnorm, tensor_bytes
from mokd.errors import CheckpointError


class DeepSpeedStrategy(StrategyBase):
    name = "deepspeed"
    checkpoint_format = "deepspeed"  # each engine's own; resumes only under deepspeed

    @classmethod
    def memory_layout(cls, config) -> MemoryLayout:
        """ZeRO-1 partitions the optimiser state, ZeRO-2 also the gradients, ZeRO-3 also the parameters."""
        stage = config.parallel.zero_stage
        return MemoryLayout(f"zero{stage}", (stage == 3, stage == 3, stage >= 2, True), master_partition=True,
                            gathers_units=stage == 3)

    def _engine_config(self, clip_grad: float) -> dict:
        return {
            "train_micro_batch_size_per_gpu": self.config.train.batch_size,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": self.config.parallel.zero_stage},
            "gradient_clipping": clip_grad,
            # fp32 master weights; the forward runs under the trainer's autocast (bf16 on GPU).
            "fp16": {"enabled": False},
            "bf16": {"enabled": False},
            "steps_per_print": 2**31 - 1,
            # SGD (and AdamW) act element-wise, so they are exact on ZeRO's flat partitions; LARS is not (its
            # trust ratio is per parameter) and is refused by the config check.
            "zero_allow_untested_optimizer": True,
        }

    def setup(self, students, teachers, make_optimizer) -> None:
        import deepspeed

        backend = "nccl" if self.world.device.type == "cuda" else "gloo"
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
        self.stage = self.config.parallel.zero_stage
        for network in (*students, *teachers):
            convert_batchnorm(network, dist.get_backend())
        self.networks, self.teacher_networks = tuple(students), tuple(teachers)
        model_configs = self.config.models
        self.engines = []
        for i, student in enumerate(students):
            engine, _, _, _ = deepspeed.initialize(model=student, optimizer=make_optimizer(student, i),
                                                   config=self._engine_config(model_configs[i].optim.clip_grad),
                                                   dist_init_required=False)
            self.engines.append(engine)
        self.students = tuple(self.engines)
        if self.stage == 3:
            self.teachers = tuple(deepspeed.initialize(model=teacher, config=self._engine_config(0.0),
                                                       dist_init_required=False)[0] for teacher in teachers)
        else:
            self.teachers = self.teacher_networks
        self.optimizers = [engine.optimizer for engine in self.engines]
        for teacher, student in zip(self.teacher_networks, self.networks):
            targets, sources = self.local_tensors(teacher), self.local_tensors(student)
            for (name, _), target, source in zip(teacher.named_parameters(), targets, sources):
                if target.shape != source.shape:
                    raise RuntimeError(f"ZeRO partitioned teacher and student differently at {name}: "
                                       f"{tuple(target.shape)} vs {tuple(source.shape)}")
        self.prepare_teacher_updates()

    def local_tensors(self, module: nn.Module) -> list[torch.Tensor]:
        if self.stage == 3:
            return [parameter.ds_tensor for parameter in module.parameters()]
        return list(module.parameters())

    # ---- the step ------------------------------------------------------------------------------
    def set_schedule(self, index: int, values: GroupValues, freeze_last_layer: bool) -> None:
        set_schedule(self.optimizers[index], values, freeze_last_layer=freeze_last_layer)

    def backward(self, totals: list[torch.Tensor]) -> None:
        for engine, total in zip(self.engines, totals):  # disjoint graphs: each engine reduces its own gradients
            engine.backward(total)

    def prepare_gradients(self, index: int, clip_grad: float, freeze_last_layer: bool) -> Optional[torch.Tensor]:
        return None  # the engine clips inside its step and knows the norm only then

    def apply_gradients(self, index: int, skip: bool) -> tuple[Optional[torch.Tensor], bool]:
        engine = self.engines[index]
        if skip:
            engine.zero_grad()
            return torch.zeros(()), False
        engine.step()  # global-norm clipping, optimiser step, gradients zeroed
        norm = engine.get_global_grad_norm()
        return torch.as_tensor(0.0 if norm is None else float(norm)), False

    # ---- checkpoints: DeepSpeed's format for students and optimisers, teachers consolidated ------
    def save(self, directory: Path, background: bool = False) -> None:
        for i, engine in enumerate(self.engines):
            engine.save_checkpoint(str(directory / "deepspeed"), tag=f"model{i + 1}", save_latest=False)

    def load(self, directory: Path) -> None:
        for i, engine in enumerate(self.engines):
            try:
                path, _ = engine.load_checkpoint(str(directory / "deepspeed"), tag=f"model{i + 1}")
            except Exception as error:  # noqa: BLE001 - DeepSpeed's readers raise anything
                raise CheckpointError(f"cannot read DeepSpeed checkpoint {directory / 'deepspeed'} of model{i + 1}: "
                                      f"{failure_message(error)}") from error
            if path is None:
                raise CheckpointError(f"no DeepSpeed checkpoint for model{i + 1} under {directory / 'deepspeed'}")
        # Teachers from their consolidated weights, written with every checkpoint.
        for teacher, state in zip(self.teacher_networks, load_teachers_file(directory)):
            with self._whole(teacher, modifier_rank=0):
                teacher.load_state_dict(state)

    def teacher_state_dicts(self) -> list[dict]:
        states = []
        for teacher in self.teacher_networks:
            with self._whole(teacher):
                states.append({k: v.detach().cpu().clone() for k, v in teacher.state_dict().items()})
        return states

    def _whole(self, module: nn.Module, modifier_rank: Optional[int] = None) -> ContextManager:
        """The module's parameters gathered whole for the block (ZeRO-3; they already are under ZeRO-1/2);
        with modifier_rank, that rank's changes are partitioned back on exit."""
        if self.stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=modifier_rank)

    def memory_report(self) -> dict[str, int]:
        report = super().memory_report()
        master, state = [], []
        for optimizer in self.optimizers:
            # fp32 master partitions ZeRO keeps for the client optimiser, and the client's own state on them
            for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
                master += list(getattr(optimizer, name, []))
            base = optimizer.optimizer
            state += [v for s in base.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
        report["optimizer_state_bytes"] = tensor_bytes(state)
        report["master_parameter_bytes"] = tensor_bytes(master)
        return report
