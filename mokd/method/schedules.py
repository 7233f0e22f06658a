"""Per-step schedules: learning rate, weight decay, teacher momentum and teacher temperatures (DINO's)."""

from __future__ import annotations

import math

import numpy as np


def cosine_schedule(start: float, end: float, total_steps: int, warmup_steps: int = 0,
                    warmup_start: float = 0.0) -> np.ndarray:
    """Linear warm-up from `warmup_start` to `start` over `warmup_steps`, then a half cosine from `start` to `end`."""
    warmup_steps = min(warmup_steps, total_steps)
    warmup = np.linspace(warmup_start, start, warmup_steps, endpoint=False) if warmup_steps else np.zeros(0)
    remaining = total_steps - warmup_steps
    progress = np.arange(remaining) / max(remaining, 1)
    cosine = end + 0.5 * (start - end) * (1 + np.cos(math.pi * progress))
    return np.concatenate([warmup, cosine])


def teacher_temperature_schedule(start: float, end: float, warmup_epochs: float, total_steps: int,
                                 steps_per_epoch: int) -> np.ndarray:
    """Linear from `start` to `end` over the warm-up epochs, then constant at `end`."""
    warmup_steps = min(round(warmup_epochs * steps_per_epoch), total_steps)
    warmup = np.linspace(start, end, warmup_steps, endpoint=False) if warmup_steps else np.zeros(0)
    return np.concatenate([warmup, np.full(total_steps - warmup_steps, end)])


class ModelSchedules:
    """Every per-step value one model's training needs, precomputed over the whole run."""

    def __init__(self, model_config, loss_config, total_steps: int, steps_per_epoch: int, global_batch: int) -> None:
        optim = model_config.optim
        peak_lr = optim.base_lr * global_batch / 256
        self.lr = cosine_schedule(peak_lr, optim.min_lr, total_steps, round(optim.warmup_epochs * steps_per_epoch))
        self.weight_decay = cosine_schedule(optim.weight_decay, optim.weight_decay_end, total_steps)
        self.teacher_momentum = cosine_schedule(loss_config.teacher_momentum, 1.0, total_steps)
        temperature = model_config.temperature
        self.teacher_temperature_self = teacher_temperature_schedule(
            temperature.teacher_start, temperature.teacher_end, temperature.warmup_epochs_self, total_steps,
            steps_per_epoch)
        self.teacher_temperature_cross = teacher_temperature_schedule(
            temperature.teacher_start, temperature.teacher_end, temperature.warmup_epochs_cross, total_steps,
            steps_per_epoch)
        self.student_temperature = temperature.student
        self.freeze_last_layer_steps = round(optim.freeze_last_layer_epochs * steps_per_epoch)
