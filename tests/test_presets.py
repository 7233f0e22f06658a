"""Every ImageNet preset runs one full training step on CPU at full model size (K = 65536 heads included)."""

from __future__ import annotations

import json
import math

import pytest

from mokd.config import list_presets, load_config
from mokd.engine.trainer import Trainer

IMAGENET_PRESETS = [name for name in list_presets() if not name.startswith("demo")]


def test_the_paper_pairs_are_all_there():
    assert set(IMAGENET_PRESETS) == {"r50_vit_s", "r50_vit_b", "r101_vit_b", "r50_r18", "r50_r34", "r101_r34",
                                     "vit_s_vit_t"}


@pytest.mark.parametrize("preset", IMAGENET_PRESETS)
def test_imagenet_preset_takes_one_full_size_step(tmp_path, preset):
    config = load_config(preset, [
        f"run_dir={tmp_path}", "data.source=synthetic", "data.synthetic_size=2", "data.synthetic_image_size=224",
        "data.num_workers=0", "train.batch_size=2", "train.max_steps=1", "checkpoint.enabled=false",
        "model1.optim.warmup_epochs=0", "model2.optim.warmup_epochs=0",
    ])
    assert config.head.out_dim == 65536 and config.data.n_local_crops == 8
    trainer = Trainer(config, show_progress=False)
    trainer.train()
    assert trainer.step == 1
    for student in trainer.students:
        assert student.mlp_head.last_layer.weight_v.shape == (65536, 256)
        # The T-Head is as wide as the pair's ViT (official: 768 for ViT-B), 384 for two CNNs.
        width = 768 if preset.endswith("vit_b") else 384
        assert student.thead.last_layer.weight_v.shape == (65536, width)
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert all(math.isfinite(last[f"loss/model{w}/{t}"]) for w in (1, 2) for t in ("sm", "st", "cm", "ct"))
