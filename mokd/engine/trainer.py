"""The single-process trainer: the story of a MOKD step, from crops to teachers and centres.

    crops -> teachers (no grad) and students forward -> six DINO terms + search -> L_1 + L_2 backward
    -> per model: clip, freeze last layers (first epoch), optimiser step -> EMA teachers -> move centres
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import torch

from mokd.config import MOKDConfig, save_config, to_yaml
from mokd.data import MultiCropTransform, build_train_loader, dataset_for, dataset_statistics, limit_size
from mokd.engine.checkpoint import CheckpointError, CheckpointManager
from mokd.engine.metrics import MetricsLogger
from mokd.engine.optim import build_optimizer, clip_gradients_, drop_last_layer_gradients_, set_schedule
from mokd.engine.perf import apply_perf, teacher_update
from mokd.engine.runtime import (autocast, autocast_dtype, peak_memory_bytes, resolve_device, restore_rng_state,
                                 rng_state, set_determinism)
from mokd.method.mokd import Centres, MOKDObjective, StepLosses, Temperatures, untimed
from mokd.method.pair import build_pair
from mokd.method.schedules import ModelSchedules


def build_train_data(config: MOKDConfig, rank: int = 0, world_size: int = 1):
    """The training dataset, its multi-crop transform, loader and resumable sampler."""
    data = config.data
    dataset = limit_size(dataset_for(data, "train", config.train.seed), data.train_samples, config.train.seed)
    mean, std = dataset_statistics(data.source, dataset.channels)
    transform = MultiCropTransform(data.global_crop_size, data.local_crop_size, data.n_local_crops,
                                   tuple(data.global_crop_scale), tuple(data.local_crop_scale), mean, std,
                                   dataset.channels)
    loader, sampler = build_train_loader(dataset, transform, config.train.batch_size, config.train.seed,
                                         data.num_workers, rank=rank, world_size=world_size)
    return dataset, loader, sampler


class Trainer:
    def __init__(self, config: MOKDConfig, show_progress: bool = True) -> None:
        self.config = config
        self.run_dir = Path(config.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoints = CheckpointManager(self.run_dir, config.checkpoint.keep_last)
        latest = self.checkpoints.latest()
        if latest is not None and not config.checkpoint.resume:  # refuse before touching the run's files
            raise CheckpointError(f"{self.run_dir} already holds checkpoints (newest {latest.name}) and "
                                  f"checkpoint.resume=false: choose a new run_dir, or remove {self.checkpoints.directory}")
        save_config(config, self.run_dir / "config.yaml")
        set_determinism(config.train.seed, config.train.deterministic)
        self.device = resolve_device(config.train.device)
        self.amp_dtype = autocast_dtype(config.train.precision, self.device)

        self.dataset, self.loader, self.sampler = build_train_data(config)
        self.steps_per_epoch = len(self.sampler)
        if self.steps_per_epoch == 0:
            raise ValueError(f"train.batch_size={config.train.batch_size} is larger than the {len(self.dataset)} "
                             f"training images of data.source={config.data.source}: no full batch per epoch")
        self.total_steps = config.train.epochs * self.steps_per_epoch
        self.last_step = min(self.total_steps, config.train.max_steps or self.total_steps)

        students, teachers = build_pair(config, self.dataset.channels)
        self.students = tuple(apply_perf(student.to(self.device), config.perf) for student in students)
        self.teachers = tuple(apply_perf(teacher.to(self.device), config.perf) for teacher in teachers)
        self.centres = Centres(config.head.out_dim).to(self.device)
        model_configs = (config.model1, config.model2)
        self.objective = MOKDObjective(config.loss, tuple(model.cross_weight for model in model_configs))
        self.optimizers = [build_optimizer(student, model.optim, config.perf.optimizer)
                           for student, model in zip(self.students, model_configs)]
        fp16 = self.amp_dtype == torch.float16
        self.scalers = [torch.amp.GradScaler(self.device.type, enabled=fp16) for _ in model_configs]
        global_batch = config.train.batch_size  # times the world size once distributed
        self.schedules = [ModelSchedules(model, config.loss, self.total_steps, self.steps_per_epoch, global_batch)
                          for model in model_configs]
        self.teacher_pairs = [(list(t.parameters()), list(s.parameters())) for t, s in zip(self.teachers, self.students)]
        self.update_teacher = teacher_update(config.perf)
        self.phase = untimed  # the step's phase hook; a profiler installs a timer with set_phase_hook

        self.step = 0
        if latest is not None:
            self.load_state(CheckpointManager.load(latest))
        self.metrics = MetricsLogger(self.run_dir, self.last_step, self.step, show_progress)

    # ---- the step -------------------------------------------------------------------------------
    def set_phase_hook(self, phase) -> None:
        """phase(name) -> context manager, wrapped around each part of the step (here and in the objective)."""
        self.phase = phase
        self.objective.phase = phase

    def temperatures(self, step: int) -> tuple[Temperatures, Temperatures]:
        return tuple(Temperatures(s.student_temperature, float(s.teacher_temperature_self[step]),
                                  float(s.teacher_temperature_cross[step])) for s in self.schedules)

    def train_step(self, crops: list[torch.Tensor]) -> tuple[StepLosses, list[torch.Tensor]]:
        step, overlap = self.step, self.config.perf.overlap_centre_reduce
        with self.phase("data"):
            crops = [crop.to(self.device, non_blocking=True) for crop in crops]

        with autocast(self.device, self.amp_dtype):
            losses = self.objective(self.students, self.teachers, self.centres, crops, self.temperatures(step))
        with self.phase("centres"):  # overlapped: in flight during backward, optimiser and EMA
            pending = Centres.start_all_reduce(losses.centre_sums, losses.centre_rows, async_op=True) if overlap else None
        with self.phase("backward"):
            # L_1 depends only on student 1 and L_2 only on student 2: one backward trains both.
            sum(scaler.scale(total) for scaler, total in zip(self.scalers, losses.totals)).backward()

        grad_norms = []
        with self.phase("optimizer"):
            for student, optimizer, scaler, schedule, model in zip(self.students, self.optimizers, self.scalers,
                                                                    self.schedules, (self.config.model1, self.config.model2)):
                set_schedule(optimizer, float(schedule.lr[step]), float(schedule.weight_decay[step]))
                scaler.unscale_(optimizer)
                grad_norms.append(clip_gradients_(student, model.optim.clip_grad))
                if step < schedule.freeze_last_layer_steps:
                    drop_last_layer_gradients_(student.last_layers())
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)

        with torch.no_grad():
            with self.phase("ema"):
                for (teacher_params, student_params), schedule in zip(self.teacher_pairs, self.schedules):
                    self.update_teacher(teacher_params, student_params, float(schedule.teacher_momentum[step]))
            with self.phase("centres"):
                if pending is None:
                    pending = Centres.start_all_reduce(losses.centre_sums, losses.centre_rows, async_op=False)
                pending.wait()
                self.centres.update(losses.centre_sums, losses.centre_rows, self.config.loss.centre_momentum)
        self.step += 1
        return losses, grad_norms

    # ---- the loop -------------------------------------------------------------------------------
    def train(self) -> None:
        epoch = self.step // self.steps_per_epoch
        window_start, window_images, data_wait = time.perf_counter(), 0, 0.0
        while self.step < self.last_step:
            self.sampler.set_epoch(epoch)
            self.sampler.set_start_batch(self.step - epoch * self.steps_per_epoch)
            fetch_start = time.perf_counter()
            for crops, _ in self.loader:
                data_wait += time.perf_counter() - fetch_start
                losses, grad_norms = self.train_step(crops)
                window_images += crops[0].shape[0]
                self.metrics.advance()
                if self.step % self.config.train.log_every == 0 or self.step == self.last_step:
                    elapsed = time.perf_counter() - window_start
                    self.log(losses, grad_norms, window_images / elapsed, data_wait / elapsed)
                    window_start, window_images, data_wait = time.perf_counter(), 0, 0.0
                if self.should_checkpoint():
                    self.save()
                if self.step >= self.last_step:
                    break
                fetch_start = time.perf_counter()
            epoch += 1
        self.metrics.close()

    def should_checkpoint(self) -> bool:
        if not self.config.checkpoint.enabled:
            return False
        every = self.config.checkpoint.every_steps
        end_of_epoch = self.step % self.steps_per_epoch == 0
        return self.step == self.last_step or (every > 0 and self.step % every == 0) or (every == 0 and end_of_epoch)

    def log(self, losses: StepLosses, grad_norms: list[torch.Tensor], images_per_second: float,
            data_wait_share: float) -> None:
        step = self.step - 1  # the values belong to the step just taken
        scalars: dict[str, float] = {}
        for name, value in losses.terms.items():
            scalars[f"loss/{name}"] = value.item()
        for which, (total, schedule, norm) in enumerate(zip(losses.totals, self.schedules, grad_norms), start=1):
            scalars[f"loss/model{which}/total"] = total.item()
            scalars[f"schedule/model{which}/lr"] = float(schedule.lr[step])
            scalars[f"schedule/model{which}/weight_decay"] = float(schedule.weight_decay[step])
            scalars[f"schedule/model{which}/teacher_momentum"] = float(schedule.teacher_momentum[step])
            scalars[f"schedule/model{which}/teacher_temperature_self"] = float(schedule.teacher_temperature_self[step])
            scalars[f"schedule/model{which}/teacher_temperature_cross"] = float(schedule.teacher_temperature_cross[step])
            scalars[f"grad_norm/model{which}"] = float(norm)
        for name, value in losses.teacher_entropy.items():
            scalars[f"collapse/teacher_entropy/{name}"] = value.item()
        for name, value in losses.kl_teacher_student.items():
            scalars[f"collapse/kl_teacher_student/{name}"] = value.item()
        scalars["perf/images_per_second"] = images_per_second
        scalars["perf/data_wait_share"] = data_wait_share
        scalars["perf/peak_memory_bytes"] = float(peak_memory_bytes(self.device))
        self.metrics.log(self.step, scalars)

    # ---- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "data_position": {"epoch": self.step // self.steps_per_epoch,
                              "batch_in_epoch": self.step % self.steps_per_epoch},
            "students": [student.state_dict() for student in self.students],
            "teachers": [teacher.state_dict() for teacher in self.teachers],
            "optimizers": [optimizer.state_dict() for optimizer in self.optimizers],
            "scalers": [scaler.state_dict() for scaler in self.scalers],
            "centres": self.centres.state_dict(),
            "rng": rng_state(),
            "config": to_yaml(self.config),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        for modules, key in ((self.students, "students"), (self.teachers, "teachers"),
                             (self.optimizers, "optimizers"), (self.scalers, "scalers")):
            for module, module_state in zip(modules, state[key]):
                module.load_state_dict(module_state)
        self.centres.load_state_dict(state["centres"])
        restore_rng_state(state["rng"])
        self.step = state["step"]

    def save(self) -> Optional[Path]:
        return self.checkpoints.save(self.state_dict(), self.step)
