"""The MOKD objective for one step: every student and every teacher, the loss-term table, the centres.

For model i of N (j runs over the other models), with h the MLP-Head, g the T-Head, ' the EMA teacher:

    L_sm,i    = DINO(h_i(all crops), h'_i(globals); c_sm,i)        self, MLP-Head
    L_st,i    = DINO(g_i(all crops), g'_i(globals); c_st,i)        self, T-Head
    L_cm,i<-j = DINO(h_i(all crops), h'_j(globals); c_cm,i<-j)     cross, MLP-Head
    L_ct,i<-j = CE(g'_j([q_i ; Z'_j(x_t)]), g_i(crops))            cross, feature search (no centre)
    L_i       = L_sm,i + L_st,i + lambda_i / (N - 1) * sum_j (L_cm,i<-j + L_ct,i<-j)
                [+ w_koleo,i * KoLeo(z_i of each global crop)]

For N = 2 this is the paper's L_i = L_sm + L_st + lambda_i (L_cm + L_ct). Dividing by N - 1 keeps lambda_i the
weight of the cross signal against the self terms whatever N is (the mean over the other teachers, as in
multi-teacher distillation), so a lambda tuned on a pair keeps its meaning. Each term may carry a per-model
multiplier (modelN.term_weights; 1 unless set, 0 drops the term for that model). The terms are the rows of
config.LOSS_TERM_TABLE; this module computes a row's target (`_target_of`) and groups the terms by the student
tensor they read.

With loss.centring=sinkhorn_knopp the centred targets are Sinkhorn-Knopp equipartitions of the teacher logits
over the global batch instead of softmax((t - c) / tau_t) (method/centring.py).

With loss.fused_terms, the terms that read one student tensor (L_sm and every L_cm read h_i's logits, L_st and
every L_ct g_i's) are computed together in one pass (kernels/fused_terms.py); with loss.fused_head, the students'
forwards stop before each head's last layer and that layer is fused with those terms (kernels/fused_head.py), so
the student logits never exist. Both give the same losses and gradients as the per-term path.

Every target and every query is computed without gradient, so L_i depends only on student i: one backward of
sum_i L_i trains every student.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager, NamedTuple, Optional, Sequence

import torch
from torch import nn

from mokd.config import LOSS_TERM_TABLE, LossTerm, MOKDConfig, component_check
from mokd.errors import ConfigError
from mokd.kernels import (DinoCrossEntropyOutput, DinoTarget, dino_cross_entropy, ema_, fused_head, fused_terms,
                          native)
from mokd.method.centring import ReduceSum, no_reduction, sinkhorn_knopp
from mokd.method.koleo import koleo_loss
from mokd.method.network import NetworkOutput, search_request, searched_rows

HEADS = ("mlp", "thead")  # the student tensors the terms read: h_i's logits, g_i's logits


class TermInstance(NamedTuple):
    """One term of one model's loss: a row of the table and the model whose teacher gives its target."""

    term: LossTerm
    model: int  # 0-based, the student
    teacher: int  # 0-based, whose teacher: the model itself for a self term
    name: str  # its metric name under modelI/: sm, cm; cross terms of N > 2 models carry J: cm3

    @property
    def key(self) -> str:
        return f"model{self.model + 1}/{self.name}"


def term_instances(model: int, n_models: int, terms: Sequence[LossTerm] = LOSS_TERM_TABLE) -> list[TermInstance]:
    """The terms of model `model`'s loss in table order: each self term once, each cross term once per other
    model (in model order)."""
    instances = []
    for term in terms:
        if not term.cross:
            instances.append(TermInstance(term, model, model, term.name))
            continue
        for teacher in (j for j in range(n_models) if j != model):
            name = term.name if n_models == 2 else f"{term.name}{teacher + 1}"
            instances.append(TermInstance(term, model, teacher, name))
    return instances


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
    """The DINO centres, one per model, centred term and teacher (2 + (N - 1) per model: six for a pair), the rows
    of a single [R, K] buffer (so one all-reduce moves them all), in the order of `term_instances`."""

    def __init__(self, out_dim: int, n_models: int = 2) -> None:
        super().__init__()
        self.rows = {(item.model, item.name): index for index, item in enumerate(
            item for model in range(n_models) for item in term_instances(model, n_models) if item.term.centred)}
        self.register_buffer("values", torch.zeros(len(self.rows), out_dim))

    def row(self, model: int, name: str) -> int:
        """The row of model `model`'s (0-based) term `name` (a TermInstance name: sm, cm, cm3 ...)."""
        return self.rows[(model, name)]

    def get(self, model: int, name: str) -> torch.Tensor:
        return self.values[self.row(model, name)]

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
    totals: list[torch.Tensor]  # L_1 ... L_N (differentiable)
    terms: dict[str, torch.Tensor]  # "model1/sm" ... (detached)
    teacher_entropy: dict[str, torch.Tensor]  # collapse monitor per term
    kl_teacher_student: dict[str, torch.Tensor]  # collapse monitor per term
    centre_sums: torch.Tensor  # [R, K] column sums of the raw teacher logits, for the centre update
    centre_rows: torch.Tensor  # [R] teacher rows behind each sum (0: term did not run or was not centred)
    teacher_pooled: list[torch.Tensor]  # each teacher's pooled global-crop features (no grad): collapse monitors


