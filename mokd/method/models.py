"""Building the models: N students and their EMA teachers (copies that never receive gradients)."""

from __future__ import annotations

from typing import Optional

import torch

from mokd.method.backbones import Backbone, is_vit
from mokd.method.network import Network


DEFAULT_THEAD_DIM = 384  # ViT-S's width: the official T-Head of the R50-ViT-S pair


def thead_width(config) -> int:
    """The T-Head width D that every model shares (queries cross between them): head.thead_dim if set; else, as
    in the official code (embed_dim = the ViT's width, so the ViT's T-Head needs no input projection), the
    widest ViT of the run; without a ViT, 384."""
    if config.head.thead_dim is not None:
        return config.head.thead_dim
    vit_widths = [Backbone.width_of(model) for model in config.models if is_vit(model.backbone)]
    return max(vit_widths) if vit_widths else DEFAULT_THEAD_DIM


def thead_schedule_source(config, which: int) -> Optional[int]:
    """The model (0-based) whose lr and weight-decay schedules model `which`'s T-Head follows as its own parameter
    group, or None for its own schedules. thead_optim=other: the first ViT among the other models, else the next
    model; auto: the first ViT among the others for a CNN (the official CNN T-Head group of a CNN-ViT pair)."""
    models = config.models
    others = [j for j in range(len(models)) if j != which]
    vits = [j for j in others if is_vit(models[j].backbone)]
    choice = models[which].thead_optim
    if choice == "auto":
        return vits[0] if vits and not is_vit(models[which].backbone) else None
    if choice == "other":
        return vits[0] if vits else (which + 1) % len(models)
    return None


def build_network(config, which: int, in_chans: int, student: bool) -> Network:
    """Model `which` (0-based). Initialisation depends only on the seed and `which`, not on the other models,
    so a run of N models and single-model runs with the same seed start from the same weights."""
    model_config = config.models[which]
    with_thead = config.loss.self_thead or config.loss.cross_search
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.train.seed * 1009 + which)
        return Network(model_config, config.head, in_chans, config.data.global_crop_size,
                       thead_width(config) if with_thead else None,
                       drop_path=model_config.drop_path if student else 0.0)


def make_teacher(config, which: int, in_chans: int, student: Network) -> Network:
    teacher = build_network(config, which, in_chans, student=False)
    teacher.load_state_dict(student.state_dict())
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher


def build_models(config, in_chans: int) -> tuple[tuple[Network, ...], tuple[Network, ...]]:
    """(students, teachers), model1 ... modelN."""
    students = tuple(build_network(config, which, in_chans, student=True) for which in range(len(config.models)))
    teachers = tuple(make_teacher(config, which, in_chans, student) for which, student in enumerate(students))
    return students, teachers
