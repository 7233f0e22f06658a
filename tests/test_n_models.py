"""More than two models: the config's model1 ... modelN sections, and a run of three models from `mokd train`
through evaluation, analysis and export (the objective's N = 3 equations: test_method_losses; N = 3 under ddp,
fsdp and ZeRO-3: test_distributed; N = 2 unchanged: test_n_models_pair_regression)."""

from __future__ import annotations

import json
import pickle

import pytest

from helpers import TINY_RESNET, TINY_VIT, assert_timm_export_round_trips, model_overrides, tiny_config
from literal_eval import agreement, literal_run_predictions
from mokd.config import load_config, save_config, to_yaml
from mokd.engine.resume_check import check_resume
from mokd.errors import ConfigError
from mokd.eval.run_evaluation import format_table
from mokd.launch.cli import main
from mokd.method.models import thead_schedule_source

TINY_THREE = [
    *model_overrides("model1", [*TINY_RESNET[:-1], "width=8"]), *model_overrides("model2", [*TINY_RESNET[:-1], "width=4"]),
    *model_overrides("model3", TINY_VIT), "head.out_dim=64", "head.mlp_hidden_dim=32", "head.mlp_bottleneck_dim=16",
    "head.thead_dim=32", "head.thead_depth=1", "head.thead_heads=2", "data.source=synthetic",
    "data.synthetic_size=16", "data.synthetic_image_size=16", "data.synthetic_channels=1", "data.train_samples=0",
    "data.global_crop_size=16", "data.local_crop_size=8", "data.n_local_crops=2", "data.num_workers=0",
    "train.epochs=1", "train.batch_size=8", "train.log_every=1", "eval.batch_size=16", "eval.image_size=16",
    "eval.max_train_samples=0", "eval.knn_untrained=false", "eval.linear_epochs=3",
    "eval.analysis_attention_images=8", "train.precision=fp32", "perf.channels_last=false",
]


def test_n_models_sections_without_a_gap_are_refused_naming_the_override(tmp_path):
    with pytest.raises(ConfigError, match=r"override 'model4.width=8': model4 is given but model3 is not"):
        tiny_config(tmp_path, extra=["model4.width=8"])


def test_n_models_config_round_trips_through_yaml_and_pickle(tmp_path):
    config = tiny_config(tmp_path, extra=[*model_overrides("model3", TINY_RESNET), "model3.cross_weight=0.25"])
    assert [model.backbone for model in config.models] == ["resnet18", "vit_tiny_patch16_224", "resnet18"]
    text = to_yaml(config)
    top_level = [line.split(":")[0] for line in text.splitlines() if line and not line.startswith(" ")]
    assert top_level[1:4] == ["model1", "model2", "model3"]  # the models together, in order
    save_config(config, tmp_path / "config.yaml")
    again = load_config(str(tmp_path / "config.yaml"))
    assert to_yaml(again) == text and again.model3.cross_weight == 0.25
    copied = pickle.loads(pickle.dumps(config))  # data workers and spawned processes receive the config
    assert copied == config and len(copied.models) == 3


def test_resuming_with_another_number_of_models_is_refused(tmp_path):
    two = tiny_config(tmp_path)
    three = tiny_config(tmp_path, extra=model_overrides("model3", TINY_RESNET))
    with pytest.raises(ConfigError, match=r"it holds 2 models \(model1, model2\) and the configuration asks for 3"):
        check_resume(to_yaml(two), 1, three, 1, "step_00000002")
    check_resume(to_yaml(three), 1, three, 1, "step_00000002")  # the same three: resumable


@pytest.mark.parametrize("backbones,choices,expected", [
    # auto: a CNN follows the first ViT among the other models, a ViT its own schedules
    (("resnet18", "vit_tiny_patch16_224", "resnet18"), ("auto", "auto", "auto"), [1, None, 1]),
    (("resnet18", "resnet18", "resnet18"), ("auto", "auto", "auto"), [None, None, None]),
    # other: the first ViT among the others, else the next model (for a pair: the other model)
    (("resnet18", "resnet18", "vit_tiny_patch16_224"), ("other", "other", "other"), [2, 2, 0]),
    (("resnet18", "resnet18", "resnet18"), ("other", "own", "other"), [1, None, 0]),
])
def test_three_models_thead_schedule_sources(tmp_path, backbones, choices, expected):
    specs = [TINY_VIT if name.startswith("vit") else TINY_RESNET for name in backbones]
    extra = [*model_overrides("model3", specs[2])]
    extra += [f"model{k}.thead_optim={choice}" for k, choice in enumerate(choices, start=1)]
    config = tiny_config(tmp_path, model1=specs[0], model2=specs[1], extra=extra)
    assert [model.backbone for model in config.models] == list(backbones)
    assert [thead_schedule_source(config, which) for which in range(3)] == expected


@pytest.fixture(scope="module")
def three_model_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("three") / "run"
    assert main(["train", "--preset", "demo_three", "--no-progress", f"run_dir={run_dir}", *TINY_THREE]) == 0
    return run_dir


def test_three_models_train_evaluate_and_analyse(three_model_run, capsys):
    results = json.loads((three_model_run / "results.json").read_text())
    predictions, test_labels = literal_run_predictions(three_model_run)
    for which in range(3):
        assert results[f"model{which + 1}"]["knn_top1"] == pytest.approx(agreement(predictions[which], test_labels))
        assert "linear_top1" in results[f"model{which + 1}"]
    rows = [line.split()[0] for line in format_table(results).splitlines() if line.startswith("model")]
    assert rows[1:] == ["model1", "model2", "model3"]  # after the header

    # The pairwise consistency matrix, each entry counted one test image at a time.
    matrix = results["analysis"]["prediction_consistency_matrix"]
    for i in range(3):
        for j in range(3):
            expected = 100.0 if i == j else agreement(predictions[i], predictions[j])
            assert matrix[i][j] == pytest.approx(expected)
    assert len(results["analysis"]["prediction_consistency"]) == 3  # the three pairs
    assert len(results["analysis"]["attention_distance_px"]) == 3

    # Every model's losses were logged: L_cm and L_ct once per other model, named by the teacher's model; none
    # against itself.
    metrics = [json.loads(line) for line in (three_model_run / "metrics.jsonl").read_text().splitlines()]
    logged = {key for record in metrics for key in record if key.startswith("loss/")}
    assert {"loss/model1/cm2", "loss/model1/cm3", "loss/model3/cm1", "loss/model2/ct3", "loss/model3/st"} <= logged
    assert not any(key in logged for key in ("loss/model1/cm", "loss/model1/cm1", "loss/model3/ct3"))  # N > 2 names


def test_three_models_export_any_model_and_refuse_a_missing_one(three_model_run, tmp_path, capsys):
    assert_timm_export_round_trips(three_model_run, 3, tmp_path / "model3.pth")
    assert main(["export", "--run", str(three_model_run), "--model", "4", "--format", "timm",
                 "--out", str(tmp_path / "none.pth")]) == 2
    assert "--model 4" in capsys.readouterr().err
