"""Schedules, LARS, bf16 training and asynchronous checkpoints, each held against a reference written in the test."""

from __future__ import annotations

import json
import shutil
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from helpers import TINY_RESNET, TINY_VIT, linear_then_constant, tiny_config, warmup_cosine
from mokd.engine.checkpoint import CheckpointManager, load_teachers_file
from mokd.engine.optim import LARS, build_optimizer, set_schedule
from mokd.engine.trainer import Trainer
from mokd.method.schedules import ModelSchedules


def optim(**values) -> SimpleNamespace:
    defaults = dict(name="sgd", base_lr=0.3, min_lr=0.002, warmup_epochs=1.4, weight_decay=0.04, weight_decay_end=0.4,
                    momentum=0.9, clip_grad=3.0, freeze_last_layer_epochs=0.7)
    return SimpleNamespace(**{**defaults, **values})


def model(optim_config, warmup_epochs_self: float, warmup_epochs_cross: float) -> SimpleNamespace:
    temperature = SimpleNamespace(student=0.1, teacher_start=0.04, teacher_end=0.07, warmup_unit="step",
                                  warmup_epochs_self=warmup_epochs_self, warmup_epochs_cross=warmup_epochs_cross)
    return SimpleNamespace(optim=optim_config, temperature=temperature)


@pytest.mark.parametrize("epochs,steps_per_epoch,global_batch", [(3, 5, 96), (2, 7, 512)])
def test_every_schedule_value_follows_its_formula(epochs, steps_per_epoch, global_batch):
    """lr: linear warm-up to base_lr * B / 256 then cosine to min_lr; weight decay and teacher momentum cosine;
    teacher temperatures linear then constant, a warm-up longer than the run cut off where the run ends; the T-Head
    group on the other model's lr and weight decay; the last layers frozen for round(epochs * steps) steps."""
    own, other = optim(), optim(name="adamw", base_lr=5e-4, min_lr=1e-5, warmup_epochs=0.5, weight_decay=0.1,
                                weight_decay_end=0.2)
    total = epochs * steps_per_epoch
    loss = SimpleNamespace(teacher_momentum=0.996)
    schedules = ModelSchedules(model(own, 1.0, 2 * epochs), loss, total, steps_per_epoch, global_batch,
                               thead_optim=other)

    def per_step(values):
        assert len(values) == total
        return np.asarray(values, dtype=np.float64)

    def warmup(epochs_):
        return round(epochs_ * steps_per_epoch)

    expected = {
        "lr": warmup_cosine(own.base_lr * global_batch / 256, own.min_lr, total, warmup(own.warmup_epochs)),
        "weight_decay": warmup_cosine(own.weight_decay, own.weight_decay_end, total),
        "thead_lr": warmup_cosine(other.base_lr * global_batch / 256, other.min_lr, total, warmup(other.warmup_epochs)),
        "thead_weight_decay": warmup_cosine(other.weight_decay, other.weight_decay_end, total),
        "teacher_momentum": warmup_cosine(0.996, 1.0, total),
        "teacher_temperature_self": linear_then_constant(0.04, 0.07, total, warmup(1.0)),
        "teacher_temperature_cross": linear_then_constant(0.04, 0.07, total, warmup(2 * epochs)),
    }
    for name, values in expected.items():
        np.testing.assert_allclose(per_step(getattr(schedules, name)), values, rtol=1e-12, atol=0, err_msg=name)
    assert schedules.freeze_last_layer_steps == round(0.7 * steps_per_epoch)  # 4 of 5, 5 of 7
    for step in range(total):
        values = schedules.group_values(step)
        assert values["model"] == pytest.approx((expected["lr"][step], expected["weight_decay"][step]), rel=1e-12)
        assert values["thead"] == pytest.approx((expected["thead_lr"][step], expected["thead_weight_decay"][step]),
                                                rel=1e-12)
    # A warm-up longer than the run: the lr climbs on the warm-up's own line and never reaches its peak.
    longer = ModelSchedules(model(optim(warmup_epochs=epochs + 1), 1.0, 1.0), loss, total, steps_per_epoch,
                            global_batch)
    peak = own.base_lr * global_batch / 256
    np.testing.assert_allclose(longer.lr, [peak * t / ((epochs + 1) * steps_per_epoch) for t in range(total)],
                               rtol=1e-12)


