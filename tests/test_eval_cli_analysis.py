"""`mokd train` ends with k-NN, linear probe and analysis plots; eval linear/finetune/analyse and export end to end."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers import assert_timm_export_round_trips
from literal_eval import agreement, literal_run_predictions
from mokd.config import load_config
from mokd.launch.cli import main

TINY_RUN = [
    "model1.backbone=resnet18", "model1.small_image=true", "model1.width=8",
    "model2.backbone=vit_tiny_patch16_224", "model2.zero_init_last_bn=false",  # (the demo preset's ResNet setting)
    "model2.small_image=true", "model2.width=32", "model2.depth=2",
    "model2.num_heads=2", "head.out_dim=64", "head.mlp_hidden_dim=32", "head.mlp_bottleneck_dim=16",
    "head.thead_dim=32", "head.thead_depth=1", "head.thead_heads=2", "data.source=synthetic",
    "data.synthetic_size=16", "data.synthetic_image_size=16", "data.synthetic_channels=1",
    "data.global_crop_size=16", "data.local_crop_size=8", "data.n_local_crops=2", "data.num_workers=0",
    "train.epochs=1", "train.batch_size=8", "train.log_every=5", "eval.batch_size=16", "eval.image_size=16",
    "eval.knn_untrained=false", "eval.linear_epochs=5", "eval.analysis_attention_images=8",
    "eval.finetune_epochs=1", "eval.finetune_batch_size=4",
]
FIGURES = ("prediction_consistency.png", "attention_distance.png", "feature_tsne.png")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("eval") / "run"
    assert main(["train", "--preset", "demo", "--no-progress", f"run_dir={run_dir}", *TINY_RUN]) == 0
    return run_dir


def assert_whole_images(top1: float, images: int) -> None:
    """A top-1 in percent of `images` test images is a whole number of them."""
    assert top1 * images / 100 == pytest.approx(round(top1 * images / 100), abs=1e-6), top1


def assert_readable_png(path):
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20  # drawn on, not a blank canvas


def test_train_ends_with_knn_linear_probe_and_plots(trained_run, capsys):
    results = json.loads((trained_run / "results.json").read_text())
    predictions, test_labels = literal_run_predictions(trained_run)
    for which in range(2):
        row = results[f"model{which + 1}"]
        assert row["knn_top1"] == pytest.approx(agreement(predictions[which], test_labels))
        assert_whole_images(row["linear_top1"], len(test_labels))
    assert results["linear"]["epochs"] == 5
    analysis = results["analysis"]
    assert analysis["prediction_consistency"] == {
        "model1: resnet18 (width 8) vs model2: vit_tiny_patch16_224 (width 32)": pytest.approx(
            agreement(*predictions))}
    assert len(analysis["attention_distance_px"]["model1: resnet18 (width 8)"]) == 4  # four ResNet stages
    assert len(analysis["attention_distance_px"]["model2: vit_tiny_patch16_224 (width 32)"]) == 2  # two blocks
    for name in FIGURES:
        assert_readable_png(trained_run / "analysis" / name)
    events = EventAccumulator(str(trained_run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert {f"analysis/{name[:-4]}" for name in FIGURES} <= set(events.Tags()["images"])


def test_eval_linear_finetune_and_analyse_commands(trained_run, capsys):
    (first, second), test_labels = literal_run_predictions(trained_run)
    assert main(["eval", "linear", "--run", str(trained_run), "eval.linear_epochs=3"]) == 0
    assert "linear" in capsys.readouterr().out
    assert json.loads((trained_run / "results.json").read_text())["linear"]["epochs"] == 3

    assert main(["eval", "finetune", "--run", str(trained_run), "--fraction", "0.1"]) == 0
    assert "finetune_10pct" in capsys.readouterr().out
    results = json.loads((trained_run / "results.json").read_text())
    assert results["finetune_10pct"]["labels"] == 10  # 10 % of 16 images rounds to 0: at least one per class
    assert_whole_images(results["model2"]["finetune_10pct_top1"], len(test_labels))
    assert "knn_top1" in results["model1"]  # merged, not overwritten

    for name in FIGURES:
        (trained_run / "analysis" / name).unlink()
    assert main(["eval", "analyse", "--run", str(trained_run), "--reference-run", str(trained_run)]) == 0
    assert "prediction consistency" in capsys.readouterr().out
    consistency = json.loads((trained_run / "results.json").read_text())["analysis"]["prediction_consistency"]
    # This pair, the reference pair (the same run here), each model against its reference (itself).
    m1, m2 = "model1: resnet18 (width 8)", "model2: vit_tiny_patch16_224 (width 32)"
    assert consistency == {f"{m1} vs {m2}": pytest.approx(agreement(first, second)),
                           f"reference {m1} vs reference {m2}": pytest.approx(agreement(first, second)),
                           f"{m1} vs reference {m1}": 100.0, f"{m2} vs reference {m2}": 100.0}
    for name in FIGURES:
        assert_readable_png(trained_run / "analysis" / name)


def test_export_command_round_trips_through_the_stock_model(trained_run, tmp_path):
    assert_timm_export_round_trips(trained_run, 2, tmp_path / "model2.pth")

    d2 = tmp_path / "model1.pkl"
    assert main(["export", "--run", str(trained_run), "--model", "1", "--format", "detectron2", "--out", str(d2)]) == 0
    with open(d2, "rb") as handle:
        assert "res5.1.conv2.norm.weight" in pickle.load(handle)["model"]
    assert main(["export", "--run", str(trained_run), "--model", "2", "--format", "detectron2",
                 "--out", str(tmp_path / "vit.pkl")]) == 2  # a ViT has no detectron2 ResNet form: a clean error
    assert load_config(str(trained_run / "config.yaml")).eval.linear_at_end
