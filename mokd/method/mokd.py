"""The MOKD objective for one step: both students and both teachers, the four loss families, six centres.

For model i (j is the other one), with h the MLP-Head, g the T-Head, ' the EMA teacher:

    L_sm,i = DINO(h_i(all crops), h'_i(globals); c_sm,i)       self, MLP-Head
    L_st,i = DINO(g_i(all crops), g'_i(globals); c_st,i)       self, T-Head
    L_cm,i = DINO(h_i(all crops), h'_j(globals); c_cm,i)       cross, MLP-Head
    L_ct,i = CE(g'_j([q_i ; Z'_j(x_t)]), g_i(crops))           cross, feature search (no centre)
    L_i    = L_sm,i + L_st,i + lambda_i * (L_cm,i + L_ct,i)

Every target and every query is computed without gradient, so L_1 depends only on student 1 and L_2
only on student 2: one backward of L_1 + L_2 trains both.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager, NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import nn

from mokd.kernels import DinoCrossEntropyOutput, dino_cross_entropy, ema_
from mokd.method.network import Network, NetworkOutput

TERMS = ("sm", "st", "cm", "ct")
CENTRED_TERMS = ("sm", "st", "cm")


@dataclass(frozen=True)
class Temperatures:
    """One model's temperatures at the current step."""

    student: float
    teacher_self: float  # L_sm, L_st
    teacher_cross: float  # L_cm, L_ct


class Centres(nn.Module):
    """The six DINO centres, one row each of a single [6, K] buffer (so one all-reduce moves them all)."""

    def __init__(self, out_dim: int) -> None:
        super().__init__()
        self.register_buffer("values", torch.zeros(2 * len(CENTRED_TERMS), out_dim))

    @staticmethod
    def row(model: int, term: str) -> int:
        return model * len(CENTRED_TERMS) + CENTRED_TERMS.index(term)

    def get(self, model: int, term: str) -> torch.Tensor:
        return self.values[self.row(model, term)]

    @staticmethod
    def start_all_reduce(column_sums: torch.Tensor, rows: torch.Tensor, async_op: bool) -> "PendingReduce":
        """Sum this step's [6, K] teacher column sums over ranks, in place, as one flat buffer; rows scale by the
        world size (every rank has the same batch). Without a process group it is a no-op. With async_op the
        caller overlaps it with other work (backward, optimiser, EMA) and waits before `update`."""
        if not (dist.is_available() and dist.is_initialized()):
            return PendingReduce(None)
        rows.mul_(dist.get_world_size())
        return PendingReduce(dist.all_reduce(column_sums, async_op=async_op))

    @torch.no_grad()
    def update(self, column_sums: torch.Tensor, rows: torch.Tensor, momentum: float) -> None:
        """c <- m c + (1 - m) mean_t for every centre whose term ran this step (rows > 0)."""
        for index in torch.nonzero(rows > 0).flatten().tolist():
            batch_mean = column_sums[index] / rows[index]
            ema_([self.values[index]], [batch_mean], momentum)


class PendingReduce(NamedTuple):
    work: Optional[dist.Work]  # None: nothing in flight (finished, or single process)

    def wait(self) -> None:
        if self.work is not None:
            self.work.wait()


_UNTIMED = contextlib.nullcontext()


def untimed(phase: str) -> ContextManager:
    """The default phase hook: times nothing (a profiler installs its own, see mokd/engine/throughput.py)."""
    return _UNTIMED


class StepLosses(NamedTuple):
    totals: list[torch.Tensor]  # L_1, L_2 (differentiable)
    terms: dict[str, torch.Tensor]  # "model1/sm" ... (detached)
    teacher_entropy: dict[str, torch.Tensor]  # collapse monitor per term
    kl_teacher_student: dict[str, torch.Tensor]  # collapse monitor per term
    centre_sums: torch.Tensor  # [6, K] column sums of the raw teacher logits, for the centre update
    centre_rows: torch.Tensor  # [6] teacher rows behind each sum (0: term did not run)