def test_the_trainer_runs_its_schedules_over_epochs_times_steps_and_lars_when_asked(tmp_path):
    """The trainer's run length, global batch and the values its optimiser groups get each step; optim.name=lars
    builds LARS (no preset uses it yet) and it trains."""
    extra = ["data.synthetic_size=40", "train.epochs=3", "train.max_steps=2", "checkpoint.enabled=false",
             "model1.optim.name=lars", "model1.optim.warmup_epochs=0.4", "model1.optim.base_lr=0.8",
             "model1.optim.weight_decay=0.01", "model1.optim.weight_decay_end=0.02"]
    trainer = Trainer(tiny_config(tmp_path, TINY_RESNET, TINY_VIT, extra), show_progress=False)
    assert isinstance(trainer.optimizers[0], LARS)
    assert trainer.steps_per_epoch == 5 and trainer.total_steps == 15
    config = trainer.config
    for which, schedule in enumerate(trainer.schedules):
        mine, other = ((config.model1, config.model2)[i].optim for i in (which, 1 - which))
        lr = warmup_cosine(mine.base_lr * 8 / 256, mine.min_lr, 15, round(mine.warmup_epochs * 5))
        np.testing.assert_allclose(schedule.lr, lr, rtol=1e-12)
        thead = other if which == 0 else mine  # the CNN's T-Head trains on the ViT's schedules
        np.testing.assert_allclose(schedule.thead_lr, warmup_cosine(thead.base_lr * 8 / 256, thead.min_lr, 15,
                                                                    round(thead.warmup_epochs * 5)), rtol=1e-12)
    before = {name: p.detach().clone() for name, p in trainer.student_networks[0].named_parameters()}
    trainer.data.sampler.set_epoch(0)
    for step, (crops, _) in zip(range(2), trainer.data.loader):
        trainer.train_step(crops)
        for group in trainer.optimizers[0].param_groups:
            lr, weight_decay = trainer.schedules[0].group_values(step)[group["schedule"]]
            assert group["lr"] == pytest.approx(lr, rel=1e-12)
            assert group["weight_decay"] == (pytest.approx(weight_decay, rel=1e-12) if group["apply_weight_decay"]
                                             else 0.0)
    after = dict(trainer.student_networks[0].named_parameters())
    frozen = [name for name in before if ".last_layer." in name]  # the first epoch
    assert frozen and all(torch.equal(before[name], after[name]) for name in frozen)
    changed = [not torch.equal(before[name], after[name]) for name in before if name not in frozen]
    assert sum(changed) > len(changed) // 2


def reference_lars(parameters, grads_per_step, lrs, weight_decays, momentum=0.9, eta=0.001):
    """LARS as DINO (after Barlow Twins) writes it, in float64: for every tensor that is not 1-d (biases, norms),
    d = g + wd w scaled by eta ||w|| / ||d|| (1 where either norm is 0); then mu = m mu + d, w -= lr mu."""
    weights = [p.detach().double().clone() for p in parameters]
    buffers = [torch.zeros_like(w) for w in weights]
    for grads, lr, weight_decay in zip(grads_per_step, lrs, weight_decays):
        for w, g, mu in zip(weights, grads, buffers):
            d = g.double()
            if w.ndim != 1:
                d = d + weight_decay * w
                w_norm, d_norm = w.norm(), d.norm()
                d = d * (eta * w_norm / d_norm if w_norm > 0 and d_norm > 0 else 1.0)
            mu.mul_(momentum).add_(d)
            w.sub_(lr * mu)
    return weights


def test_lars_steps_match_the_written_out_rule():
    torch.manual_seed(3)
    network = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Conv2d(5, 4, 1), nn.Linear(4, 3, bias=False))
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.normal_()  # LayerNorm's own ones and zeros would leave its rule untested
    optimizer = build_optimizer(network, optim(name="lars", momentum=0.9))
    assert isinstance(optimizer, LARS)
    initial = [p.detach().clone() for p in network.parameters()]
    lrs, weight_decays = [0.5, 0.2, 0.7], [0.1, 0.3, 0.05]
    grads_per_step = [[torch.randn_like(p) * (10.0 if p.ndim > 1 else 0.1) for p in network.parameters()]
                      for _ in lrs]
    for grads, lr, weight_decay in zip(grads_per_step, lrs, weight_decays):
        set_schedule(optimizer, {"model": (lr, weight_decay), "thead": (lr, weight_decay)})
        for parameter, grad in zip(network.parameters(), grads):
            parameter.grad = grad.clone()
        optimizer.step()
    # Biases and norm weights: plain momentum SGD without decay; the rest: the trust ratio (eta ||w|| / ||g + wd w||).
    expected = reference_lars(initial, grads_per_step, lrs, weight_decays)
    for (name, parameter), reference in zip(network.named_parameters(), expected):
        torch.testing.assert_close(parameter.double(), reference, rtol=1e-5, atol=1e-6, msg=name)


def tiny_trainer(tmp_path, precision: str) -> tuple[Trainer, list[torch.Tensor]]:
    """Three steps of the tiny pair at `precision`, and its students' initial weights."""
    extra = [f"train.precision={precision}", "train.max_steps=3", "checkpoint.enabled=false",
             "model2.optim.warmup_epochs=0"]
    trainer = Trainer(tiny_config(tmp_path / precision, extra=extra), show_progress=False)
    initial = [p.detach().clone() for student in trainer.student_networks for p in student.parameters()]
    return trainer, initial


