"""The four loss families against a literal float64 re-implementation of the paper's equations."""

from __future__ import annotations

import pytest
import torch

from helpers import TINY_RESNET, TINY_VIT, tiny_config
from mokd.method.mokd import Centres, MOKDObjective, Temperatures
from mokd.method.pair import build_pair

TEMPS = (Temperatures(student=0.1, teacher_self=0.05, teacher_cross=0.06),
         Temperatures(student=0.12, teacher_self=0.04, teacher_cross=0.07))


def reference_dino(student_crops, teacher_views, centre, tau_s, tau_t):
    """Eq. (2)/(3)/(5): mean over pairs u != v of the batch mean of -sum_k p_v log q_u."""
    total, pairs = 0.0, 0
    for v, teacher in enumerate(teacher_views):
        shifted = teacher - (centre if centre is not None else 0.0)
        p = torch.exp(shifted / tau_t) / torch.exp(shifted / tau_t).sum(dim=-1, keepdim=True)
        for u, student in enumerate(student_crops):
            if u == v:
                continue
            log_q = student / tau_s - torch.logsumexp(student / tau_s, dim=-1, keepdim=True)
            total = total + (-(p * log_q).sum(dim=-1)).mean()
            pairs += 1
    return total / pairs


def crop_outputs(network, crops):
    """Per crop: pooled z, tokens Z, grid; backbone run per resolution group (BatchNorm sees the group)."""
    batch = crops[0].shape[0]
    groups = [(network.backbone(torch.cat(crops[:2])), 2)]
    if len(crops) > 2:
        groups.append((network.backbone(torch.cat(crops[2:])), len(crops) - 2))
    per_crop = []
    for out, count in groups:
        for index in range(count):
            rows = slice(index * batch, (index + 1) * batch)
            per_crop.append((out.pooled[rows], out.tokens[rows], out.grid))
    return per_crop


def reference_losses(config, students, teachers, centres, crops, pairing):
    """Eq. (9) per model, each term from its equation, image by image for the feature search."""
    batch = crops[0].shape[0]
    with torch.no_grad():
        teacher_crops = [crop_outputs(teacher, crops[:2]) for teacher in teachers]
    student_crops = [crop_outputs(student, crops) for student in students]
    totals, terms = [], {}
    for i in (0, 1):
        j, temps = 1 - i, TEMPS[i]
        h_student = [students[i].mlp_head(pooled) for pooled, _, _ in student_crops[i]]
        g_student = [students[i].thead(tokens, grid) for _, tokens, grid in student_crops[i]]
        with torch.no_grad():
            h_own = [teachers[i].mlp_head(pooled) for pooled, _, _ in teacher_crops[i]]
            g_own = [teachers[i].thead(tokens, grid) for _, tokens, grid in teacher_crops[i]]
            h_other = [teachers[j].mlp_head(pooled) for pooled, _, _ in teacher_crops[j]]
        terms["sm"] = reference_dino(h_student, h_own, centres.get(i, "sm"), temps.student, temps.teacher_self)
        terms["st"] = reference_dino(g_student, g_own, centres.get(i, "st"), temps.student, temps.teacher_self)
        terms["cm"] = reference_dino(h_student, h_other, centres.get(i, "cm"), temps.student, temps.teacher_cross)
        # Eq. (6)-(7): query z_i (projected, detached) prepended to teacher j's tokens of the target view.
        searched = range(2, len(crops)) if pairing == "local_to_global" else range(2)
        ce, count = 0.0, 0
        for crop in searched:
            target_view = 0 if pairing == "local_to_global" else 1 - crop
            for b in range(batch):
                pooled_i = student_crops[i][crop][0][b:b + 1]
                with torch.no_grad():
                    query = students[i].thead.project_query(pooled_i)
                    _, tokens_j, grid_j = teacher_crops[j][target_view]
                    target = teachers[j].thead(tokens_j[b:b + 1], grid_j, query=query)
                p = torch.softmax(target / temps.teacher_cross, dim=-1)
                log_q = torch.log_softmax(g_student[crop][b:b + 1] / temps.student, dim=-1)
                ce = ce + (-(p * log_q).sum())
                count += 1
        terms["ct"] = ce / count
        weight = (config.model1, config.model2)[i].cross_weight
        totals.append(terms["sm"] + terms["st"] + weight * (terms["cm"] + terms["ct"]))
        terms.update({f"model{i + 1}/{name}": terms.pop(name) for name in ("sm", "st", "cm", "ct")})
    return totals, terms


