"""The official recipe's details and the anti-collapse options, each read off the built modules, optimisers and
schedules, or checked against a literal float64 re-implementation."""

from __future__ import annotations

import math
import os
from pathlib import Path
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from helpers import TINY_RESNET, TINY_VIT, tiny_config
from mokd.config import load_config
from mokd.errors import ConfigError
from mokd.data.transforms import MultiCropTransform
from mokd.engine.collapse_watch import CollapseWatch
from mokd.engine.trainer import Trainer
from mokd.method.centring import sinkhorn_knopp
from mokd.method.koleo import koleo_loss
from mokd.method.monitors import feature_statistics
from mokd.method.mokd import Centres, MOKDObjective, Temperatures
from mokd.method.models import build_models, thead_width
from mokd.method.schedules import teacher_temperature_schedule

SGD_CNN = ["model1.optim.name=sgd", "model1.optim.base_lr=0.3", "model1.optim.weight_decay=1e-4",
           "model1.optim.weight_decay_end=1e-4", "model2.optim.base_lr=7e-4", "model2.optim.weight_decay=0.04",
           "model2.optim.weight_decay_end=0.4"]


def thead_groups(optimizer) -> list[dict]:
    return [group for group in optimizer.param_groups if group["schedule"] == "thead"]


def test_cnn_thead_is_its_own_group_on_the_vits_schedules(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, extra=SGD_CNN + ["train.max_steps=3"]), show_progress=False)
    trainer.train()
    step = trainer.step - 1  # the schedule values of the last step taken
    cnn, vit = trainer.schedules
    cnn_optimizer, vit_optimizer = trainer.optimizers
    thead_parameters = {id(p) for p in trainer.strategy.networks[0].thead.parameters()}
    grouped = {id(p) for group in thead_groups(cnn_optimizer) for p in group["params"]}
    assert grouped == thead_parameters  # the whole T-Head, nothing else
    for group in cnn_optimizer.param_groups:
        expected = vit if group["schedule"] == "thead" else cnn
        assert group["lr"] == pytest.approx(float(expected.lr[step]))
        if group["schedule"] == "thead":  # official: every T-Head parameter decays, biases and norms included
            assert group["weight_decay"] == pytest.approx(float(vit.weight_decay[step]))
    assert float(vit.lr[step]) != pytest.approx(float(cnn.lr[step]))
    assert thead_groups(vit_optimizer) == []  # the ViT's T-Head follows the ViT's own schedules


@pytest.mark.parametrize("models, overrides, follows", [
    ((TINY_RESNET, TINY_VIT), ["model1.thead_optim=own"], False),
    ((TINY_RESNET, TINY_RESNET), [], False),  # auto: two CNNs keep their own
    ((TINY_RESNET, TINY_RESNET), ["model1.thead_optim=other"], True),
])
def test_thead_group_choice(tmp_path, models, overrides, follows):
    trainer = Trainer(tiny_config(tmp_path, *models, extra=overrides + ["head.thead_dim=32"]), show_progress=False)
    assert bool(thead_groups(trainer.optimizers[0])) == follows


def test_thead_last_layer_norm_is_always_trainable(tmp_path):
    config = tiny_config(tmp_path, extra=["model1.trainable_last_layer_norm=false",
                                          "model2.trainable_last_layer_norm=true"])
    students, _ = build_models(config, in_chans=1)
    assert not students[0].mlp_head.last_layer.weight_g.requires_grad
    assert students[1].mlp_head.last_layer.weight_g.requires_grad
    for student in students:
        assert student.thead.last_layer.weight_g.requires_grad
    trainer = Trainer(config, show_progress=False)
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert id(trainer.strategy.networks[0].thead.last_layer.weight_g) in optimised


def test_thead_width_is_the_vits_and_the_vit_needs_no_projection(tmp_path):
    config = tiny_config(tmp_path, extra=["head.thead_dim=null"])
    assert thead_width(config) == 32  # TINY_VIT's width
    cnn, vit = build_models(config, in_chans=1)[0]
    assert isinstance(vit.thead.proj, nn.Identity)
    assert cnn.thead.proj.in_features == cnn.backbone.num_features and cnn.thead.proj.out_features == 32
    assert cnn.thead.pos_embed.shape[-1] == vit.thead.pos_embed.shape[-1] == 32
    assert thead_width(load_config("r101_vit_b")) == 768 and thead_width(load_config("r50_vit_s")) == 384
    assert thead_width(load_config("r50_r18")) == 384
    assert thead_width(tiny_config(tmp_path, TINY_RESNET, TINY_RESNET, extra=["head.thead_dim=null"])) == 384


