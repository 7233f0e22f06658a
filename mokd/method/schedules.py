"""Per-step schedules: learning rate, weight decay, teacher momentum and teacher temperatures (DINO's)."""

from __future__ import annotations

import math

import numpy as np


def cosine_schedule(start: float, end: float, total_steps: int, warmup_steps: int = 0,
                    warmup_start: float = 0.0) -> np.ndarray:
    """Linear warm-up from `warmup_start` to `start` over `warmup_steps`, then a half cosine from `start` to `end`."""
    # A warm-up longer than the run is cut off at the run's end, never squeezed into it: its slope is the run's own.
    warmup = np.linspace(warmup_start, start, warmup_steps, endpoint=False)[:total_steps] if warmup_steps else []
    remaining = total_steps - len(warmup)
    progress = np.arange(remaining) / max(remaining, 1)
    cosine = end + 0.5 * (start - end) * (1 + np.cos(math.pi * progress))
    return np.concatenate([warmup, cosine])


def teacher_temperature_schedule(start: float, end: float, warmup_epochs: float, total_steps: int,
                                 steps_per_epoch: int, unit: str = "step") -> np.ndarray:
    """Linear from `start` to `end` over the warm-up epochs, then constant at `end`. With unit="epoch" the value
    moves once per epoch (DINO's schedule: epoch e of a W-epoch warm-up has start + e (end - start) / W)."""
    if unit == "epoch":
        warmup_epochs = round(warmup_epochs)
        per_epoch = np.concatenate([np.linspace(start, end, warmup_epochs, endpoint=False) if warmup_epochs
                                    else np.zeros(0), np.full(max(total_steps // steps_per_epoch + 1, 1), end)])
        return np.repeat(per_epoch, steps_per_epoch)[:total_steps]
    warmup_steps = round(warmup_epochs * steps_per_epoch)  # cut off, not squeezed, by a shorter run (as per epoch)
    warmup = np.linspace(start, end, warmup_steps, endpoint=False)[:total_steps] if warmup_steps else np.zeros(0)
    return np.concatenate([warmup, np.full(total_steps - len(warmup), end)])


def lr_and_weight_decay(optim, total_steps: int, steps_per_epoch: int, global_batch: int) -> tuple[np.ndarray,
                                                                                                  np.ndarray]:
    """An optimiser config's per-step lr (warm-up to base_lr * global_batch / 256, cosine to min_lr) and weight
    decay (cosine from weight_decay to weight_decay_end)."""
    peak_lr = optim.base_lr * global_batch / 256
    return (cosine_schedule(peak_lr, optim.min_lr, total_steps, round(optim.warmup_epochs * steps_per_epoch)),
            cosine_schedule(optim.weight_decay, optim.weight_decay_end, total_steps))


class ModelSchedules:
    """Every per-step value one model's training needs, precomputed over the whole run. `thead_optim`: the
    optimiser config whose lr and weight-decay schedules the T-Head's parameter group follows (the other model's
    under the official CNN T-Head group; by default this model's own)."""

    def __init__(self, model_config, loss_config, total_steps: int, steps_per_epoch: int, global_batch: int,
                 thead_optim=None) -> None:
        self.lr, self.weight_decay = lr_and_weight_decay(model_config.optim, total_steps, steps_per_epoch, global_batch)
        self.thead_lr, self.thead_weight_decay = (
            (self.lr, self.weight_decay) if thead_optim is None
            else lr_and_weight_decay(thead_optim, total_steps, steps_per_epoch, global_batch))
        self.teacher_momentum = cosine_schedule(loss_config.teacher_momentum, 1.0, total_steps)
        temperature = model_config.temperature
        self.teacher_temperature_self = teacher_temperature_schedule(
            temperature.teacher_start, temperature.teacher_end, temperature.warmup_epochs_self, total_steps,
            steps_per_epoch, temperature.warmup_unit)
        self.teacher_temperature_cross = teacher_temperature_schedule(
            temperature.teacher_start, temperature.teacher_end, temperature.warmup_epochs_cross, total_steps,
            steps_per_epoch, temperature.warmup_unit)
        self.student_temperature = temperature.student
        self.freeze_last_layer_steps = round(model_config.optim.freeze_last_layer_epochs * steps_per_epoch)

    def group_values(self, step: int) -> dict[str, tuple[float, float]]:
        """(lr, weight decay) at `step` for each schedule a parameter group can follow (engine/optim.py)."""
        return {"model": (float(self.lr[step]), float(self.weight_decay[step])),
                "thead": (float(self.thead_lr[step]), float(self.thead_weight_decay[step]))}
