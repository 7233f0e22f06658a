"""Memory per rank for a preset, strategy and world size, before renting the nodes (`mokd plan`).

Parameter counts come from the real networks (built on the meta device: no memory, no time). Activation
memory is measured, not guessed: training forwards of every student at 2 and 4 images over the preset's crop
set, summing the bytes of every tensor autograd saves for the backward (under the run's autocast dtype), give
a fixed part and a part per image, scaled to the per-device batch. Teacher forwards save nothing (no grad). The model state per rank, with P a student's
parameters (Pt of them trainable), W the world size, s the optimiser's state per parameter (AdamW 8 bytes,
SGD/LARS 4):

    single   4P + 4P (teacher) + 4Pt (grads) + s Pt
    ddp      as single + 4Pt (DDP's gradient buckets)
    fsdp     (4P + 4P + 4Pt + s Pt) / W + the largest unit gathered whole (params + grads)
    zero1    4P + 4P + 4Pt + (s Pt + 4Pt fp32 master partition) / W
    zero2    4P + 4P + (4Pt + s Pt + 4Pt) / W
    zero3    (4P + 4P + 4Pt + s Pt + 4Pt) / W + the largest module gathered whole

Not counted: the CUDA context (~0.5 GB), allocator fragmentation, communication buffers, the data pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mokd.data.sources import SOURCES
from mokd.engine.runtime import autocast, autocast_dtype
from mokd.engine.strategies import strategy_class
from mokd.method.network import Network
from mokd.method.models import build_network

OPTIMIZER_STATE_BYTES = {"adamw": 8, "sgd": 4, "lars": 4}
GIB = 2**30


@dataclass
class ModelCounts:
    parameters: int
    trainable: int
    largest_unit: int  # parameters of the biggest block/head gathered at once under FSDP / ZeRO-3
    optimizer_bytes_per_parameter: int


def _counts(network: Network, optimizer: str) -> ModelCounts:
    units = network.sharding_units()
    unit_ids = {id(p) for unit in units for p in unit.parameters()}
    root = sum(p.numel() for p in network.parameters() if id(p) not in unit_ids)
    largest = max([root] + [sum(p.numel() for p in unit.parameters()) for unit in units])
    return ModelCounts(sum(p.numel() for p in network.parameters()),
                       sum(p.numel() for p in network.parameters() if p.requires_grad), largest,
                       OPTIMIZER_STATE_BYTES[optimizer])


def model_counts(config, in_chans: int) -> list[ModelCounts]:
    counts = []
    for which, model in enumerate(config.models):
        with torch.device("meta"):
            network = build_network(config, which, in_chans, student=True)
        counts.append(_counts(network, model.optim.name))
    return counts


def saved_activation_bytes(config, in_chans: int, device_type: str, images: int) -> int:
    """Bytes autograd saves for the backward of every student's forward over `images` images of the crop set
    (measured on the CPU under the autocast dtype the run would use on `device_type`)."""
    data = config.data
    crops = ([torch.randn(images, in_chans, data.global_crop_size, data.global_crop_size) for _ in range(2)]
             + [torch.randn(images, in_chans, data.local_crop_size, data.local_crop_size)
                for _ in range(data.n_local_crops)])
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor):
        # Parameters are saved by reference (already counted as model state); count each storage once.
        if not isinstance(tensor, nn.Parameter):
            storage = tensor.untyped_storage()
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    dtype = autocast_dtype(config.train.precision, torch.device(device_type))
    total = 0
    for which in range(len(config.models)):
        network = build_network(config, which, in_chans, student=True)
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            with autocast(torch.device("cpu"), dtype):
                output = network(crops)
        total += sum(saved.values())
        del output
    return total


def activation_bytes(config, in_chans: int, device_type: str) -> tuple[int, int]:
    """(fixed bytes, bytes per image) of the saved activations, from measurements at 2 and 4 images: part of
    what the forward saves does not grow with the batch (the weight-normalised last layers' [K, d] weights)."""
    two, four = (saved_activation_bytes(config, in_chans, device_type, images) for images in (2, 4))
    per_image = max(0, (four - two) // 2)
    return max(0, two - 2 * per_image), per_image


def input_channels(data_config) -> int:
    """Image channels of the configured source, without opening it."""
    return SOURCES.get(data_config.source).channels(data_config)


def estimate(config, world_size: int, in_chans: int, activations: tuple[int, int] = (0, 0)) -> dict:
    """Bytes per rank by component for config.parallel.strategy (and zero_stage) at world_size ranks, given the
    measured (fixed, per-image) activation bytes (activation_bytes: the same for every strategy)."""
    layout = strategy_class(config.parallel.strategy).memory_layout(config)
    counts = model_counts(config, in_chans)
    w = world_size
    rows = {"student parameters": 0.0, "teacher parameters": 0.0, "gradients": 0.0, "optimiser state": 0.0,
            "fp32 master partition": 0.0, "gathered unit (transient)": 0.0, "DDP gradient buckets": 0.0}
    for c in counts:
        params, teacher, grads, state = 4 * c.parameters, 4 * c.parameters, 4 * c.trainable, \
            c.optimizer_bytes_per_parameter * c.trainable
        for key, value, shard in zip(("student parameters", "teacher parameters", "gradients", "optimiser state"),
                                     (params, teacher, grads, state), layout.sharded):
            rows[key] += value / w if shard else value
        if layout.master_partition:
            rows["fp32 master partition"] += 4 * c.trainable / w
        if layout.gathers_units and w > 1:
            rows["gathered unit (transient)"] += 8 * c.largest_unit
        if layout.gradient_buckets:
            rows["DDP gradient buckets"] += grads
    activations = activations[0] + activations[1] * config.train.batch_size
    rows = {key: int(value) for key, value in rows.items() if value}
    model_state = sum(rows.values())
    rows["activations"] = activations
    return {"strategy": layout.label, "world_size": world_size, "batch_per_rank": config.train.batch_size,
            "parameters": [c.parameters for c in counts], "rows": rows, "model_state": model_state,
            "total": model_state + activations}


def format_plan(plans: list[dict]) -> str:
    """One column per plan (strategy x world size), one row per component, GiB per rank."""
    keys = [key for key in dict.fromkeys(key for plan in plans for key in plan["rows"]) if key != "activations"]
    keys.append("activations")
    header = f"{'GiB per rank':<28}" + "".join(f"{plan['strategy'] + ' x' + str(plan['world_size']):>14}"
                                               for plan in plans)
    lines = [header, "-" * len(header)]
    for key in keys:
        lines.append(f"{key:<28}" + "".join(f"{plan['rows'].get(key, 0) / GIB:14.2f}" for plan in plans))
    lines.append(f"{'model state':<28}" + "".join(f"{plan['model_state'] / GIB:14.2f}" for plan in plans))
    lines.append(f"{'total':<28}" + "".join(f"{plan['total'] / GIB:14.2f}" for plan in plans))
    return "\n".join(lines)