def read_losses(run_dir) -> dict[int, dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("loss/")} for r in records}


def test_bf16_autocast_trains_fp32_master_weights_with_losses_close_to_fp32(tmp_path):
    fp32, _ = tiny_trainer(tmp_path, "fp32")
    fp32.train()
    bf16, initial = tiny_trainer(tmp_path, "bf16")
    seen = set()  # the dtype the heads' matmuls really ran in
    hooks = [student.mlp_head.mlp[0].register_forward_hook(lambda module, args, out: seen.add(out.dtype))
             for student in bf16.student_networks]
    bf16.train()
    for hook in hooks:
        hook.remove()
    assert seen == {torch.bfloat16}

    reference, mine = read_losses(tmp_path / "fp32"), read_losses(tmp_path / "bf16")
    assert sorted(mine) == [1, 2, 3]
    for step in mine:
        assert all(np.isfinite(value) for value in mine[step].values()), step
    # Step 1: the same weights on the same crops. bf16 rounds each operand to 2^-9 relative, and logits divided by
    # teacher temperatures of 0.04 turn that into ~1e-2 of a loss: measured on this pair over seeds 0-2, the largest
    # gap of any term was 1.4e-2 to 1.9e-2 at step 1 (2.3e-2 by step 3). 5e-2 holds that with room for other CPUs'
    # bf16 kernels, while a student temperature 10% off in the bf16 path alone already moves a term past it.
    for name, value in reference[1].items():
        assert mine[1][name] == pytest.approx(value, rel=5e-2), name
    updated = [p for student in bf16.student_networks for p in student.parameters()]
    assert all(p.dtype == torch.float32 for p in updated)
    assert all(p.dtype == torch.float32 for teacher in bf16.teacher_networks for p in teacher.parameters())
    for optimizer in bf16.optimizers:
        for state in optimizer.state.values():
            assert all(v.dtype == torch.float32 for v in state.values() if torch.is_tensor(v) and v.ndim > 0)
    changed = [not torch.equal(a, b) for a, b in zip(initial, updated)]
    assert sum(changed) > len(changed) // 2


def test_async_checkpoints_resume_exactly_as_an_uninterrupted_run(tmp_path, monkeypatch):
    """Steps 1-3 with checkpoints written in the background every 2 steps, step 2's held back until step 3 has changed
    the weights in place (as a slow disk would). Resumed from it, steps 3-4 equal those of a run never interrupted."""
    extra = ["train.deterministic=true", "model2.drop_path=0.1", "checkpoint.every_steps=2"]
    whole = Trainer(tiny_config(tmp_path / "whole", extra=extra + ["train.max_steps=4"]), show_progress=False)
    whole.train()

    split = tmp_path / "split"
    asynchronous = extra + ["checkpoint.async_save=true"]
    first = Trainer(tiny_config(split, extra=asynchronous + ["train.max_steps=3"]), show_progress=False)
    background = CheckpointManager._background

    def after_the_next_step(manager, finish, staging, final, step, is_main):
        deadline = time.monotonic() + 60
        while first.step <= step and step < first.last_step and time.monotonic() < deadline:
            time.sleep(0.01)
        background(manager, finish, staging, final, step, is_main)

    monkeypatch.setattr(CheckpointManager, "_background", after_the_next_step)
    first.train()
    monkeypatch.undo()
    # The teachers file (what evaluation and export read) holds step 2's teachers, not the ones trained on since.
    written, reference = (load_teachers_file(run / "checkpoints" / "step_00000002")
                          for run in (split, tmp_path / "whole"))
    for mine, theirs in zip(written, reference):
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[key], theirs[key]) for key in mine)
    shutil.rmtree(split / "checkpoints" / "step_00000003")  # as if killed once step 3 was logged
    resumed = Trainer(tiny_config(split, extra=asynchronous + ["train.max_steps=4"]), show_progress=False)
    assert resumed.step == 2
    resumed.train()

    assert read_losses(split) == read_losses(tmp_path / "whole")
    for kind in ("student_networks", "teacher_networks"):
        for mine, reference in zip(getattr(resumed, kind), getattr(whole, kind)):
            reference_state = reference.state_dict()
            for key, value in mine.state_dict().items():
                assert torch.equal(value, reference_state[key]), (kind, key)
    for mine, reference in zip(resumed.optimizers, whole.optimizers):
        for state, reference_state in zip(mine.state.values(), reference.state.values()):
            for key, value in state.items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(reference_state[key])), key
    assert torch.equal(resumed.centres.values, whole.centres.values)
