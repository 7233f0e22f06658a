"""The two-model losses, gradients and checkpoint layout pinned before the N-model refactor (issue 29).

Each two-model family (CNN-CNN, CNN-ViT, ViT-ViT), with settings away from the defaults (Sinkhorn-Knopp targets,
lambda other than 1, a term weight, BatchNorm in the MLP-Heads), trains a few fp32 steps at a fixed seed. Every
logged loss term, every student's parameters after the steps (their sum and sum of squares, which every gradient
reaches) and the names in each checkpoint file must equal what the code recorded on 2026-12-03 (main 998d289), so
a refactor that changes any of them, for N = 2, fails here. After a deliberate change of the method, record anew:

    python tests/test_n_models_pair_regression.py --record
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from helpers import TINY_RESNET, TINY_VIT, tiny_config
from mokd.engine.checkpoint import read_checkpoint_file
from mokd.engine.trainer import Trainer

RECORD = Path(__file__).parent / "data" / "n_models_pair_record.json"
FAMILIES = {
    "cnn_cnn": (TINY_RESNET, ["backbone=resnet18", "small_image=true", "width=4"],
                ["loss.centring=sinkhorn_knopp", "model2.cross_weight=0.3"]),
    "cnn_vit": (TINY_RESNET, TINY_VIT, ["model1.cross_weight=0.1", "model2.term_weights.st=0.5"]),
    "vit_vit": (TINY_VIT, ["backbone=vit_tiny_patch16_224", "small_image=true", "width=16", "depth=2",
                           "num_heads=2"], ["head.mlp_batchnorm=true", "loss.search_pairing=global_to_global"]),
}
STEPS = 4


def observe(run_dir: Path, family: str) -> dict:
    """Losses per logged step, the students' parameter sums after STEPS steps, and each checkpoint file's keys."""
    model1, model2, extra = FAMILIES[family]
    config = tiny_config(run_dir, model1, model2, [*extra, f"train.max_steps={STEPS}", "train.seed=3"])
    trainer = Trainer(config, show_progress=False)
    trainer.train()
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [{key: value for key, value in line.items() if key.startswith("loss/")} for line in lines]
    parameters = {}
    for which, student in enumerate(trainer.student_networks, start=1):
        flat = torch.cat([p.detach().double().flatten() for p in student.parameters()])
        parameters[f"model{which}"] = [float(flat.sum()), float((flat * flat).sum())]
    checkpoint = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    files = {}
    for path in sorted(checkpoint.glob("*.pt")):
        content = read_checkpoint_file(path)
        files[path.name] = sorted(key_names(content))
    files["dcp"] = sorted(FileSystemReader(str(checkpoint / "dcp")).read_metadata().state_dict_metadata)
    return {"losses": losses, "parameters": parameters, "checkpoint_files": files}


def key_names(content, prefix: str = "") -> list[str]:
    """Dotted names of every leaf of nested dicts and lists (a tensor or a plain value is a leaf)."""
    if isinstance(content, dict):
        return [name for key, value in content.items() for name in key_names(value, f"{prefix}{key}.")]
    if isinstance(content, (list, tuple)) and content and isinstance(content[0], (dict, list, tuple)):
        return [name for index, value in enumerate(content) for name in key_names(value, f"{prefix}{index}.")]
    return [prefix.rstrip(".")]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_n_models_two_model_losses_parameters_and_checkpoints_are_as_recorded(tmp_path, family):
    recorded = json.loads(RECORD.read_text())[family]
    seen = observe(tmp_path / family, family)
    assert seen["checkpoint_files"] == recorded["checkpoint_files"]
    assert [sorted(step) for step in seen["losses"]] == [sorted(step) for step in recorded["losses"]]
    for step, (now, then) in enumerate(zip(seen["losses"], recorded["losses"])):
        for name, value in then.items():
            # 1e-4 relative: thread counts reorder fp32 sums (~1e-6); any change of a term, weight or target is far
            # larger
            assert now[name] == pytest.approx(value, rel=1e-4, abs=1e-6), (step, name)
    for which, (total, squares) in recorded["parameters"].items():
        assert seen["parameters"][which] == pytest.approx([total, squares], rel=1e-5), which


if __name__ == "__main__" and sys.argv[1:] == ["--record"]:
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        RECORD.parent.mkdir(exist_ok=True)
        RECORD.write_text(json.dumps({family: observe(Path(scratch) / family, family) for family in sorted(FAMILIES)},
                                     indent=1) + "\n")
    print(f"recorded {RECORD}")