def test_thead_l2_normalise_puts_the_logits_on_the_mlp_heads_scale(tmp_path):
    """modelN.thead_l2_normalise: the mean of the T-Head's output tokens is divided by its norm before the last
    layer (checked in float64 against the same weights without the option), for that model only; the official head
    is unchanged by default."""
    torch.manual_seed(0)
    official = build_models(tiny_config(tmp_path), in_chans=1)[0][1]
    torch.manual_seed(0)
    cnn, normalised = build_models(tiny_config(tmp_path, extra=["model2.thead_l2_normalise=true"]), in_chans=1)[0]
    assert normalised.thead.l2_normalise and not cnn.thead.l2_normalise and not official.thead.l2_normalise
    for module in (official, normalised):
        module.double().eval()
    tokens = torch.randn(5, 16, official.backbone.num_features, dtype=torch.float64) * 3.0
    grid = (4, 4)
    pooled = official.thead(tokens, grid, logits=False)
    assert pooled.norm(dim=-1).min() > 1.1  # the mean of LayerNorm outputs: not of unit norm
    pooled = pooled.detach().numpy()
    direction = pooled / np.sqrt((pooled ** 2).sum(axis=1, keepdims=True))
    weight_v = official.thead.last_layer.weight_v.detach().numpy()
    weight_g = official.thead.last_layer.weight_g.detach().numpy().reshape(-1, 1)
    weight = weight_g * weight_v / np.sqrt((weight_v ** 2).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(normalised.thead(tokens, grid, logits=False).detach().numpy(), direction, rtol=1e-10)
    np.testing.assert_allclose(normalised.thead(tokens, grid).detach().numpy(), direction @ weight.T, rtol=1e-9,
                               atol=1e-12)
    np.testing.assert_allclose(official.thead(tokens, grid).detach().numpy(), pooled @ weight.T,
                               rtol=1e-9, atol=1e-12)


def test_official_initialisations(tmp_path):
    cnn, vit = build_models(tiny_config(tmp_path), in_chans=1)[0]
    for head in (cnn.mlp_head, cnn.thead, vit.mlp_head):
        weight = head.last_layer.weight_v
        bound = 1 / math.sqrt(weight.shape[1])  # nn.Linear's default: kaiming-uniform, U(-1/sqrt(fan_in), ..)
        assert weight.abs().max() <= bound and weight.std() > 0.9 * bound / math.sqrt(3)
    projection = cnn.thead.proj.weight
    assert projection.abs().max() <= 1 / math.sqrt(projection.shape[1])
    assert projection.std() > 0.9 / math.sqrt(3 * projection.shape[1])  # not trunc-normal(0.02)
    block = cnn.backbone.net.layer1[0]
    assert torch.all(block.bn2.weight == 1)  # torchvision's: last BN of a block not zeroed
    zeroed = build_models(tiny_config(tmp_path, extra=["model1.zero_init_last_bn=true"]), in_chans=1)[0][0]
    assert torch.all(zeroed.backbone.net.layer1[0].bn2.weight == 0)


def test_teacher_temperature_steps_once_per_epoch():
    start, end, warmup, steps_per_epoch, epochs = 0.04, 0.07, 3, 5, 6
    schedule = teacher_temperature_schedule(start, end, warmup, epochs * steps_per_epoch, steps_per_epoch, "epoch")
    for step, value in enumerate(schedule):
        epoch = step // steps_per_epoch
        expected = start + epoch * (end - start) / warmup if epoch < warmup else end
        assert value == pytest.approx(expected)


def test_blur_radius_scales_with_the_crop_side():
    transform = MultiCropTransform(20, 12, 1, (0.4, 1.0), (0.1, 0.4), (0.5,), (0.25,), 1, blur_sigma=(0.1, 2.0))
    blurs = [[t for t in pipeline.transforms if type(t).__name__ == "_RandomGaussianBlur"][0]
             for pipeline in (transform.global_1, transform.global_2, transform.local)]
    assert [b.radius_max for b in blurs] == pytest.approx([2.0 * 20 / 224, 2.0 * 20 / 224, 2.0 * 12 / 224])
    assert [b.radius_min for b in blurs] == pytest.approx([0.1 * 20 / 224, 0.1 * 20 / 224, 0.1 * 12 / 224])
    assert [b.p for b in blurs] == [1.0, 0.1, 0.5]


def test_mlp_head_batchnorm(tmp_path):
    cnn, vit = build_models(tiny_config(tmp_path, extra=["head.mlp_batchnorm=true"]), in_chans=1)[0]
    for network in (cnn, vit):
        kinds = [type(m).__name__ for m in network.mlp_head.mlp]
        assert kinds == ["Linear", "BatchNorm1d", "GELU", "Linear", "BatchNorm1d", "GELU", "Linear"]
    plain = build_models(tiny_config(tmp_path), in_chans=1)[0][0]
    assert not any(isinstance(m, nn.BatchNorm1d) for m in plain.mlp_head.modules())


def literal_sinkhorn(logits: np.ndarray, temperature: float, iterations: int) -> np.ndarray:
    """SwAV's algorithm, written out in float64 with explicit loops over prototypes and rows."""
    q = np.exp(logits / temperature).T  # [K, R]
    q = q / q.sum()
    prototypes, rows = q.shape
    for _ in range(iterations):
        for k in range(prototypes):
            q[k] = q[k] / q[k].sum() / prototypes
        for r in range(rows):
            q[:, r] = q[:, r] / q[:, r].sum() / rows
    return (q * rows).T


def test_sinkhorn_knopp_matches_the_literal_algorithm():
    torch.manual_seed(1)
    logits = torch.randn(12, 7, dtype=torch.float64) * 0.3
    ours = sinkhorn_knopp(logits, 0.05, 3).double().numpy()
    np.testing.assert_allclose(ours, literal_sinkhorn(logits.numpy(), 0.05, 3), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(ours.sum(axis=1), 1.0, rtol=1e-5)
    # Many rounds: the prototypes are used equally over the batch.
    balanced = sinkhorn_knopp(logits, 0.05, 200).double().numpy()
    np.testing.assert_allclose(balanced.sum(axis=0), 12 / 7, rtol=1e-4)
    # Logits sharp enough to underflow whole prototypes (seen with T-Head logits at tau 0.04): finite targets.
    sharp = sinkhorn_knopp(logits.float() * 400, 0.04, 3)
    assert torch.isfinite(sharp).all() and torch.all(sharp >= 0)


def _sinkhorn_rank(rank: int, port: int, logits: torch.Tensor, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from mokd.engine.distributed import all_reduce_sum

    half = logits.shape[0] // 2
    mine = sinkhorn_knopp(logits[rank * half:(rank + 1) * half], 0.05, 3, all_reduce_sum)
    out[rank] = mine
    dist.destroy_process_group()


def test_sinkhorn_knopp_over_two_ranks_equals_one_process_over_the_whole_batch():
    torch.manual_seed(2)
    logits = torch.randn(10, 9) * 0.4
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_sinkhorn_rank, args=(port, logits, out), nprocs=2, join=True)
        gathered = torch.cat([out[0], out[1]])
    torch.testing.assert_close(gathered, sinkhorn_knopp(logits, 0.05, 3), rtol=1e-5, atol=1e-7)


def literal_koleo(features: np.ndarray) -> float:
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    total = 0.0
    for i in range(len(unit)):
        nearest = min(np.linalg.norm(unit[i] - unit[j]) for j in range(len(unit)) if j != i)
        total += -math.log(nearest + 1e-8)
    return total / len(unit)


def test_koleo_matches_the_literal_definition():
    torch.manual_seed(3)
    features = torch.randn(9, 5, dtype=torch.float64)
    assert koleo_loss(features).item() == pytest.approx(literal_koleo(features.numpy()), rel=1e-6)


def test_feature_monitors_match_numpy():
    torch.manual_seed(4)
    features = torch.randn(11, 6, dtype=torch.float64) @ torch.diag(torch.tensor([3.0, 1, 1, 0.2, 0.1, 0.1], dtype=torch.float64))
    stats = feature_statistics(features)
    x = features.numpy()
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    cosines = [unit[i] @ unit[j] for i in range(len(x)) for j in range(len(x)) if i != j]
    eigenvalues = np.linalg.eigvalsh(np.cov(x.T))
    assert stats["mean_cosine"].item() == pytest.approx(np.mean(cosines), rel=1e-4)
    assert stats["effective_rank"].item() == pytest.approx(eigenvalues.sum() ** 2 / (eigenvalues ** 2).sum(), rel=1e-4)
    collapsed = feature_statistics(torch.randn(8, 1) @ torch.randn(1, 6) + 1e-4 * torch.randn(8, 6))
    assert collapsed["effective_rank"].item() < 1.01


def test_objective_with_sinkhorn_targets_and_koleo_matches_the_equations(tmp_path):
    torch.manual_seed(5)
    config = tiny_config(tmp_path, extra=["loss.centring=sinkhorn_knopp", "model1.koleo_weight=0.3",
                                          "model2.koleo_weight=0.2",
                                          "loss.self_thead=false", "loss.cross_search=false",
                                          "model1.cross_weight=0.5", "model2.cross_weight=1.0"])
    students, teachers = build_models(config, in_chans=1)
    students, teachers = tuple(s.double() for s in students), tuple(t.double() for t in teachers)
    centres = Centres(config.head.out_dim).double()
    centres.values.normal_()  # must be ignored under Sinkhorn-Knopp
    crops = [torch.randn(4, 1, 16, 16, dtype=torch.float64) for _ in range(2)] + \
            [torch.randn(4, 1, 8, 8, dtype=torch.float64) for _ in range(2)]
    temps = (Temperatures(0.1, 0.05, 0.06), Temperatures(0.1, 0.04, 0.07))
    losses = MOKDObjective(config.loss, (0.5, 1.0), (0.3, 0.2))(students, teachers, centres, crops, temps)
    assert torch.all(losses.centre_rows == 0)  # no centre moves
    batch = 4
    for i in (0, 1):
        student_out = students[i](crops)
        with torch.no_grad():
            own, other = teachers[i](crops[:2]), teachers[1 - i](crops[:2])

        def dino(teacher_logits, tau_t):
            p = torch.tensor(literal_sinkhorn(teacher_logits.numpy(), tau_t, 3)).split(batch)
            log_q = torch.log_softmax(student_out.mlp_logits / 0.1, dim=-1).split(batch)
            values = [-(p[v] * log_q[u]).sum(-1).mean() for v in range(2) for u in range(4) if u != v]
            return sum(values) / len(values)

        koleo = sum(literal_koleo(z.detach().numpy()) for z in student_out.pooled[:2 * batch].split(batch)) / 2
        expected = (dino(own.mlp_logits, temps[i].teacher_self)
                    + (0.5, 1.0)[i] * dino(other.mlp_logits, temps[i].teacher_cross) + (0.3, 0.2)[i] * koleo)
        assert losses.totals[i].item() == pytest.approx(expected.item(), rel=1e-5)
        assert losses.terms[f"model{i + 1}/koleo"].item() == pytest.approx(koleo, rel=1e-6)


def test_monitors_are_logged_and_a_collapse_warns_once(tmp_path, capsys):
    # a gap fraction of 100 puts every cosine in the bad zone (1 - v <= 100 (1 - v0) for any v0 < 1)
    config = tiny_config(tmp_path, extra=["train.max_steps=4", "train.warn_feature_cosine_gap=100",
                                          "train.warn_entropy_fraction=0", "train.threads=1"])
    previous_threads = torch.get_num_threads()
    try:
        trainer = Trainer(config, show_progress=False)
        assert torch.get_num_threads() == 1
        trainer.train()
    finally:
        torch.set_num_threads(previous_threads)
    import json
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for which in (1, 2):
        assert all(0 < r[f"collapse/feature_rank/model{which}"] and -1 <= r[f"collapse/feature_cosine/model{which}"] <= 1
                   for r in records)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    cosine_warnings = [line for line in lines if "feature_cosine" in line]
    assert len(cosine_warnings) == 2  # one per model, not one per logged step
    assert any("teacher_entropy/model1/sm" in line for line in lines)
    # The step-0 reference is the first step's value (untrained teachers), logged beside every record
    for which in (1, 2):
        for monitor in ("feature_cosine", "feature_rank"):
            step0 = {r[f"collapse/{monitor}_step0/model{which}"] for r in records}
            assert step0 == {records[0][f"collapse/{monitor}/model{which}"]}


def test_feature_collapse_warnings_are_relative_to_the_untrained_network():
    """An untrained ResNet's pooled features are already aligned (post-ReLU): a cosine of 0.95 against 0.86 at
    step 0 is healthy, 0.97 has closed more than 3/4 of the gap to 1; a rank of 2 against 3.8 is above half."""
    watch = CollapseWatch(64, cosine_gap_fraction=0.25, rank_fraction=0.5, max_entropy_fraction=0.98)
    cosine, rank = "collapse/feature_cosine/model1", "collapse/feature_rank/model1"
    assert watch.check(1, {cosine: 0.99, rank: 1.0}) == []  # no reference yet: nothing to judge against
    watch.set_baseline({cosine: 0.86, rank: 3.8})
    assert watch.check(2, {cosine: 0.95, rank: 2.0}) == []
    lines = watch.check(3, {cosine: 0.97, rank: 1.8})
    assert len(lines) == 2 and "step 3: collapse/feature_cosine/model1 = 0.97" in lines[0] and "0.86" in lines[0]
    assert "collapse/feature_rank/model1 = 1.8" in lines[1] and "3.8" in lines[1]
    assert watch.check(4, {cosine: 0.98, rank: 1.5}) == []  # still collapsed: said once
    assert watch.check(5, {cosine: 0.90, rank: 3.0}) == []  # recovered
    assert watch.check(6, {cosine: 0.99, rank: 1.0}) == []  # crossing again: said once per run, not per crossing
    assert len(watch.check(6, {"collapse/feature_rank/model2": 1.0})) == 0  # no step-0 value for model2: no judge
    entropy = watch.check(7, {"collapse/teacher_entropy/model2/cm": 0.99 * math.log(64)})
    assert len(entropy) == 1 and "uniform" in entropy[0]


def test_the_step0_reference_survives_a_resume(tmp_path):
    config = tiny_config(tmp_path, extra=["train.max_steps=2", "checkpoint.every_steps=2"])
    trainer = Trainer(config, show_progress=False)
    trainer.train()
    step0 = trainer.collapse_step0
    assert set(step0) == {f"collapse/{m}/model{w}" for m in ("feature_cosine", "feature_rank") for w in (1, 2)}
    resumed = Trainer(tiny_config(tmp_path, extra=["train.max_steps=4", "checkpoint.every_steps=2"]),
                      show_progress=False)
    assert resumed.step == 2 and resumed.collapse_step0 == step0 and resumed.collapse_watch.baseline == step0


def test_auto_precision_follows_the_cpus_bf16_unit_and_the_run_prints_it(tmp_path, capsys):
    """auto is bf16 exactly where /proc/cpuinfo lists amx_bf16 or avx512_bf16 (or on CUDA), else fp32; the
    choice is printed when a run starts."""
    from mokd.engine.runtime import autocast_dtype, cpu_bf16_matrix_unit, describe_precision

    flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), [])
    expected_unit = "AMX-BF16" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else None
    assert cpu_bf16_matrix_unit() == expected_unit
    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) == (torch.bfloat16 if expected_unit else None)
    assert autocast_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert autocast_dtype("fp32", cpu) is None and autocast_dtype("bf16", cpu) == torch.bfloat16
    line = describe_precision("auto", cpu)
    assert (f"bf16 autocast (train.precision=auto: this CPU has {expected_unit}" in line if expected_unit
            else "fp32 (train.precision=auto: this CPU has no bf16 matrix unit" in line)
    Trainer(tiny_config(tmp_path / "run", extra=["train.max_steps=1"]))
    assert "mokd: precision fp32 (train.precision=fp32)" in capsys.readouterr().out


