"""Building the pair: two students, their EMA teachers (copies that never receive gradients)."""

from __future__ import annotations

import torch

from mokd.method.backbones import Backbone, is_vit
from mokd.method.network import Network


DEFAULT_THEAD_DIM = 384  # ViT-S's width: the official T-Head of the R50-ViT-S pair


def thead_width(config) -> int:
    """The T-Head width D that both models share (queries cross between them): head.thead_dim if set; else, as
    in the official code (embed_dim = the ViT's width, so the ViT's T-Head needs no input projection), the
    widest ViT of the pair; for two CNNs, 384."""
    if config.head.thead_dim is not None:
        return config.head.thead_dim
    vit_widths = [Backbone.width_of(model) for model in (config.model1, config.model2) if is_vit(model.backbone)]
    return max(vit_widths) if vit_widths else DEFAULT_THEAD_DIM


def thead_follows_other(config, which: int) -> bool:
    """Whether model `which`'s T-Head is its own parameter group on the other model's lr and weight-decay
    schedules: thead_optim=other, or auto for a CNN paired with a ViT (the official CNN T-Head group)."""
    models = (config.model1, config.model2)
    choice = models[which].thead_optim
    if choice == "auto":
        return not is_vit(models[which].backbone) and is_vit(models[1 - which].backbone)
    return choice == "other"


def build_network(config, which: int, in_chans: int, student: bool) -> Network:
    """Model `which` (0 or 1). Initialisation depends only on the seed and `which`, not on the other model,
    so a pair run and two single-model runs with the same seed start from the same weights."""
    model_config = getattr(config, f"model{which + 1}")
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


def build_pair(config, in_chans: int) -> tuple[tuple[Network, Network], tuple[Network, Network]]:
    students = tuple(build_network(config, which, in_chans, student=True) for which in (0, 1))
    teachers = tuple(make_teacher(config, which, in_chans, students[which]) for which in (0, 1))
    return students, teachers
