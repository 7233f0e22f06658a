"""The single-process trainer: teachers, EMA, centres, independence of the pair, exact resume, pair kinds."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from helpers import TINY_RESNET, TINY_VIT, linear_then_constant, tiny_config, warmup_cosine
from mokd.engine.checkpoint import CheckpointError
from mokd.engine.train_data import TrainData
from mokd.engine.trainer import Trainer
from mokd.method.models import build_network, make_teacher
from test_method_losses import reference_dino


def first_batch(trainer: Trainer) -> list[torch.Tensor]:
    trainer.data.sampler.set_epoch(0)
    crops, _ = next(iter(trainer.data.loader))
    trainer.data.sampler.set_epoch(0)
    return crops


def test_teachers_get_no_gradient_ema_and_centres_follow_their_formulas(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, extra=["checkpoint.enabled=false"]), show_progress=False)
    crops = first_batch(trainer)
    teachers_before = [[p.detach().clone() for p in t.parameters()] for t in trainer.teacher_networks]
    centres_before = trainer.centres.values.clone()
    with torch.no_grad():  # the raw teacher logits the centres must average (teacher BN in train mode)
        raw = [teacher(crops[:2]) for teacher in trainer.teacher_networks]

    trainer.train_step(crops)

    for teacher in trainer.teacher_networks:
        assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    for which, (teacher, student) in enumerate(zip(trainer.teacher_networks, trainer.student_networks)):
        momentum = float(trainer.schedules[which].teacher_momentum[0])
        for before, after, student_param in zip(teachers_before[which], teacher.parameters(), student.parameters()):
            expected = momentum * before + (1 - momentum) * student_param.detach()
            torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-7)
    m = trainer.config.loss.centre_momentum
    targets = {"sm": (0, "mlp_logits"), "st": (0, "thead_logits"), "cm": (1, "mlp_logits")}
    for which in (0, 1):
        for term, (offset, field) in targets.items():
            teacher_logits = getattr(raw[(which + offset) % 2], field)
            expected = m * centres_before[trainer.centres.row(which, term)] + (1 - m) * teacher_logits.mean(dim=0)
            torch.testing.assert_close(trainer.centres.get(which, term), expected, rtol=1e-5, atol=1e-6)


def dino_parameter_groups(network) -> list[dict]:
    """DINO's get_params_groups: biases and 1-d tensors (norm weights) are never decayed."""
    decayed, plain = [], []
    for name, parameter in network.named_parameters():
        if parameter.requires_grad:
            (plain if name.endswith(".bias") or parameter.ndim == 1 else decayed).append(parameter)
    return [{"params": decayed}, {"params": plain, "weight_decay": 0.0}]


@torch.no_grad()
def dino_clip_gradients(network, clip: float) -> None:
    """DINO's clip_gradients: each parameter's gradient on its own, scaled by clip / (norm + 1e-6) where that is < 1."""
    for parameter in network.parameters():
        if parameter.grad is not None:
            coefficient = clip / (parameter.grad.norm(2) + 1e-6)
            if coefficient < 1:
                parameter.grad.mul_(coefficient)


def independent_dino(config, which: int, batches: list[list[torch.Tensor]]):
    """DINO alone for model `which`, written out step by step (the paper's baseline): its own schedules, parameter
    groups, clipping and last-layer freeze; only the network is built by the engine."""
    model = (config.model1, config.model2)[which]
    optim = model.optim
    student = build_network(config, which, 1, student=True)
    teacher = make_teacher(config, which, 1, student)
    groups = dino_parameter_groups(student)
    optimizer = (torch.optim.SGD(groups, lr=0.0, momentum=optim.momentum) if optim.name == "sgd"
                 else torch.optim.AdamW(groups, lr=0.0))
    batch = config.train.batch_size
    steps_per_epoch = config.data.synthetic_size // batch
    total = config.train.epochs * steps_per_epoch
    lr = warmup_cosine(optim.base_lr * batch / 256, optim.min_lr, total, round(optim.warmup_epochs * steps_per_epoch))
    weight_decay = warmup_cosine(optim.weight_decay, optim.weight_decay_end, total)
    momentum = warmup_cosine(config.loss.teacher_momentum, 1.0, total)
    temperature = model.temperature
    teacher_temperature = linear_then_constant(temperature.teacher_start, temperature.teacher_end, total,
                                               round(temperature.warmup_epochs_self * steps_per_epoch))
    frozen_steps = round(optim.freeze_last_layer_epochs * steps_per_epoch)
    centre = torch.zeros(config.head.out_dim)
    for step, crops in enumerate(batches):
        for group in optimizer.param_groups:
            group["lr"] = lr[step]
        optimizer.param_groups[0]["weight_decay"] = weight_decay[step]
        student_logits = student(crops).mlp_logits
        with torch.no_grad():
            teacher_logits = teacher(crops[:2]).mlp_logits
        loss = reference_dino(student_logits.split(batch), teacher_logits.split(batch), centre,
                              temperature.student, teacher_temperature[step])
        loss.backward()
        dino_clip_gradients(student, optim.clip_grad)
        if step < frozen_steps:
            for name, parameter in student.named_parameters():
                if "last_layer" in name:
                    parameter.grad = None
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            for teacher_param, student_param in zip(teacher.parameters(), student.parameters()):
                teacher_param.mul_(momentum[step]).add_((1 - momentum[step]) * student_param)
            centre = config.loss.centre_momentum * centre + (1 - config.loss.centre_momentum) * teacher_logits.mean(0)
    return student, teacher