def test_per_model_term_weights_follow_the_equation(tmp_path):
    """L_i = w_sm L_sm + w_st L_st + lambda_i (w_cm L_cm + w_ct L_ct), each w 1 unless set; a weight of 0 drops
    the term for that model only (its loss is not even computed)."""
    torch.manual_seed(11)
    config = tiny_config(tmp_path, extra=["model1.cross_weight=0.5", "model2.cross_weight=0.8",
                                          "model2.term_weights.st=0", "model2.term_weights.cm=0.25",
                                          "model1.term_weights.ct=2.0"])
    students, teachers = build_models(config, in_chans=1)
    centres = Centres(config.head.out_dim)
    centres.values.normal_()
    crops = [torch.randn(4, 1, 16, 16) for _ in range(2)] + [torch.randn(4, 1, 8, 8) for _ in range(2)]
    temps = (Temperatures(0.1, 0.05, 0.06), Temperatures(0.1, 0.04, 0.07))
    objective = MOKDObjective(config.loss, (0.5, 0.8), term_weights=(dict(config.model1.term_weights),
                                                                      dict(config.model2.term_weights)))
    losses = objective(students, teachers, centres, crops, temps)
    term = {name: value.item() for name, value in losses.terms.items()}
    assert "model2/st" not in term and {"model1/sm", "model1/st", "model1/cm", "model1/ct"} <= term.keys()
    expected1 = term["model1/sm"] + term["model1/st"] + 0.5 * (term["model1/cm"] + 2.0 * term["model1/ct"])
    expected2 = term["model2/sm"] + 0.8 * (0.25 * term["model2/cm"] + term["model2/ct"])
    assert losses.totals[0].item() == pytest.approx(expected1, rel=1e-6)
    assert losses.totals[1].item() == pytest.approx(expected2, rel=1e-6)
    assert losses.centre_rows[centres.row(1, "st")] == 0 and losses.centre_rows[centres.row(0, "st")] > 0
    with pytest.raises(ConfigError, match="model1.term_weights.xy: no such loss term"):
        tiny_config(tmp_path, extra=["model1.term_weights.xy=1"])
