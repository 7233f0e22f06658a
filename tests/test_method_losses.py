"""The four loss families against a literal float64 re-implementation of the paper's equations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import TINY_RESNET, TINY_VIT, tiny_config
from mokd.method.mokd import Centres, MOKDObjective, Temperatures
from mokd.method.models import build_models

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


# The heads written out from DINO's and the paper's definitions with plain tensor operations; only the parameter
# values are read from the engine's modules, never their forward passes.

def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def layer_norm(x, norm):
    centred = x - x.mean(dim=-1, keepdim=True)
    return centred / torch.sqrt((centred ** 2).mean(dim=-1, keepdim=True) + 1e-6) * norm.weight + norm.bias


def linear(x, layer):
    return x @ layer.weight.T + layer.bias


def weight_norm_linear(x, layer):
    """W = g v / ||v|| row by row, no bias."""
    return x @ (layer.weight_g * layer.weight_v / layer.weight_v.norm(dim=1, keepdim=True)).T


def mlp_head(head, pooled):
    """Linear-GELU-Linear-GELU-Linear (BatchNorm in train mode after each hidden Linear when the head has it: batch
    statistics over every row, biased variance, eps 1e-5), L2-normalise, weight-normalised Linear."""
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    norms = [m for m in head.mlp if isinstance(m, nn.BatchNorm1d)]
    x = pooled
    for index, layer in enumerate(linears[:-1]):
        x = linear(x, layer)
        if norms:
            mean, variance = x.mean(dim=0), x.var(dim=0, unbiased=False)
            x = (x - mean) / torch.sqrt(variance + 1e-5) * norms[index].weight + norms[index].bias
        x = gelu(x)
    x = linear(x, linears[-1])
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return weight_norm_linear(x, head.last_layer)


def project(thead, x):
    """P: a Linear from the backbone's channels to D, or nothing where they are already D wide."""
    return linear(x, thead.proj) if isinstance(thead.proj, nn.Linear) else x


def positional_embedding(thead, grid):
    """The learned embedding on the global crops' grid, resized bicubically to another crop's token grid."""
    base_side = round(math.sqrt(thead.pos_embed.shape[1]))
    embedding = thead.pos_embed.reshape(1, base_side, base_side, -1)
    if tuple(grid) != (base_side, base_side):
        embedding = F.interpolate(embedding.permute(0, 3, 1, 2), size=tuple(grid), mode="bicubic",
                                  align_corners=False).permute(0, 2, 3, 1)
    return embedding.reshape(1, grid[0] * grid[1], -1)


def attention(block, x, heads):
    """Multi-head softmax(Q K^T / sqrt(d)) V; the qkv weight rows hold Q, K, V in that order, heads contiguous."""
    batch, length, width = x.shape
    d = width // heads
    q, k, v = (part.reshape(batch, length, heads, d).transpose(1, 2) for part in linear(x, block.qkv).split(width, -1))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    return linear((weights @ v).transpose(1, 2).reshape(batch, length, width), block.proj)


def thead(head, tokens, grid, heads, query=None):
    """P(Z) + positional embedding, [query ;] pre-norm blocks (x + Attn(LN x), x + MLP(LN x), MLP ratio 4 with
    GELU), LayerNorm, the query's own output dropped, mean over tokens, weight-normalised Linear."""
    x = project(head, tokens) + positional_embedding(head, grid)
    if query is not None:
        x = torch.cat([query[:, None, :], x], dim=1)
    for block in head.blocks:
        x = x + attention(block.attn, layer_norm(x, block.norm1), heads)
        hidden = layer_norm(x, block.norm2)
        first, second = block.mlp[0], block.mlp[2]
        assert first.weight.shape[0] == 4 * x.shape[-1]
        x = x + linear(gelu(linear(hidden, first)), second)
    x = layer_norm(x, head.norm)
    if query is not None:
        x = x[:, 1:]
    return weight_norm_linear(x.mean(dim=1), head.last_layer)