def test_self_mlp_only_pair_equals_two_independent_dino_runs(tmp_path):
    # The clip at 3 meets gradients on both sides of it; the last layers stay frozen for 2 of the 3 steps; the teacher
    # temperatures warm up over 30 epochs, longer than the run. The SGD model's lr and weight decay are large enough
    # for a decay step (lr * wd ~ 6e-3 of a weight) to show against the tolerance.
    switches = ["loss.self_thead=false", "loss.cross_mlp=false", "loss.cross_search=false",
                "model1.optim.name=sgd", "model1.optim.base_lr=0.5", "model1.optim.weight_decay=0.4",
                "model1.optim.weight_decay_end=0.4", "train.max_steps=3", "checkpoint.enabled=false",
                *[f"model{i}.optim.{key}" for i in (1, 2)
                  for key in ("clip_grad=3.0", "freeze_last_layer_epochs=0.5")]]
    config = tiny_config(tmp_path, extra=switches)
    trainer = Trainer(config, show_progress=False)
    assert trainer.student_networks[0].thead is None
    trainer.train()

    data = TrainData.build(config)
    loader, sampler = data.loader, data.sampler
    sampler.set_epoch(0)
    batches = [crops for crops, _ in list(loader)[:3]]
    for which in (0, 1):
        student, teacher = independent_dino(config, which, batches)
        for mine, reference in zip(trainer.teacher_networks[which].parameters(), teacher.parameters()):
            torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-6)
        for mine, reference in zip(trainer.student_networks[which].parameters(), student.parameters()):
            torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind,model1,model2", [
    ("cnn-vit", TINY_RESNET, TINY_VIT),
    ("cnn-cnn", TINY_RESNET, ["backbone=resnet34", "small_image=true", "width=8"]),
    ("vit-vit", ["backbone=vit_small_patch16_224", "small_image=true", "width=32", "depth=2", "num_heads=2"], TINY_VIT),
    ("same-architecture", TINY_VIT, TINY_VIT),
])
def test_one_training_step_for_every_pair_kind(tmp_path, kind, model1, model2):
    extra = ["train.max_steps=1", "checkpoint.enabled=false", "model2.optim.warmup_epochs=0"]  # lr > 0 at step 0
    trainer = Trainer(tiny_config(tmp_path, model1, model2, extra),
                      show_progress=False)
    before = [p.detach().clone() for p in trainer.student_networks[1].parameters()]
    trainer.train()
    assert trainer.step == 1
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    for which in (1, 2):
        for term in ("sm", "st", "cm", "ct"):
            assert torch.isfinite(torch.tensor(record[f"loss/model{which}/{term}"]))
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.student_networks[1].parameters()))


def read_losses(run_dir) -> dict[int, dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("loss/")} for r in records}


def test_resume_reproduces_an_uninterrupted_run_exactly(tmp_path):
    extra = ["train.deterministic=true", "model2.drop_path=0.1", "checkpoint.keep_last=2"]
    whole = Trainer(tiny_config(tmp_path / "whole", extra=extra + ["train.max_steps=6"]), show_progress=False)
    whole.train()

    first = Trainer(tiny_config(tmp_path / "split", extra=extra + ["train.max_steps=3"]), show_progress=False)
    first.train()  # stops mid-epoch (4 steps per epoch) and checkpoints step 3
    resumed = Trainer(tiny_config(tmp_path / "split", extra=extra + ["train.max_steps=6"]), show_progress=False)
    assert resumed.step == 3
    resumed.train()

    whole_losses, split_losses = read_losses(tmp_path / "whole"), read_losses(tmp_path / "split")
    assert sorted(split_losses) == sorted(whole_losses) == [1, 2, 3, 4, 5, 6]
    assert split_losses == whole_losses
    for mine, reference in zip(resumed.teacher_networks, whole.teacher_networks):
        reference_state = reference.state_dict()
        for key, value in mine.state_dict().items():
            assert torch.equal(value, reference_state[key]), key
    assert torch.equal(resumed.centres.values, whole.centres.values)
    # keep_last=2: steps 4 (end of epoch 1) and 6 remain.
    kept = sorted(p.name for p in (tmp_path / "split" / "checkpoints").iterdir())
    assert kept == ["step_00000004", "step_00000006"]


def test_a_killed_run_resumes_without_duplicate_metrics_and_a_fresh_start_never_overwrites(tmp_path):
    extra = ["checkpoint.every_steps=2", "train.log_every=1"]
    Trainer(tiny_config(tmp_path, extra=extra + ["train.max_steps=3"]), show_progress=False).train()
    # Killed after logging step 3 but before its checkpoint landed: resume from step 2 repeats step 3.
    shutil.rmtree(tmp_path / "checkpoints" / "step_00000003")
    resumed = Trainer(tiny_config(tmp_path, extra=extra + ["train.max_steps=4"]), show_progress=False)
    assert resumed.step == 2
    resumed.train()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]

    config_before = (tmp_path / "config.yaml").read_text()
    with pytest.raises(CheckpointError, match="checkpoint.resume=false"):
        Trainer(tiny_config(tmp_path, extra=extra + ["checkpoint.resume=false", "train.seed=7"]), show_progress=False)
    assert (tmp_path / "config.yaml").read_text() == config_before