class MOKDObjective:
    """Computes both models' losses for a batch of crops. Knows nothing of devices or distribution."""

    def __init__(self, loss_config, cross_weights: tuple[float, float]) -> None:
        self.config = loss_config
        self.cross_weights = cross_weights
        # phase(name) wraps each part of the computation (teacher_forward, student_forward, search, losses).
        self.phase: Callable[[str], ContextManager] = untimed

    def uses_thead(self) -> bool:
        return self.config.self_thead or self.config.cross_search

    def active_terms(self, model: int) -> list[str]:
        cross = self.cross_weights[model] > 0
        switches = {"sm": self.config.self_mlp, "st": self.config.self_thead,
                    "cm": self.config.cross_mlp and cross, "ct": self.config.cross_search and cross}
        return [term for term in TERMS if switches[term]]

    def _dino(self, student: torch.Tensor, teacher: torch.Tensor, centre: Optional[torch.Tensor],
              temperatures: Temperatures, teacher_temperature: float, batch_size: int,
              pairing: str = "dino") -> DinoCrossEntropyOutput:
        return dino_cross_entropy(student, teacher, centre, temperatures.student, teacher_temperature,
                                  batch_size, pairing=pairing, impl=self.config.kernel)

    @torch.no_grad()
    def search_targets(self, student: Network, student_out: NetworkOutput, teacher: Network,
                       teacher_out: NetworkOutput, batch_size: int, n_crops: int) -> tuple[torch.Tensor, slice]:
        """t_hat = g'_j([q_i ; Z'_j(x_t)]) for every student crop that is searched, and those crops' rows.

        local_to_global: each local crop of student i queries teacher j's first global view.
        global_to_global: student global a queries teacher j's global b != a.
        """
        # The teacher saw the two global crops: one backbone pass for both, or one each (perf.grouped_crops=false);
        # either way features[0] starts with the first global view and the rows are crop-major.
        first, grid = teacher_out.features[0].tokens[:batch_size], teacher_out.features[0].grid
        if self.config.search_pairing == "local_to_global":
            rows = slice(2 * batch_size, n_crops * batch_size)
            target_tokens = first.repeat(n_crops - 2, 1, 1)
        else:
            rows = slice(0, 2 * batch_size)
            tokens = torch.cat([feature.tokens for feature in teacher_out.features])
            target_tokens = torch.cat([tokens[batch_size:2 * batch_size], first])
        # Detached before the projection (same value): a no-grad view of a tensor that requires grad has no
        # grad_fn, which module hooks such as FlopCounterMode's tracker cannot handle.
        query = student.thead.project_query(student_out.pooled[rows].detach())
        return teacher.thead(target_tokens, grid, query=query), rows

    def __call__(self, students: tuple[Network, Network], teachers: tuple[Network, Network], centres: Centres,
                 crops: list[torch.Tensor], temperatures: tuple[Temperatures, Temperatures]) -> StepLosses:
        batch_size, n_crops = crops[0].shape[0], len(crops)
        with self.phase("teacher_forward"), torch.no_grad():
            teacher_outs = [teacher(crops[:2]) for teacher in teachers]
        with self.phase("student_forward"):
            student_outs = [student(crops) for student in students]
        with self.phase("losses"):
            return self._losses(students, teachers, centres, teacher_outs, student_outs, temperatures,
                                batch_size, n_crops)

    def _losses(self, students: tuple[Network, Network], teachers: tuple[Network, Network], centres: Centres,
                teacher_outs: list[NetworkOutput], student_outs: list[NetworkOutput],
                temperatures: tuple[Temperatures, Temperatures], batch_size: int, n_crops: int) -> StepLosses:
        totals, terms, entropy, kl = [], {}, {}, {}
        centre_sums = torch.zeros_like(centres.values)
        centre_rows = torch.zeros(centres.values.shape[0], device=centres.values.device)
        for i in (0, 1):
            j = 1 - i
            mine, own_teacher, other_teacher = student_outs[i], teacher_outs[i], teacher_outs[j]
            temps = temperatures[i]
            results: dict[str, DinoCrossEntropyOutput] = {}
            for term in self.active_terms(i):
                if term == "sm":
                    results[term] = self._dino(mine.mlp_logits, own_teacher.mlp_logits, centres.get(i, "sm"),
                                               temps, temps.teacher_self, batch_size)
                elif term == "st":
                    results[term] = self._dino(mine.thead_logits, own_teacher.thead_logits, centres.get(i, "st"),
                                               temps, temps.teacher_self, batch_size)
                elif term == "cm":
                    results[term] = self._dino(mine.mlp_logits, other_teacher.mlp_logits, centres.get(i, "cm"),
                                               temps, temps.teacher_cross, batch_size)
                else:
                    with self.phase("search"):
                        targets, rows = self.search_targets(students[i], mine, teachers[j], other_teacher,
                                                            batch_size, n_crops)
                    results[term] = self._dino(mine.thead_logits[rows], targets, None, temps, temps.teacher_cross,
                                               batch_size, pairing="one_to_one")
            total = torch.zeros((), device=centres.values.device)
            for term, result in results.items():
                weight = self.cross_weights[i] if term in ("cm", "ct") else 1.0
                total = total + weight * result.loss
                name = f"model{i + 1}/{term}"
                terms[name] = result.loss.detach()
                entropy[name] = result.teacher_entropy
                # Each teacher view enters the same number of pairs, so mean CE - mean H(p) = mean KL(p || q).
                kl[name] = result.loss.detach() - result.teacher_entropy
                if term in CENTRED_TERMS:
                    row = centres.row(i, term)
                    centre_sums[row] = result.teacher_column_sum
                    centre_rows[row] = 2 * batch_size
            totals.append(total)
        return StepLosses(totals, terms, entropy, kl, centre_sums, centre_rows)
