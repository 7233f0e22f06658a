"""What a run reports at its logged steps, and the names it reports under: the loss terms and totals, the collapse
monitors, every schedule's value, the gradient norms, the guard's skips and the speed, averaged over the ranks and
written by rank 0 (RUN/metrics.jsonl, TensorBoard), with the collapse warnings they trigger."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from mokd.data import loader_statistics
from mokd.engine.collapse_watch import CollapseWatch, step0_name
from mokd.engine.distributed import all_reduce_mean, collective
from mokd.engine.metrics import MetricsLogger
from mokd.engine.runtime import peak_memory_bytes
from mokd.method.mokd import StepLosses
from mokd.method.monitors import feature_statistics
from mokd.method.schedules import ModelSchedules

FEATURE_MONITOR_TAGS = {"mean_cosine": "feature_cosine", "effective_rank": "feature_rank"}
# schedule/modelK/<name>: the ModelSchedules attribute of each logged schedule
SCHEDULES = ("lr", "weight_decay", "thead_lr", "thead_weight_decay", "teacher_momentum", "teacher_temperature_self",
             "teacher_temperature_cross")


def feature_monitors(losses: StepLosses, reduce: bool) -> dict:
    """Mean pairwise cosine and effective rank of each teacher's pooled global-crop features, by metric name:
    this rank's tensors, or (reduce: collective) floats averaged over the ranks."""
    monitors = {f"collapse/{FEATURE_MONITOR_TAGS[statistic]}/model{number}": value
                for number, pooled in enumerate(losses.teacher_pooled, start=1)
                for statistic, value in feature_statistics(pooled).items()}
    if not reduce:
        return monitors
    with collective("feature monitors all-reduce"):
        return {name: value.item() for name, value in all_reduce_mean(monitors).items()}


class StepLog:
    """Every rank takes part in `record` (the values are averaged over ranks); only rank 0 has a writer."""

    def __init__(self, schedules: Sequence[ModelSchedules], collapse_watch: CollapseWatch,
                 writer: Optional[MetricsLogger], device: torch.device) -> None:
        self.schedules, self.collapse_watch, self.writer, self.device = schedules, collapse_watch, writer, device

    def record(self, step: int, losses: StepLosses, grad_norms: Sequence[torch.Tensor], skipped_steps: int,
               scaler_skipped: Sequence[bool], images_per_second: float, data_wait_share: float, loader) -> None:
        """The metrics of step `step` (1-based: the values belong to the step just taken)."""
        averaged = {f"loss/{name}": value for name, value in losses.terms.items()}
        for number, total in enumerate(losses.totals, start=1):
            averaged[f"loss/model{number}/total"] = total
        averaged.update({f"collapse/teacher_entropy/{name}": v for name, v in losses.teacher_entropy.items()})
        averaged.update({f"collapse/kl_teacher_student/{name}": v for name, v in losses.kl_teacher_student.items()})
        averaged.update(feature_monitors(losses, reduce=False))  # computed only for the logged steps
        with collective("metrics all-reduce"):
            scalars = {name: value.item() for name, value in all_reduce_mean(averaged).items()}
        scalars.update({step0_name(name): value for name, value in self.collapse_watch.baseline.items()})
        for number, (schedule, norm) in enumerate(zip(self.schedules, grad_norms), start=1):
            for name in SCHEDULES:
                scalars[f"schedule/model{number}/{name}"] = float(getattr(schedule, name)[step - 1])
            scalars[f"grad_norm/model{number}"] = float(norm)
        scalars["guard/skipped_steps"] = float(skipped_steps)
        for number, skipped in enumerate(scaler_skipped, start=1):
            scalars[f"guard/scaler_skipped/model{number}"] = float(skipped)  # this step, by the GradScaler
        scalars["perf/images_per_second"] = images_per_second
        scalars["perf/data_wait_share"] = data_wait_share
        scalars["perf/peak_memory_bytes"] = float(peak_memory_bytes(self.device))
        scalars.update(loader_statistics(loader))
        if self.writer is not None:
            self.writer.log(step, scalars)
            for line in self.collapse_watch.check(step, scalars):
                self.writer.write_line(line)
