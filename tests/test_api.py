"""`mokd.train(...)`, the Python entry point: the same configuration, validation and errors as `mokd train`, and
the run's directory and scores handed back."""

from __future__ import annotations

import json

import pytest

from literal_eval import agreement, literal_run_predictions
import mokd
from mokd.errors import ConfigError

SMALL_DEMO = {"train.max_steps": 2, "train.batch_size": 8, "data.train_samples": 32, "data.num_workers": 0,
              "train.log_every": 1, "checkpoint.every_steps": 0, "eval.max_train_samples": 64, "data.validation_samples": 64, "eval.split": "validation",
              "eval.linear_at_end": False, "eval.analysis_at_end": False,
              "eval.knn_untrained": False, "train.threads": 1, "train.precision": "fp32"}


def test_train_from_python_returns_the_run_and_its_scores(tmp_path):
    lines = []
    run = mokd.train(preset="demo", overrides={**SMALL_DEMO, "run_dir": str(tmp_path / "run")}, report=lines.append)
    assert run.run_dir == (tmp_path / "run").resolve() and run.steps == 2 and not run.stopped_by_signal
    assert run.results == json.loads((tmp_path / "run" / "results.json").read_text())
    predictions, labels = literal_run_predictions(run.run_dir, "validation")
    for which in range(2):
        assert run.results[f"model{which + 1}"]["knn_top1"] == pytest.approx(agreement(predictions[which], labels))
    assert lines[0].startswith("run directory:") and any("k-NN" in line for line in lines), lines
    # The list form of the overrides is the command line's, and a second call resumes the finished run.
    command_line = [f"{key}={value}" for key, value in {**SMALL_DEMO, "run_dir": tmp_path / "run"}.items()]
    again = mokd.train("demo", [item.replace("False", "false") for item in command_line])
    assert again.steps == 2 and again.results["model1"]["knn_top1"] == run.results["model1"]["knn_top1"]


def test_train_from_python_refuses_a_bad_key_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="train.epoch"):
        mokd.train(preset="demo", overrides={"train.epoch": 1, "run_dir": str(tmp_path / "run")})
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="model1.backbone='resnet5' is not one of resnet18"):  # a registry's choice
        mokd.train(preset="demo", overrides={"model1.backbone": "resnet5", "run_dir": str(tmp_path / "run")})
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="nope"):
        mokd.train(preset="nope")
