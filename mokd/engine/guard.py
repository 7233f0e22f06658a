"""The non-finite guard: a step whose loss terms or gradient norms are not all finite (on any rank) changes
nothing, and a run that keeps producing such steps stops with an error that names the step, the model and the
term, while its checkpoints still hold the last finite weights.

`StepJudge` gathers one flag per loss term and per gradient norm into a vector that all ranks reduce together,
with the stop-request flag, so a step has one such all-reduce: every rank then agrees whether the step changes
anything and whether (and on which signal) the run stops at this step boundary.
"""

from __future__ import annotations

import sys
from typing import Iterable, Optional

import torch

from mokd.engine.distributed import all_gather_objects, any_rank, collective
from mokd.errors import NonFiniteError
from mokd.signals import StopRequest


def non_finite_flags(values: Iterable[torch.Tensor]) -> torch.Tensor:
    """1.0 for every value that is inf or NaN, else 0.0 (one small tensor, for the all-reduce)."""
    stacked = torch.stack([value.detach().float().reshape(()) for value in values])
    return (~torch.isfinite(stacked)).float()


class StepGuard:
    def __init__(self, max_consecutive: int, report: bool = True) -> None:
        self.max_consecutive = max_consecutive
        self.report = report  # rank 0 prints each skip
        self.skipped_steps = 0
        self.consecutive = 0

    def judge(self, step: int, names: list[str], agreed_flags: torch.Tensor) -> Optional[str]:
        """The non-finite quantities of step `step` (1-based) as a message, or None for a finite step.
        Raises NonFiniteError once max_consecutive steps in a row were non-finite."""
        bad = [name for name, flag in zip(names, agreed_flags.tolist()) if flag > 0]
        if not bad:
            self.consecutive = 0
            return None
        self.skipped_steps += 1
        self.consecutive += 1
        reason = ", ".join(bad)
        if self.consecutive >= self.max_consecutive:
            model, term = bad[0].split("/")
            what = "the gradient norm" if term == "grad_norm" else f"loss term {term}"
            raise NonFiniteError(
                f"step {step}: {model}: {what} is not finite (non-finite: {reason}) for {self.consecutive} "
                f"consecutive steps (train.max_skipped_steps={self.max_consecutive}); each was skipped, so the "
                f"weights and the checkpoints are those of the last finite step. Lower {model}.optim.base_lr or "
                f"{model}.optim.clip_grad and resume with checkpoint.allow_config_change=true")
        if self.report:
            print(f"mokd: warning: step {step} skipped on every rank: non-finite {reason} "
                  f"({self.consecutive} in a row)", file=sys.stderr, flush=True)
        return reason


def non_finite_module(modules: dict[str, list[torch.Tensor]]) -> Optional[str]:
    """The name of the first module whose (local) tensors hold an inf or NaN, or None."""
    for name, tensors in modules.items():
        if any(not torch.isfinite(tensor).all() for tensor in tensors):
            return name
    return None


class StepJudge:
    """The verdict on a step, the same on every rank: skip it (a non-finite value on some rank) or not, and stop
    after it (a stop signal on some rank: `stop_agreed` names the signal) or not."""

    def __init__(self, max_consecutive: int, device: torch.device, report: bool = True) -> None:
        self.guard = StepGuard(max_consecutive, report)
        self.stop = StopRequest()
        self.stop_agreed: Optional[str] = None  # the stop signal every rank has seen, at a step boundary
        self.device = device

    def skip(self, step: int, values: dict[str, torch.Tensor]) -> bool:
        """Collective: True when step `step` (1-based) must change nothing, judged on `values` (loss terms and
        gradient norms by name) of every rank; records an agreed stop request on the way."""
        flags = torch.cat([non_finite_flags(values.values()).to(self.device),
                           torch.tensor([float(self.stop.requested)], device=self.device)])
        with collective("step-boundary flags all-reduce"):
            agreed = any_rank(flags).cpu()
        if agreed[-1] > 0 and self.stop_agreed is None:
            self.stop_agreed = next(name for name in all_gather_objects(self.stop.signal_name) if name)
        return self.guard.judge(step, list(values), agreed[:-1]) is not None