def reference_losses(config, students, teachers, centres, crops, pairing, temps=TEMPS):
    """Eq. (9) per model, each term from its equation, image by image for the feature search; with N models,
    model i's cross terms once per other model j, weighed lambda_i / (N - 1)."""
    batch, heads, n_models = crops[0].shape[0], config.head.thead_heads, len(students)
    with torch.no_grad():
        teacher_crops = [crop_outputs(teacher, crops[:2]) for teacher in teachers]
    student_crops = [crop_outputs(student, crops) for student in students]

    def mlp_logits(network, outputs):  # the MLP-Head sees every crop at once (its BatchNorm: all of them)
        return mlp_head(network.mlp_head, torch.cat([pooled for pooled, _, _ in outputs])).split(batch)

    def search_term(i, j, g_student):
        """Eq. (6)-(7): query z_i (projected, detached) prepended to teacher j's tokens of the target view."""
        searched = range(2, len(crops)) if pairing == "local_to_global" else range(2)
        ce, count = 0.0, 0
        for crop in searched:
            target_view = 0 if pairing == "local_to_global" else 1 - crop
            for b in range(batch):
                pooled_i = student_crops[i][crop][0][b:b + 1].detach()
                with torch.no_grad():
                    query = project(students[i].thead, pooled_i)
                    _, tokens_j, grid_j = teacher_crops[j][target_view]
                    target = thead(teachers[j].thead, tokens_j[b:b + 1], grid_j, heads, query=query)
                p = torch.softmax(target / temps[i].teacher_cross, dim=-1)
                log_q = torch.log_softmax(g_student[crop][b:b + 1] / temps[i].student, dim=-1)
                ce = ce + (-(p * log_q).sum())
                count += 1
        return ce / count

    totals, terms = [], {}
    for i in range(n_models):
        t = temps[i]
        h_student = mlp_logits(students[i], student_crops[i])
        g_student = [thead(students[i].thead, tokens, grid, heads) for _, tokens, grid in student_crops[i]]
        with torch.no_grad():
            h_own = mlp_logits(teachers[i], teacher_crops[i])
            g_own = [thead(teachers[i].thead, tokens, grid, heads) for _, tokens, grid in teacher_crops[i]]
        mine = {"sm": reference_dino(h_student, h_own, centres.get(i, "sm"), t.student, t.teacher_self),
                "st": reference_dino(g_student, g_own, centres.get(i, "st"), t.student, t.teacher_self)}
        cross = 0.0
        for j in (j for j in range(n_models) if j != i):
            suffix = "" if n_models == 2 else str(j + 1)
            with torch.no_grad():
                h_other = mlp_logits(teachers[j], teacher_crops[j])
            mine[f"cm{suffix}"] = reference_dino(h_student, h_other, centres.get(i, f"cm{suffix}"), t.student,
                                                 t.teacher_cross)
            mine[f"ct{suffix}"] = search_term(i, j, g_student)
            cross = cross + mine[f"cm{suffix}"] + mine[f"ct{suffix}"]
        weight = config.models[i].cross_weight / (n_models - 1)
        totals.append(mine["sm"] + mine["st"] + weight * cross)
        terms.update({f"model{i + 1}/{name}": value for name, value in mine.items()})
    return totals, terms


def assert_matches_reference(config, objective, students, teachers, centres, crops, pairing, temps=TEMPS):
    """Every term, every total and every student's gradient of the engine's objective against reference_losses."""
    losses = objective(students, teachers, centres, crops, temps)
    engine_grads = []
    for i in range(len(students)):
        params = [p for p in students[i].parameters() if p.requires_grad]
        engine_grads.append(torch.autograd.grad(losses.totals[i], params, allow_unused=True))

    reference_totals, reference_terms = reference_losses(config, students, teachers, centres, crops, pairing, temps)
    assert set(losses.terms) == set(reference_terms)
    for name, value in reference_terms.items():
        torch.testing.assert_close(losses.terms[name].double(), value.detach(), rtol=1e-7, atol=1e-9, msg=name)
    for i in range(len(students)):
        torch.testing.assert_close(losses.totals[i].double(), reference_totals[i], rtol=1e-7, atol=1e-9)
        params = [p for p in students[i].parameters() if p.requires_grad]
        reference_grads = torch.autograd.grad(reference_totals[i], params, allow_unused=True)
        for engine, reference in zip(engine_grads[i], reference_grads):
            if reference is None:
                assert engine is None or torch.count_nonzero(engine) == 0
                continue
            torch.testing.assert_close(engine, reference, rtol=1e-6, atol=1e-10)


def perturbed_float64_models(config):
    """Students and teachers in float64, the teachers moved off their students as after some EMA steps."""
    students, teachers = build_models(config, in_chans=1)
    students = tuple(s.double() for s in students)
    teachers = tuple(t.double() for t in teachers)
    with torch.no_grad():
        for teacher in teachers:
            for parameter in teacher.parameters():
                parameter.add_(0.05 * torch.randn_like(parameter))
    return students, teachers


def random_crops(batch: int = 3):
    return [torch.randn(batch, 1, 16, 16, dtype=torch.float64) for _ in range(2)] + \
           [torch.randn(batch, 1, 8, 8, dtype=torch.float64) for _ in range(2)]