class MOKDObjective:
    """Computes every model's loss for a batch of crops. Knows nothing of devices or distribution."""

    def __init__(self, loss_config, cross_weights: Sequence[float], koleo_weights: Optional[Sequence[float]] = None,
                 term_weights: Optional[Sequence[dict[str, float]]] = None) -> None:
        self.config = loss_config
        self.n_models = len(cross_weights)
        self.cross_weights = tuple(cross_weights)
        self.koleo_weights = tuple(koleo_weights or [0.0] * self.n_models)
        self.term_weights = tuple(term_weights or [{} for _ in range(self.n_models)])
        self.instances = [term_instances(model, self.n_models) for model in range(self.n_models)]
        # phase(name) wraps each part of the computation (student_forward, teacher_forward, search, losses).
        self.phase: Callable[[str], ContextManager] = untimed
        # Sums a tensor over ranks (Sinkhorn-Knopp's global-batch normalisation); the engine installs its own.
        self.reduce_sum: ReduceSum = no_reduction

    @classmethod
    def for_config(cls, config: MOKDConfig) -> "MOKDObjective":
        models = config.models
        return cls(config.loss, [model.cross_weight for model in models], [model.koleo_weight for model in models],
                   [dict(model.term_weights) for model in models])

    def weight(self, model: int, term: LossTerm) -> float:
        """The multiplier of `term` in this model's loss: its term weight, times lambda_i / (N - 1) for a cross
        term (one per other model)."""
        cross = self.cross_weights[model] / (self.n_models - 1) if term.cross else 1.0
        return cross * self.term_weights[model].get(term.name, 1.0)

    def active_terms(self, model: int) -> list[TermInstance]:
        return [item for item in self.instances[model]
                if getattr(self.config, item.term.switch) and self.weight(model, item.term) > 0]

    def _target(self, teacher: torch.Tensor, centre: Optional[torch.Tensor], teacher_temperature: float,
                batch_size: int, weight: float, pairing: str = "dino", rows: slice = slice(None)) -> DinoTarget:
        if centre is not None and self.config.centring == "sinkhorn_knopp":
            # The kernel takes logits: log p at temperature 1 gives back p exactly under its softmax.
            targets = sinkhorn_knopp(teacher, teacher_temperature, self.config.sinkhorn_iterations, self.reduce_sum)
            # (in the logits' own dtype, as every kernel expects: the same precision the centred path reads)
            teacher, centre, teacher_temperature = targets.clamp(min=1e-30).log().to(teacher.dtype), None, 1.0
        return DinoTarget(teacher, centre, teacher_temperature, batch_size, pairing, rows, weight)

    def _target_of(self, item: TermInstance, teacher_outs: list[NetworkOutput], search_logits: dict,
                   centres: Centres, temps: Temperatures, rows: slice, batch_size: int) -> DinoTarget:
        """The target of one term: its teacher's logits of the same head over the global crops, or the search."""
        weight = self.weight(item.model, item.term)
        temperature = temps.teacher_cross if item.term.cross else temps.teacher_self
        if item.term.target == "search":
            return DinoTarget(search_logits[item.key], None, temperature, batch_size, "one_to_one", rows, weight)
        teacher = teacher_outs[item.teacher]
        logits = teacher.mlp_logits if item.term.head == "mlp" else teacher.thead_logits
        return self._target(logits, centres.get(item.model, item.name), temperature, batch_size, weight)

    def __call__(self, students: Sequence[Callable], teachers: Sequence[Callable], centres: Centres,
                 crops: list[torch.Tensor], temperatures: Sequence[Temperatures]) -> StepLosses:
        batch_size, n_crops = crops[0].shape[0], len(crops)
        with self.phase("student_forward"):
            # (with loss.fused_head the students stop before their heads' last layers: see network.HeadInput)
            student_outs = [student(crops, head_logits=not self.config.fused_head) for student in students]
        with self.phase("teacher_forward"), torch.no_grad():
            teacher_outs = [teacher(crops[:2]) for teacher in teachers]
        # L_ct,i<-j: student i's queries search teacher j's global token maps through teacher j's T-Head.
        rows = searched_rows(self.config.search_pairing, batch_size, n_crops)
        search_logits = {}
        with self.phase("search"), torch.no_grad():
            for model in range(self.n_models):
                for item in self.active_terms(model):
                    if item.term.target == "search":
                        request = search_request(teacher_outs[item.teacher], student_outs[model].queries[rows],
                                                 self.config.search_pairing, batch_size, n_crops)
                        search_logits[item.key] = teachers[item.teacher](search=request)
        with self.phase("losses"):
            return self._losses(centres, teacher_outs, student_outs, search_logits, rows, temperatures, batch_size)

    def _losses(self, centres: Centres, teacher_outs: list[NetworkOutput], student_outs: list[NetworkOutput],
                search_logits: dict, rows: slice, temperatures: Sequence[Temperatures],
                batch_size: int) -> StepLosses:
        totals, terms, entropy, kl = [], {}, {}, {}
        centre_sums = torch.zeros_like(centres.values)
        centre_rows = torch.zeros(centres.values.shape[0], device=centres.values.device)
        for i in range(self.n_models):
            mine, temps = student_outs[i], temperatures[i]
            active = self.active_terms(i)
            targets = {item.name: self._target_of(item, teacher_outs, search_logits, centres, temps, rows,
                                                  batch_size) for item in active}
            results: dict[str, DinoCrossEntropyOutput] = {}
            fused = []  # the weighted totals of the fused groups
            for head in HEADS:
                names = [item.name for item in active if item.term.head == head]
                if not names:
                    continue
                group = [targets[name] for name in names]
                logits = mine.mlp_logits if head == "mlp" else mine.thead_logits  # None with loss.fused_head
                if self.config.fused_head:
                    head_input = mine.mlp_input if head == "mlp" else mine.thead_input
                    out = fused_head(head_input.features, head_input.weight, temps.student, group,
                                     impl="auto" if self.config.kernel in ("auto", "triton") else "torch")
                elif self.config.fused_terms:
                    out = fused_terms(logits, temps.student, group, impl=self.config.kernel)
                else:
                    for name, t in zip(names, group):
                        results[name] = dino_cross_entropy(logits[t.rows], t.teacher, t.centre, temps.student,
                                                           t.temperature, t.batch_size, pairing=t.pairing,
                                                           impl=self.config.kernel)
                    continue
                fused.append(out.total)
                for n, name in enumerate(names):
                    results[name] = DinoCrossEntropyOutput(out.losses[n], out.teacher_column_sums[n],
                                                           out.teacher_entropies[n])
            total = torch.zeros((), device=centres.values.device)
            if self.koleo_weights[i] > 0:  # on each global crop's pooled student features, as DINOv2
                koleo = sum(koleo_loss(crop) for crop in mine.pooled[:2 * batch_size].split(batch_size)) / 2
                total = total + self.koleo_weights[i] * koleo
                terms[f"model{i + 1}/koleo"] = koleo.detach()
            for group_total in fused:
                total = total + group_total
            for item in active:  # in table order
                result = results[item.name]
                if not fused:
                    total = total + self.weight(i, item.term) * result.loss
                terms[item.key] = result.loss.detach()
                entropy[item.key] = result.teacher_entropy
                # Each teacher view enters the same number of pairs, so mean CE - mean H(p) = mean KL(p || q).
                kl[item.key] = result.loss.detach() - result.teacher_entropy
                if item.term.centred and self.config.centring == "centre":
                    row = centres.row(i, item.name)
                    centre_sums[row] = result.teacher_column_sum
                    centre_rows[row] = 2 * batch_size
            totals.append(total)
        return StepLosses(totals, terms, entropy, kl, centre_sums, centre_rows, [out.pooled for out in teacher_outs])
