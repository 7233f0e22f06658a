"""Small configurations shared by the tests: narrow networks, synthetic data, a few steps."""

from __future__ import annotations

import math
from pathlib import Path

from mokd.config import MOKDConfig, load_config

TINY_RESNET = ["backbone=resnet18", "small_image=true", "width=8"]
TINY_VIT = ["backbone=vit_tiny_patch16_224", "small_image=true", "width=32", "depth=2", "num_heads=2"]


def model_overrides(which: str, spec: list[str]) -> list[str]:
    return [f"{which}.{item}" for item in spec]


def tiny_config(run_dir: Path, model1: list[str] = TINY_RESNET, model2: list[str] = TINY_VIT,
                extra: list[str] = ()) -> MOKDConfig:
    """A CNN-ViT pair (by default) small enough for a CPU step in well under a second."""
    overrides = [
        f"run_dir={run_dir}",
        *model_overrides("model1", model1), *model_overrides("model2", model2),
        "head.out_dim=64", "head.mlp_hidden_dim=32", "head.mlp_bottleneck_dim=16",
        "head.thead_dim=32", "head.thead_depth=1", "head.thead_heads=2",
        "data.source=synthetic", "data.synthetic_size=32", "data.synthetic_image_size=16",
        "data.synthetic_channels=1", "data.global_crop_size=16", "data.local_crop_size=8",
        "data.n_local_crops=2", "data.num_workers=0",
        "train.epochs=2", "train.batch_size=8", "train.log_every=1",
        "model1.optim.warmup_epochs=1", "model2.optim.warmup_epochs=1",
        "eval.knn_at_end=false", "eval.batch_size=16", "eval.image_size=16",
        # The tests' numerical bounds are set for fp32; auto picks bf16 on CPUs with bf16 matrix units, which
        # would make the results depend on the machine running the tests.
        "train.precision=fp32",
        *extra,
    ]
    return load_config(None, overrides)


# Reference schedules, written from their formulas (DINO's utils.cosine_scheduler and DINOLoss temperature schedule),
# for tests to hold the engine's precomputed schedules against.

def warmup_cosine(base: float, final: float, total_steps: int, warmup_steps: int = 0) -> list[float]:
    """Linear warm-up from 0 (base * t / warmup_steps: the peak is reached at the first cosine step), then
    final + (base - final) (1 + cos(pi t' / T')) / 2 over the T' remaining steps, t' counted from the warm-up's end."""
    values = []
    for t in range(total_steps):
        if t < warmup_steps:
            values.append(base * t / warmup_steps)
        else:
            progress = (t - warmup_steps) / (total_steps - warmup_steps)
            values.append(final + 0.5 * (base - final) * (1 + math.cos(math.pi * progress)))
    return values


def linear_then_constant(start: float, end: float, total_steps: int, warmup_steps: int) -> list[float]:
    """start + (end - start) t / warmup_steps during the warm-up, end after it (teacher temperature)."""
    return [start + (end - start) * t / warmup_steps if t < warmup_steps else end for t in range(total_steps)]


def assert_timm_export_round_trips(run_dir: Path, number: int, out: Path) -> None:
    """`mokd export --model K --format timm` writes a state dict that loads with strict=True into the stock timm
    model and computes the same features as the run's teacher backbone K (16 px, one channel: the tests' runs)."""
    import torch

    from mokd.eval.export import stock_timm_model
    from mokd.eval.run_evaluation import load_run
    from mokd.launch.cli import main

    assert main(["export", "--run", str(run_dir), "--model", str(number), "--format", "timm", "--out", str(out)]) == 0
    config, teachers, _ = load_run(run_dir)
    stock = stock_timm_model(config.models[number - 1], 1, 16).eval()
    stock.load_state_dict(torch.load(out), strict=True)
    images = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(stock(images), teachers[number - 1].backbone.eval()(images).pooled)