@pytest.mark.parametrize("kernel,pairing,batchnorm", [
    ("torch", "local_to_global", False), ("reference", "local_to_global", False),
    ("torch", "global_to_global", False), ("reference", "global_to_global", False),
    ("torch", "local_to_global", True),
])
def test_losses_and_gradients_match_the_equations(tmp_path, kernel, pairing, batchnorm):
    torch.manual_seed(0)
    config = tiny_config(tmp_path, extra=[f"loss.kernel={kernel}", f"loss.search_pairing={pairing}",
                                          f"head.mlp_batchnorm={str(batchnorm).lower()}",
                                          "head.thead_depth=2", "model1.cross_weight=0.3", "model2.cross_weight=0.7"])
    students, teachers = perturbed_float64_models(config)
    centres = Centres(config.head.out_dim).double()
    centres.values.normal_()
    assert_matches_reference(config, MOKDObjective(config.loss, (0.3, 0.7)), students, teachers, centres,
                             random_crops(), pairing)


THREE_TEMPS = (*TEMPS, Temperatures(student=0.09, teacher_self=0.045, teacher_cross=0.065))


@pytest.mark.parametrize("kernel,fusion", [("torch", None), ("reference", None), ("torch", "fused_terms"),
                                           ("torch", "fused_head")])
def test_three_models_losses_and_gradients_match_the_equations(tmp_path, kernel, fusion):
    """N = 3 (two ResNets and a ViT): model i distils from its own teacher and from both others, each other
    model's L_cm and L_ct weighed lambda_i / 2, one centre per (model, centred term, teacher)."""
    torch.manual_seed(3)
    config = tiny_config(tmp_path, model2=[*TINY_RESNET[:-1], "width=4"], extra=[
        f"loss.kernel={kernel}", *([f"loss.{fusion}=true"] if fusion else []),
        *(f"model3.{item}" for item in TINY_VIT), "model3.optim.warmup_epochs=1",
        "model1.cross_weight=0.3", "model2.cross_weight=0.7", "model3.cross_weight=1.3"])
    assert len(config.models) == 3
    students, teachers = perturbed_float64_models(config)
    centres = Centres(config.head.out_dim, n_models=3).double()
    assert centres.values.shape[0] == 3 * (2 + 2)  # sm, st and an L_cm per other model, for each model
    centres.values.normal_()
    objective = MOKDObjective.for_config(config)
    assert_matches_reference(config, objective, students, teachers, centres, random_crops(), "local_to_global",
                             THREE_TEMPS)


def test_each_model_loss_depends_only_on_its_own_student(tmp_path):
    torch.manual_seed(1)
    config = tiny_config(tmp_path)
    students, teachers = build_models(config, in_chans=1)
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
    students, teachers = build_models(config, in_chans=1)
    assert (students[0].thead is not None) == (switches["self_thead"] or switches["cross_search"])
    crops = [torch.randn(2, 1, 16, 16) for _ in range(2)] + [torch.randn(2, 1, 8, 8) for _ in range(2)]
    losses = MOKDObjective(config.loss, (1.0, 1.0))(students, teachers, Centres(64), crops, TEMPS)
    assert {name.split("/")[1] for name in losses.terms} == expected


def test_zero_cross_weight_turns_off_that_models_cross_terms(tmp_path):
    config = tiny_config(tmp_path)
    objective = MOKDObjective(config.loss, (0.0, 1.0))
    assert [item.name for item in objective.active_terms(0)] == ["sm", "st"]
    assert [item.name for item in objective.active_terms(1)] == ["sm", "st", "cm", "ct"]


def test_pairs_of_every_kind_build(tmp_path):
    for model1, model2 in ((TINY_RESNET, TINY_VIT), (TINY_RESNET, TINY_RESNET), (TINY_VIT, TINY_VIT)):
        students, _ = build_models(tiny_config(tmp_path, model1, model2), in_chans=1)
        assert students[0].thead.pos_embed.shape[-1] == students[1].thead.pos_embed.shape[-1] == 32


@pytest.mark.parametrize("head_logits", [True, False], ids=["logits", "head_inputs"])
def test_student_forward_returns_no_view_that_carries_gradient(tmp_path, head_logits):
    """FSDP2 hooks every gradient-carrying output of a wrapped forward for its pre-backward all-gather; an in-place
    op on an output that is a view drops that hook. A student's multi-crop forward (CNN and ViT, per-term and
    fused-head outputs) returns none: walked here field by field, the per-pass backbone outputs included."""
    students, _ = build_models(tiny_config(tmp_path), in_chans=1)
    gen = torch.Generator().manual_seed(5)
    crops = [torch.randn(2, 1, 16, 16, generator=gen) for _ in range(2)]
    crops += [torch.randn(2, 1, 8, 8, generator=gen) for _ in range(2)]

    def gradient_views(value, name):
        if isinstance(value, torch.Tensor):
            return [name] if value.requires_grad and value._base is not None else []
        if isinstance(value, (tuple, list)):
            names = getattr(value, "_fields", range(len(value)))
            return [view for key, item in zip(names, value) for view in gradient_views(item, f"{name}.{key}")]
        return []

    for student in students:
        out = student(crops, head_logits=head_logits)
        assert out.pooled.requires_grad  # the walk sees the gradient-carrying outputs
        assert gradient_views(out, "out") == []
