"""Which modules of a network become FSDP2 units (and the units `mokd plan` counts as gathered whole): the blocks
of the backbone and the MLP-Head, never the T-Head. The expected names are written out here, so that renaming a
block class or moving a module cannot silently change the sharding."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from helpers import TINY_RESNET, TINY_VIT, tiny_config
from mokd.engine.distributed import World
from mokd.engine.strategies.fsdp import FSDPStrategy
from mokd.method.models import build_models

TINY_RESNET50 = ["backbone=resnet50", "small_image=true", "width=8"]


def blocks(prefix: str, counts: dict[str, int]) -> list[str]:
    return [f"backbone.net.{prefix}{stage}.{index}" for stage, count in counts.items() for index in range(count)]


RESNET18_UNITS = blocks("layer", {"1": 2, "2": 2, "3": 2, "4": 2}) + ["mlp_head"]
RESNET50_UNITS = blocks("layer", {"1": 3, "2": 4, "3": 6, "4": 3}) + ["mlp_head"]
VIT_UNITS = ["backbone.net.blocks.0", "backbone.net.blocks.1", "mlp_head"]  # TINY_VIT has depth 2


def unit_names(network: torch.nn.Module) -> list[str]:
    names = {id(module): name for name, module in network.named_modules()}
    return [names[id(unit)] for unit in network.sharding_units()]


@pytest.mark.parametrize("model1, model2, expected", [
    (TINY_RESNET, TINY_VIT, (RESNET18_UNITS, VIT_UNITS)),
    (TINY_RESNET50, TINY_RESNET, (RESNET50_UNITS, RESNET18_UNITS)),
], ids=["resnet18_vit", "resnet50_resnet18"])
def test_sharding_units_are_the_backbone_blocks_and_the_mlp_head(tmp_path, model1, model2, expected):
    students, teachers = build_models(tiny_config(tmp_path, model1, model2), in_chans=1)
    for student, teacher, names in zip(students, teachers, expected):
        assert student.thead is not None  # present, and not a unit of its own
        assert unit_names(student) == names
        assert unit_names(teacher) == names


def test_sharding_units_are_what_fsdp2_wraps(tmp_path):
    """One gloo process (a legal FSDP2 world): the fsdp strategy's wrap makes exactly the declared units, plus the
    root, FSDP2 modules, in the students and the teachers alike."""
    config = tiny_config(tmp_path, extra=["parallel.strategy=fsdp"])
    students, teachers = build_models(config, in_chans=1)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        FSDPStrategy(config, World(0, 1, 0, torch.device("cpu")), None).wrap(students, teachers)
    finally:
        dist.destroy_process_group()
    for network, names in zip((*students, *teachers), (RESNET18_UNITS, VIT_UNITS) * 2):
        wrapped = [name for name, module in network.named_modules() if isinstance(module, FSDPModule)]
        assert wrapped == ["", *names]
