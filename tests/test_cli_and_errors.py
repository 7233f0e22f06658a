"""The command line end to end on the synthetic source, TensorBoard read back, and clear errors on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers import tiny_config
from literal_eval import agreement, literal_run_predictions
from mokd.config import ConfigError, load_config
from mokd.engine.checkpoint import COMPLETE_MARKER, CheckpointError
from mokd.engine.trainer import Trainer
from mokd.launch import components  # noqa: F401  (the components' checks, which load_config runs)
from mokd.launch.cli import main

TINY_CLI = [
    "model1.width=8", "model2.width=32", "model2.depth=2", "model2.num_heads=2",
    "head.out_dim=64", "head.mlp_hidden_dim=32", "head.mlp_bottleneck_dim=16", "head.thead_dim=32",
    "head.thead_depth=1", "head.thead_heads=2", "data.source=synthetic", "data.synthetic_size=32",
    "data.synthetic_image_size=16", "data.synthetic_channels=1", "data.global_crop_size=16",
    "data.local_crop_size=8", "data.n_local_crops=2", "data.num_workers=0", "train.epochs=2",
    "train.batch_size=8", "train.log_every=2", "eval.batch_size=16", "eval.image_size=16",
]


def test_cli_trains_end_to_end_and_writes_tensorboard_jsonl_results(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", "--preset", "demo_cnn_vit", "--no-progress", f"run_dir={run_dir}", *TINY_CLI]) == 0
    printed = capsys.readouterr().out
    assert str(run_dir) in printed and "k-NN top-1" in printed

    results = json.loads((run_dir / "results.json").read_text())
    table = {line.split()[0]: line.split() for line in printed.splitlines() if line.startswith(("model1 ", "model2 "))}
    for column, (untrained, key) in enumerate(((True, "knn_top1_untrained"), (False, "knn_top1")), start=2):
        predictions, labels = literal_run_predictions(run_dir, untrained=untrained)
        for which in ("model1", "model2"):
            score = results[which][key]
            assert score == pytest.approx(agreement(predictions[int(which[-1]) - 1], labels)), key
            assert float(table[which][column]) == pytest.approx(score, abs=0.0051), key  # the table the user reads (2 decimals)
    assert results["steps"] == 8
    assert load_config(str(run_dir / "config.yaml")).data.synthetic_size == 32  # resolved config saved

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for which in (1, 2):
        for name in ("sm", "st", "cm", "ct", "total"):
            assert f"loss/model{which}/{name}" in tags
        for name in ("lr", "weight_decay", "teacher_momentum", "teacher_temperature_self", "teacher_temperature_cross"):
            assert f"schedule/model{which}/{name}" in tags
        assert f"grad_norm/model{which}" in tags
        for term in ("sm", "st", "cm", "ct"):
            assert f"collapse/teacher_entropy/model{which}/{term}" in tags
            assert f"collapse/kl_teacher_student/model{which}/{term}" in tags
    assert {"perf/images_per_second", "perf/data_wait_share", "perf/peak_memory_bytes"} <= tags
    steps = [event.step for event in events.Scalars("loss/model1/sm")]
    assert steps == [2, 4, 6, 8]
    jsonl = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in jsonl] == steps
    assert jsonl[-1]["loss/model2/ct"] == pytest.approx(events.Scalars("loss/model2/ct")[-1].value, rel=1e-6)

    assert main(["eval", "knn", "--run", str(run_dir)]) == 0
    again = json.loads((run_dir / "results.json").read_text())
    assert again["model1"]["knn_top1"] == pytest.approx(results["model1"]["knn_top1"])


def test_help_documents_every_option_and_preset(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = capsys.readouterr().out
    for text in ("model1.optim.base_lr", "loss.search_pairing", "data.n_local_crops", "r101_vit_b", "demo",
                 "vit_s_vit_t", "checkpoint.keep_last", "`deepspeed`: DeepSpeed ZeRO"):  # the last: a registered choice
        assert text in help_text


def test_unknown_config_key_is_refused_with_its_name(tmp_path, capsys):
    assert main(["train", f"run_dir={tmp_path}", "train.epocs=3"]) == 2
    assert "train.epocs" in capsys.readouterr().err
    assert not (tmp_path / "config.yaml").exists()  # refused before anything was written
    with pytest.raises(ConfigError, match="model2.optim.nmae"):
        load_config("demo", ["model2.optim.nmae=sgd"])


@pytest.mark.parametrize("overrides,message", [
    (["model1.backbone=resnet152"], "model1.backbone"),
    (["model2.width=99"], "model2.width"),  # 99 is not divisible by the ViT's 2 heads
    (["model1.depth=4"], "model1.depth"),  # depth is a ViT option, model1 is a ResNet
    (["data.n_local_crops=0"], "n_local_crops"),  # the official search pairs local crops
    (["head.thead_dim=99"], "head.thead_dim"),  # not divisible by the 2 T-Head heads
    (["loss.search_pairing=sideways"], "loss.search_pairing"),
    (["parallel.strategy=horovod"], "parallel.strategy"),
    (["parallel.strategy=deepspeed", "parallel.zero_stage=4"], "parallel.zero_stage"),
    (["parallel.strategy=deepspeed", "model1.optim.name=lars"], "model1.optim.name=lars"),
    (["parallel.strategy=deepspeed", "train.precision=fp16"], "train.precision=fp16"),
])
def test_impossible_pairs_are_refused_before_training(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("demo_cnn_vit", overrides)


def test_components_check_the_config_in_a_fresh_process_before_any_work(tmp_path):
    """The schema imports no component; the launch commands load the components' checks themselves: `mokd config`
    imports nothing else that would, and `mokd train` refuses before it writes into the run directory."""
    script = (
        "import sys\n"
        "from mokd.launch.cli import main\n"
        "assert main(['config', 'model1.backbone=resnet152']) == 2\n"
        "assert main(['train', f'run_dir={sys.argv[1]}', 'loss.kernel=native']) == 2\n"
    )
    run_dir = tmp_path / "run"
    env = {**os.environ, "MOKD_NATIVE_LIBRARY": str(tmp_path / "missing.so")}
    result = subprocess.run([sys.executable, "-c", script, str(run_dir)], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "model1.backbone='resnet152' is not one of" in result.stderr
    assert "loss.kernel=native needs the native CPU kernels" in result.stderr
    assert not run_dir.exists()


def test_missing_dataset_says_how_to_install_it(tmp_path, capsys):
    empty = tmp_path / "nothing-here"
    empty.mkdir()
    code = main(["train", f"run_dir={tmp_path / 'run'}", f"data.root={empty}"])
    error = capsys.readouterr().err
    assert code == 2
    assert "apt-get install dataset-fashion-mnist" in error and str(empty) in error


def test_unreadable_checkpoint_is_named_and_an_incomplete_one_ignored(tmp_path, capsys):
    config = tiny_config(tmp_path, extra=["train.max_steps=2", "checkpoint.every_steps=1"])
    Trainer(config, show_progress=False).train()
    checkpoints = tmp_path / "checkpoints"
    newest = checkpoints / "step_00000002"
    # A checkpoint killed mid-write (no completion marker) is ignored: resume takes step 2.
    partial = checkpoints / "step_00000003"
    partial.mkdir()
    (partial / "meta.pt").write_bytes(b"half a file")
    assert Trainer(config, show_progress=False).step == 2

    (newest / "meta.pt").write_bytes(b"not a checkpoint")
    capsys.readouterr()
    assert Trainer(config, show_progress=False).step == 1  # falls back, naming the file
    assert str(newest / "meta.pt") in capsys.readouterr().err
    strict = tiny_config(tmp_path, extra=["train.max_steps=2", "checkpoint.every_steps=1", "checkpoint.fallback=false"])
    with pytest.raises(CheckpointError, match=str(newest / "meta.pt")):
        Trainer(strict, show_progress=False)
    assert (newest / COMPLETE_MARKER).exists()  # nothing was deleted behind the user's back
