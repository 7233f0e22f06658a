"""The MOKD objective for one step: both students and both teachers, the four loss families, six centres.

For model i (j is the other one), with h the MLP-Head, g the T-Head, ' the EMA teacher:

    L_sm,i = DINO(h_i(all crops), h'_i(globals); c_sm,i)       self, MLP-Head
    L_st,i = DINO(g_i(all crops), g'_i(globals); c_st,i)       self, T-Head
    L_cm,i = DINO(h_i(all crops), h'_j(globals); c_cm,i)       cross, MLP-Head
    L_ct,i = CE(g'_j([q_i ; Z'_j(x_t)]), g_i(crops))           cross, feature search (no centre)
    L_i    = L_sm,i + L_st,i + lambda_i * (L_cm,i + L_ct,i)  [+ w_koleo,i * KoLeo(z_i of each global crop)]

Each term may carry a per-model multiplier (modelN.term_weights; 1 unless set, 0 drops the term for that model).

With loss.centring=sinkhorn_knopp the targets of L_sm, L_st, L_cm are Sinkhorn-Knopp equipartitions of the
teacher logits over the global batch instead of softmax((t - c) / tau_t) (method/centring.py).

With loss.fused_terms, the terms that read one student tensor (L_sm and L_cm read h_i's logits, L_st and L_ct
g_i's) are computed together in one pass (kernels/fused_terms.py); with loss.fused_head, the students' forwards stop
before each head's last layer and that layer is fused with those terms (kernels/fused_head.py), so the student
logits never exist. Both give the same losses and gradients as the per-term path.

Every target and every query is computed without gradient, so L_1 depends only on student 1 and L_2
only on student 2: one backward of L_1 + L_2 trains both.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager, NamedTuple, Optional

import torch
from torch import nn

from mokd.config import LOSS_TERMS, MOKDConfig, component_check
from mokd.errors import ConfigError
from mokd.kernels import (DinoCrossEntropyOutput, DinoTarget, dino_cross_entropy, ema_, fused_head, fused_terms,
                          native)
from mokd.method.centring import ReduceSum, no_reduction, sinkhorn_knopp
from mokd.method.koleo import koleo_loss
from mokd.method.network import NetworkOutput, search_request, searched_rows

TERMS = LOSS_TERMS
CENTRED_TERMS = ("sm", "st", "cm")
# The terms that read each student tensor (h_i's logits, g_i's logits): what loss.fused_terms / fused_head group.
HEAD_TERMS = {"mlp": ("sm", "cm"), "thead": ("st", "ct")}


@component_check
def check_loss_kernel(config: MOKDConfig) -> None:
    """loss.kernel=native only where the native CPU kernels are built: refused with the build command before the
    run starts, not at its first loss."""
    if config.loss.kernel == "native":
        try:
            native.require("loss.kernel=native")
        except native.NativeKernelsUnavailable as error:
            raise ConfigError(str(error)) from None


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

    @torch.no_grad()
    def update(self, column_sums: torch.Tensor, rows: torch.Tensor, momentum: float) -> None:
        """c <- m c + (1 - m) mean_t for every centre whose term ran this step (rows > 0)."""
        for index in torch.nonzero(rows > 0).flatten().tolist():
            batch_mean = column_sums[index] / rows[index]
            ema_([self.values[index]], [batch_mean], momentum)


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
    centre_rows: torch.Tensor  # [6] teacher rows behind each sum (0: term did not run or was not centred)
    teacher_pooled: list[torch.Tensor]  # each teacher's pooled global-crop features (no grad): collapse monitors


class MOKDObjective:
    """Computes both models' losses for a batch of crops. Knows nothing of devices or distribution."""

    def __init__(self, loss_config, cross_weights: tuple[float, float],
                 koleo_weights: tuple[float, float] = (0.0, 0.0),
                 term_weights: tuple[dict[str, float], dict[str, float]] = ({}, {})) -> None:
        self.config = loss_config
        self.cross_weights = cross_weights
        self.term_weights = term_weights
        self.koleo_weights = koleo_weights
        # phase(name) wraps each part of the computation (student_forward, teacher_forward, search, losses).
        self.phase: Callable[[str], ContextManager] = untimed
        # Sums a tensor over ranks (Sinkhorn-Knopp's global-batch normalisation); the engine installs its own.
        self.reduce_sum: ReduceSum = no_reduction

    def weight(self, model: int, term: str) -> float:
        """The multiplier of `term` in this model's loss: its term weight, times lambda_i for the cross terms."""
        cross = self.cross_weights[model] if term in ("cm", "ct") else 1.0
        return cross * self.term_weights[model].get(term, 1.0)

    def active_terms(self, model: int) -> list[str]:
        switches = {"sm": self.config.self_mlp, "st": self.config.self_thead,
                    "cm": self.config.cross_mlp, "ct": self.config.cross_search}
        return [term for term in TERMS if switches[term] and self.weight(model, term) > 0]

    def _target(self, teacher: torch.Tensor, centre: Optional[torch.Tensor], teacher_temperature: float,
                batch_size: int, weight: float, pairing: str = "dino", rows: slice = slice(None)) -> DinoTarget:
        if centre is not None and self.config.centring == "sinkhorn_knopp":
            # The kernel takes logits: log p at temperature 1 gives back p exactly under its softmax.
            targets = sinkhorn_knopp(teacher, teacher_temperature, self.config.sinkhorn_iterations, self.reduce_sum)
            # (in the logits' own dtype, as every kernel expects: the same precision the centred path reads)
            teacher, centre, teacher_temperature = targets.clamp(min=1e-30).log().to(teacher.dtype), None, 1.0
        return DinoTarget(teacher, centre, teacher_temperature, batch_size, pairing, rows, weight)

    def __call__(self, students: tuple[Callable, Callable], teachers: tuple[Callable, Callable], centres: Centres,
                 crops: list[torch.Tensor], temperatures: tuple[Temperatures, Temperatures]) -> StepLosses:
        batch_size, n_crops = crops[0].shape[0], len(crops)
        with self.phase("student_forward"):
            # (with loss.fused_head the students stop before their heads' last layers: see network.HeadInput)
            student_outs = [student(crops, head_logits=not self.config.fused_head) for student in students]
        with self.phase("teacher_forward"), torch.no_grad():
            teacher_outs = [teacher(crops[:2]) for teacher in teachers]
        # L_ct,i: student i's queries search teacher j's global token maps through teacher j's T-Head.
        rows = searched_rows(self.config.search_pairing, batch_size, n_crops)
        search_logits: list[Optional[torch.Tensor]] = [None, None]
        with self.phase("search"), torch.no_grad():
            for i in (0, 1):
                if "ct" in self.active_terms(i):
                    request = search_request(teacher_outs[1 - i], student_outs[i].queries[rows],
                                             self.config.search_pairing, batch_size, n_crops)
                    search_logits[i] = teachers[1 - i](search=request)
        with self.phase("losses"):
            return self._losses(centres, teacher_outs, student_outs, search_logits, rows, temperatures, batch_size)

    def _losses(self, centres: Centres, teacher_outs: list[NetworkOutput], student_outs: list[NetworkOutput],
                search_logits: list[Optional[torch.Tensor]], rows: slice,
                temperatures: tuple[Temperatures, Temperatures], batch_size: int) -> StepLosses:
        totals, terms, entropy, kl = [], {}, {}, {}
        centre_sums = torch.zeros_like(centres.values)
        centre_rows = torch.zeros(centres.values.shape[0], device=centres.values.device)
        for i in (0, 1):
            j = 1 - i
            mine, own_teacher, other_teacher = student_outs[i], teacher_outs[i], teacher_outs[j]
            temps = temperatures[i]
            targets = {}
            for term in self.active_terms(i):
                weight = self.weight(i, term)
                if term in ("sm", "st"):
                    logits = own_teacher.mlp_logits if term == "sm" else own_teacher.thead_logits
                    targets[term] = self._target(logits, centres.get(i, term), temps.teacher_self,
                                                 batch_size, weight)
                elif term == "cm":
                    targets[term] = self._target(other_teacher.mlp_logits, centres.get(i, "cm"),
                                                 temps.teacher_cross, batch_size, weight)
                else:
                    targets[term] = DinoTarget(search_logits[i], None, temps.teacher_cross, batch_size,
                                               "one_to_one", rows, weight)
            # term -> (loss, teacher column sum, teacher entropy); `fused` holds the totals of fused groups.
            results: dict[str, DinoCrossEntropyOutput] = {}
            fused = []
            for head, names in HEAD_TERMS.items():
                names = [term for term in names if term in targets]
                if not names:
                    continue
                group = [targets[term] for term in names]
                logits = mine.mlp_logits if head == "mlp" else mine.thead_logits  # None with loss.fused_head
                if self.config.fused_head:
                    head_input = mine.mlp_input if head == "mlp" else mine.thead_input
                    out = fused_head(head_input.features, head_input.weight, temps.student, group,
                                     impl="auto" if self.config.kernel in ("auto", "triton") else "torch")
                elif self.config.fused_terms:
                    out = fused_terms(logits, temps.student, group, impl=self.config.kernel)
                else:
                    for term, t in zip(names, group):
                        results[term] = dino_cross_entropy(logits[t.rows], t.teacher, t.centre, temps.student,
                                                           t.temperature, t.batch_size, pairing=t.pairing,
                                                           impl=self.config.kernel)
                    continue
                fused.append(out.total)
                for n, term in enumerate(names):
                    results[term] = DinoCrossEntropyOutput(out.losses[n], out.teacher_column_sums[n],
                                                           out.teacher_entropies[n])
            total = torch.zeros((), device=centres.values.device)
            if self.koleo_weights[i] > 0:  # on each global crop's pooled student features, as DINOv2
                koleo = sum(koleo_loss(crop) for crop in mine.pooled[:2 * batch_size].split(batch_size)) / 2
                total = total + self.koleo_weights[i] * koleo
                terms[f"model{i + 1}/koleo"] = koleo.detach()
            for group_total in fused:
                total = total + group_total
            for term in (term for term in TERMS if term in results):
                result = results[term]
                if not fused:
                    total = total + self.weight(i, term) * result.loss
                name = f"model{i + 1}/{term}"
                terms[name] = result.loss.detach()
                entropy[name] = result.teacher_entropy
                # Each teacher view enters the same number of pairs, so mean CE - mean H(p) = mean KL(p || q).
                kl[name] = result.loss.detach() - result.teacher_entropy
                if term in CENTRED_TERMS and self.config.centring == "centre":
                    row = centres.row(i, term)
                    centre_sums[row] = result.teacher_column_sum
                    centre_rows[row] = 2 * batch_size
            totals.append(total)
        return StepLosses(totals, terms, entropy, kl, centre_sums, centre_rows, [out.pooled for out in teacher_outs])