@pytest.mark.parametrize("kernel", ["torch", "reference"])
@pytest.mark.parametrize("pairing", ["local_to_global", "global_to_global"])
def test_losses_and_gradients_match_the_equations(tmp_path, kernel, pairing):
    torch.manual_seed(0)
    config = tiny_config(tmp_path, extra=[f"loss.kernel={kernel}", f"loss.search_pairing={pairing}",
                                          "model1.cross_weight=0.3", "model2.cross_weight=0.7"])
    students, teachers = build_pair(config, in_chans=1)
    students = tuple(s.double() for s in students)
    teachers = tuple(t.double() for t in teachers)
    # Teachers that differ from their students, as after some EMA steps.
    with torch.no_grad():
        for teacher in teachers:
            for parameter in teacher.parameters():
                parameter.add_(0.05 * torch.randn_like(parameter))
    centres = Centres(config.head.out_dim).double()
    centres.values.normal_()
    crops = [torch.randn(3, 1, 16, 16, dtype=torch.float64) for _ in range(2)] + \
            [torch.randn(3, 1, 8, 8, dtype=torch.float64) for _ in range(2)]
    objective = MOKDObjective(config.loss, (0.3, 0.7))

    losses = objective(students, teachers, centres, crops, TEMPS)
    engine_grads = []
    for i in (0, 1):
        params = [p for p in students[i].parameters() if p.requires_grad]
        engine_grads.append(torch.autograd.grad(losses.totals[i], params, allow_unused=True))

    reference_totals, reference_terms = reference_losses(config, students, teachers, centres, crops, pairing)
    for name, value in reference_terms.items():
        torch.testing.assert_close(losses.terms[name].double(), value.detach(), rtol=1e-7, atol=1e-9, msg=name)
    for i in (0, 1):
        torch.testing.assert_close(losses.totals[i].double(), reference_totals[i], rtol=1e-7, atol=1e-9)
        params = [p for p in students[i].parameters() if p.requires_grad]
        reference_grads = torch.autograd.grad(reference_totals[i], params, allow_unused=True)
        for engine, reference in zip(engine_grads[i], reference_grads):
            if reference is None:
                assert engine is None or torch.count_nonzero(engine) == 0
                continue
            torch.testing.assert_close(engine, reference, rtol=1e-6, atol=1e-10)


def test_each_model_loss_depends_only_on_its_own_student(tmp_path):
    torch.manual_seed(1)
    config = tiny_config(tmp_path)
    students, teachers = build_pair(config, in_chans=1)
    centres = Centres(config.head.out_dim)
    crops = [torch.randn(4, 1, 16, 16) for _ in range(2)] + [torch.randn(4, 1, 8, 8) for _ in range(2)]
    losses = MOKDObjective(config.loss, (1.0, 1.0))(students, teachers, centres, crops, TEMPS)
    for i in (0, 1):
        other = [p for p in students[1 - i].parameters() if p.requires_grad]
        grads = torch.autograd.grad(losses.totals[i], other, allow_unused=True, retain_graph=True)
        assert all(g is None for g in grads), f"L_{i + 1} reaches student {2 - i}"


@pytest.mark.parametrize("switches,expected", [
    ({"self_mlp": True, "self_thead": False, "cross_mlp": False, "cross_search": False}, {"sm"}),
    ({"self_mlp": True, "self_thead": False, "cross_mlp": True, "cross_search": False}, {"sm", "cm"}),
    ({"self_mlp": True, "self_thead": True, "cross_mlp": True, "cross_search": False}, {"sm", "st", "cm"}),
    ({"self_mlp": True, "self_thead": True, "cross_mlp": True, "cross_search": True}, {"sm", "st", "cm", "ct"}),
])
def test_loss_switches_select_the_ablation_terms(tmp_path, switches, expected):
    torch.manual_seed(2)
    config = tiny_config(tmp_path, extra=[f"loss.{key}={str(value).lower()}" for key, value in switches.items()])
    students, teachers = build_pair(config, in_chans=1)
    assert (students[0].thead is not None) == (switches["self_thead"] or switches["cross_search"])
    crops = [torch.randn(2, 1, 16, 16) for _ in range(2)] + [torch.randn(2, 1, 8, 8) for _ in range(2)]
    losses = MOKDObjective(config.loss, (1.0, 1.0))(students, teachers, Centres(64), crops, TEMPS)
    assert {name.split("/")[1] for name in losses.terms} == expected


def test_zero_cross_weight_turns_off_that_models_cross_terms(tmp_path):
    config = tiny_config(tmp_path)
    objective = MOKDObjective(config.loss, (0.0, 1.0))
    assert objective.active_terms(0) == ["sm", "st"]
    assert objective.active_terms(1) == ["sm", "st", "cm", "ct"]


def test_pairs_of_every_kind_build(tmp_path):
    for model1, model2 in ((TINY_RESNET, TINY_VIT), (TINY_RESNET, TINY_RESNET), (TINY_VIT, TINY_VIT)):
        students, _ = build_pair(tiny_config(tmp_path, model1, model2), in_chans=1)
        assert students[0].thead.pos_embed.shape[-1] == students[1].thead.pos_embed.shape[-1] == 32
