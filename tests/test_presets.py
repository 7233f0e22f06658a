"""Every ImageNet preset builds its full-size pair (K = 65536 heads, 224 px globals, 8 locals of 96 px) on the meta
device, with the shapes and parameter counts the paper's architectures have; one shrunk preset trains a real step."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mokd.config import list_presets, load_config
from mokd.engine.trainer import Trainer
from mokd.method.models import build_network

IMAGENET_PRESETS = [name for name in list_presets() if not name.startswith("demo")]
PAIRS = {"r50_vit_s": ("resnet50", "vit_small_patch16_224"), "r50_vit_b": ("resnet50", "vit_base_patch16_224"),
         "r101_vit_b": ("resnet101", "vit_base_patch16_224"), "r50_r18": ("resnet50", "resnet18"),
         "r50_r34": ("resnet50", "resnet34"), "r101_r34": ("resnet101", "resnet34"),
         "vit_s_vit_t": ("vit_small_patch16_224", "vit_tiny_patch16_224")}
# Published ImageNet-1k parameter counts of the architectures, less their 1000-class classifier (width x 1000
# weights + 1000 biases): the backbones are headless.
BACKBONE_PARAMETERS = {
    "resnet18": 11_689_512 - 513_000, "resnet34": 21_797_672 - 513_000, "resnet50": 25_557_032 - 2_049_000,
    "resnet101": 44_549_160 - 2_049_000, "vit_tiny_patch16_224": 5_717_416 - 193_000,
    "vit_small_patch16_224": 22_050_664 - 385_000, "vit_base_patch16_224": 86_567_656 - 769_000,
}
WIDTHS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048, "vit_tiny_patch16_224": 192,
          "vit_small_patch16_224": 384, "vit_base_patch16_224": 768}
K = 65536


def mlp_head_parameters(width: int) -> int:
    """Linear(C, 2048)-GELU-Linear(2048, 2048)-GELU-Linear(2048, 256), weight-normalised Linear(256, K) (direction
    K x 256 and one norm per output)."""
    return width * 2048 + 2048 + 2048 * 2048 + 2048 + 2048 * 256 + 256 + K * 256 + K


def test_the_paper_pairs_are_all_there():
    assert set(IMAGENET_PRESETS) == set(PAIRS)


@pytest.mark.parametrize("preset", IMAGENET_PRESETS)
def test_imagenet_preset_pair_has_the_paper_shapes_on_the_meta_device(tmp_path, preset):
    config = load_config(preset, [f"run_dir={tmp_path}", "data.source=synthetic"])
    assert config.head.out_dim == K and config.data.n_local_crops == 8
    backbones = PAIRS[preset]
    vit_widths = [WIDTHS[name] for name in backbones if name.startswith("vit")]
    thead_width = max(vit_widths) if vit_widths else 384  # the pair's widest ViT (official); 384 for two CNNs
    crops = [torch.empty(2, 3, 224, 224, device="meta")] * 2 + [torch.empty(2, 3, 96, 96, device="meta")] * 8
    for which, name in enumerate(backbones):
        with torch.device("meta"):
            network = build_network(config, which, 3, student=True)
        assert sum(p.numel() for p in network.backbone.parameters()) == BACKBONE_PARAMETERS[name]
        assert sum(p.numel() for p in network.mlp_head.parameters()) == mlp_head_parameters(WIDTHS[name])
        out = network(crops)
        width, stride = WIDTHS[name], 16 if name.startswith("vit") else 32
        assert out.pooled.shape == (20, width)  # 2 globals + 8 locals of 2 images
        # One backbone pass per resolution: the 2 x 2 globals on a 224 / stride grid, the 8 x 2 locals on 96 / stride.
        assert [(tuple(f.tokens.shape), f.grid) for f in out.features] == [
            ((4, (224 // stride) ** 2, width), (224 // stride,) * 2),
            ((16, (96 // stride) ** 2, width), (96 // stride,) * 2)]
        assert out.mlp_logits.shape == out.thead_logits.shape == (20, K)
        assert out.queries.shape == (20, thead_width)
        assert network.thead.last_layer.weight_v.shape == (K, thead_width)


def test_a_shrunk_imagenet_preset_trains_one_real_step(tmp_path):
    """r50_vit_s's recipe (SGD for the CNN, AdamW for the ViT, clipping, the first-epoch freeze of the last layers)
    on a tiny pair and tiny crops: one step moves the backbones and leaves the frozen last layers alone."""
    config = load_config("r50_vit_s", [
        f"run_dir={tmp_path}", "model1.backbone=resnet18", "model1.small_image=true", "model1.width=8",
        "model2.backbone=vit_tiny_patch16_224", "model2.small_image=true", "model2.width=32", "model2.depth=2",
        "model2.num_heads=2", "head.out_dim=64", "head.mlp_hidden_dim=32", "head.mlp_bottleneck_dim=16",
        "head.thead_dim=32", "head.thead_depth=1", "head.thead_heads=2", "data.source=synthetic",
        "data.synthetic_size=4", "data.synthetic_image_size=16", "data.global_crop_size=16",
        "data.local_crop_size=8", "data.n_local_crops=2", "data.num_workers=0", "train.batch_size=4",
        "train.max_steps=1", "train.precision=fp32", "checkpoint.enabled=false",
        "model1.optim.warmup_epochs=0", "model2.optim.warmup_epochs=0",
    ])
    trainer = Trainer(config, show_progress=False)

    def snapshot(student):
        last_layers = [p.detach().clone() for layer in student.last_layers() for p in layer.parameters()]
        return [p.detach().clone() for p in student.backbone.parameters()], last_layers

    before = [snapshot(student) for student in trainer.student_networks]
    trainer.train()
    assert trainer.step == 1
    for student, (backbone, last_layers) in zip(trainer.student_networks, before):
        backbone_after, last_layers_after = snapshot(student)
        assert not all(torch.equal(a, b) for a, b in zip(backbone_after, backbone))
        assert len(last_layers) == 4  # both heads' weight-normalised layers: direction and norm
        assert all(torch.equal(a, b) for a, b in zip(last_layers_after, last_layers))
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert all(math.isfinite(last[f"loss/model{w}/{t}"]) for w in (1, 2) for t in ("sm", "st", "cm", "ct"))
