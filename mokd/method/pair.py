"""Building the pair: two students, their EMA teachers (copies that never receive gradients)."""

from __future__ import annotations

import torch

from mokd.method.network import Network


def build_network(config, which: int, in_chans: int, student: bool) -> Network:
    """Model `which` (0 or 1). Initialisation depends only on the seed and `which`, not on the other model,
    so a pair run and two single-model runs with the same seed start from the same weights."""
    model_config = getattr(config, f"model{which + 1}")
    with_thead = config.loss.self_thead or config.loss.cross_search
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.train.seed * 1009 + which)
        return Network(model_config, config.head, in_chans, config.data.global_crop_size, with_thead,
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
