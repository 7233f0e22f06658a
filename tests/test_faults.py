"""Faults of one training process, made real: signals to a running `mokd train`, `kill -9`, a second process on
the same run directory, a diverging run, fp16 overflow, corrupted checkpoint files, resumes with changed keys,
bad values, a full disk, missing and corrupt shards, and evaluation results merged across commands."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fault_helpers import Run, checkpoint_steps, child_env, logged_steps, wait_for_step, write_preset
from helpers import tiny_config
from mokd.config import save_config
from mokd.engine.trainer import Trainer
from mokd.errors import CheckpointError, ConfigError
from mokd.launch.cli import main

# 100 steps per epoch (800 images, batch 8) and checkpoint.every_steps=0: without a stop signal nothing is
# saved before the end, as with `make demo`.
LONG_EPOCH = ["data.synthetic_size=800", "train.epochs=1", "checkpoint.every_steps=0", "train.deterministic=true",
              "train.max_steps=24", "checkpoint.keep_last=2"]


def teachers_of(checkpoint: Path) -> list[dict]:
    return torch.load(checkpoint / "teachers.pt", weights_only=False)


def assert_bit_identical(mine: list[dict], reference: list[dict]) -> None:
    for state, expected in zip(mine, reference):
        assert state.keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(state[key], value), key


def losses(run_dir: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("loss/")} for r in records}


def test_signals_kill_and_a_second_process_lose_nothing_and_resume_bit_identically(tmp_path):
    preset = write_preset(tmp_path / "tiny.yaml", LONG_EPOCH)
    reference_dir, run_dir = tmp_path / "reference", tmp_path / "run"
    reference = Run.train(preset, reference_dir, logs=tmp_path / "logs-reference")  # uninterrupted, alongside

    saved = [0]
    for number in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        run = Run.train(preset, run_dir, logs=tmp_path / f"logs-{number.name}")
        wait_for_step(run, run_dir, saved[-1] + 2)
        run.process.send_signal(number)
        code, out, err = run.wait()
        step = logged_steps(run_dir)[-1]
        assert code == 0, err
        assert f"saved step_{step:08d} on {number.name}" in out  # every step taken is in the checkpoint
        assert checkpoint_steps(run_dir)[-1] == step
        assert "Traceback" not in err and "torch.distributed is disabled" not in out + err
        if saved[-1]:
            assert f"resuming from step_{saved[-1]:08d}" in out
        saved.append(step)

    # SIGINT twice: stop at once, one line, nothing written.
    run = Run.train(preset, run_dir, logs=tmp_path / "logs-double")
    wait_for_step(run, run_dir, saved[-1] + 2)
    run.process.send_signal(signal.SIGINT)
    time.sleep(0.02)  # two signals sent at once arrive as one
    run.process.send_signal(signal.SIGINT)
    code, out, err = run.wait()
    assert code == 130 and "interrupted twice" in err and "Traceback" not in err
    assert checkpoint_steps(run_dir)[-1] == saved[-1]

    # kill -9: the lock's holder is gone; the next start takes it over and says so.
    run = Run.train(preset, run_dir, logs=tmp_path / "logs-kill")
    wait_for_step(run, run_dir, logged_steps(run_dir)[-1] + 1)  # past the steps the aborted run logged
    run.process.kill()
    assert run.wait()[0] == -signal.SIGKILL
    last = Run.train(preset, run_dir, logs=tmp_path / "logs-last")
    code, out, err = last.wait()
    assert code == 0, err
    assert f"taking over the stale lock of pid {run.pid} on host" in err
    assert f"resuming from step_{saved[-1]:08d}" in out

    assert reference.wait()[0] == 0
    assert logged_steps(run_dir) == list(range(1, 25))
    assert losses(run_dir) == losses(reference_dir)
    assert_bit_identical(teachers_of(run_dir / "checkpoints" / "step_00000024"),
                         teachers_of(reference_dir / "checkpoints" / "step_00000024"))


def test_a_second_process_on_a_run_directory_is_refused_naming_the_holder(tmp_path):
    preset = write_preset(tmp_path / "tiny.yaml", [*LONG_EPOCH, "train.max_steps=0", "train.epochs=100"])
    run_dir = tmp_path / "run"
    first = Run.train(preset, run_dir, logs=tmp_path / "logs-first")
    wait_for_step(first, run_dir, 2)
    config_before = (run_dir / "config.yaml").read_bytes()
    code, _, err = Run.train(preset, run_dir, ["train.seed=1"], logs=tmp_path / "logs-second").wait()
    assert code == 2 and f"pid {first.pid} on host " in err and "Traceback" not in err
    assert (run_dir / "config.yaml").read_bytes() == config_before
    first.process.send_signal(signal.SIGTERM)  # the holder was not disturbed: it still stops and saves
    code, out, _ = first.wait()
    assert code == 0 and f"saved step_{logged_steps(run_dir)[-1]:08d} on SIGTERM" in out


def test_divergence_is_skipped_on_every_rank_then_stops_naming_step_model_and_term(tmp_path, capsys):
    preset = write_preset(tmp_path / "tiny.yaml", ["model1.optim.base_lr=1e6", "train.max_steps=40",
                                                   "checkpoint.every_steps=2", "train.max_skipped_steps=3"])
    run_dir = tmp_path / "run"
    assert main(["train", "--preset", str(preset), "--no-progress", f"run_dir={run_dir}"]) == 2
    err = capsys.readouterr().err
    message = [line for line in err.splitlines() if line.startswith("mokd: error:")]
    assert len(message) == 1 and "Traceback" not in err
    skipped = [line for line in err.splitlines() if "skipped on every rank" in line]
    assert len(skipped) == 2  # two skips, the third in a row stops the run
    first_skipped = int(skipped[0].split("step ")[1].split()[0])
    assert f"step {first_skipped + 2}: model1: loss term" in message[0] and "not finite" in message[0]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["guard/skipped_steps"] == 2
    assert checkpoint_steps(run_dir)  # kept checkpoints, every one finite (the last good one was not pruned)
    for step in checkpoint_steps(run_dir):
        for state in teachers_of(run_dir / "checkpoints" / f"step_{step:08d}"):
            assert all(torch.isfinite(value).all() for value in state.values() if value.is_floating_point())


def test_fp16_gradscaler_skips_are_flagged_not_counted_as_divergence(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, extra=["train.precision=fp16", "train.max_steps=3",
                                                   "checkpoint.enabled=false"]), show_progress=False)
    trainer.train()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any(record["guard/scaler_skipped/model1"] for record in records)  # 65536 overflows fp16 at first
    for record in records:
        assert record["guard/skipped_steps"] == 0
        for which in (1, 2):
            overflowed = not torch.isfinite(torch.tensor(record[f"grad_norm/model{which}"]))
            assert record[f"guard/scaler_skipped/model{which}"] == float(overflowed)


@pytest.fixture(scope="module")
def three_checkpoints(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("three")
    Trainer(tiny_config(run_dir, extra=["train.max_steps=3", "checkpoint.every_steps=1", "checkpoint.keep_last=3"]),
            show_progress=False).train()
    assert checkpoint_steps(run_dir) == [1, 2, 3]
    return run_dir


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _overwrite_8_bytes(file: Path) -> None:
    data = bytearray(file.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 8] = bytes(255 - b for b in data[middle:middle + 8])
    file.write_bytes(bytes(data))


def _empty_dcp(directory: Path) -> None:
    for file in (directory / "dcp").iterdir():
        file.unlink()


@pytest.mark.parametrize("damage, victim", [
    ("truncated", lambda c: sorted((c / "dcp").glob("*.distcp"))[0]),
    ("8 bytes overwritten", lambda c: sorted((c / "dcp").glob("*.distcp"))[0]),
    ("rng deleted", lambda c: c / "rng" / "rank_0.pt"),
    ("dcp emptied", lambda c: c / "dcp" / ".metadata"),
])
def test_a_damaged_newest_checkpoint_falls_back_with_a_warning_naming_the_file(tmp_path, three_checkpoints, capsys,
                                                                                damage, victim):
    run_dir = tmp_path / "run"
    shutil.copytree(three_checkpoints, run_dir)
    newest = run_dir / "checkpoints" / "step_00000003"
    file = victim(newest)
    {"truncated": _truncate, "8 bytes overwritten": _overwrite_8_bytes, "rng deleted": Path.unlink,
     "dcp emptied": lambda _: _empty_dcp(newest)}[damage](file)
    extra = ["train.max_steps=3", "checkpoint.every_steps=1", "checkpoint.keep_last=3"]
    with pytest.raises(CheckpointError, match=str(file)):
        Trainer(tiny_config(run_dir, extra=extra + ["checkpoint.fallback=false"]), show_progress=False)
    capsys.readouterr()
    trainer = Trainer(tiny_config(run_dir, extra=extra), show_progress=False)
    assert trainer.step == 2
    err = capsys.readouterr().err
    assert "warning" in err and str(file) in err and "step_00000003" in err


def test_dcp_read_errors_become_checkpoint_errors_with_the_path(tmp_path, three_checkpoints):
    """Without checksums (a marker from before them), a truncated .distcp reaches DCP's reader itself."""
    run_dir = tmp_path / "run"
    shutil.copytree(three_checkpoints, run_dir)
    for step in (1, 2, 3):
        checkpoint = run_dir / "checkpoints" / f"step_{step:08d}"
        (checkpoint / "COMPLETE").write_text(f"{step}\n")
        _truncate(sorted((checkpoint / "dcp").glob("*.distcp"))[0])
    with pytest.raises(CheckpointError, match=r"none of the 3 complete checkpoints.*step_00000003/dcp"):
        Trainer(tiny_config(run_dir, extra=["train.max_steps=3"]), show_progress=False)


@pytest.mark.parametrize("change, refused", [
    (["model1.width=16"], "model1.width: 8 -> 16 changes the networks' shapes"),
    (["train.batch_size=4"], "global batch"),
    (["model2.optim.base_lr=0.01"], "model2.optim.base_lr"),
    (["train.seed=3"], "train.seed"),
])
def test_a_resume_with_changed_keys_is_refused_before_anything_is_written(tmp_path, three_checkpoints, change,
                                                                          refused):
    run_dir = tmp_path / "run"
    shutil.copytree(three_checkpoints, run_dir)
    before = {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}
    with pytest.raises(ConfigError, match=refused):
        Trainer(tiny_config(run_dir, extra=["train.max_steps=4", *change]), show_progress=False)
    after = {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file() and path.name != ".lock"}
    assert after == {path: data for path, data in before.items() if path.name != ".lock"}
    if "shapes" not in refused:  # schedule keys may be changed on purpose
        trainer = Trainer(tiny_config(run_dir, extra=["train.max_steps=4", *change,
                                                      "checkpoint.allow_config_change=true"]), show_progress=False)
        assert trainer.step == 3
    else:
        assert main(["export", "--run", str(run_dir), "--model", "1", "--format", "timm",
                     "--out", str(tmp_path / "m1.pt")]) == 0  # the run still reads as it was


@pytest.mark.parametrize("override, named", [
    ("model1.optim.base_lr=nan", "model1.optim.base_lr"), ("model1.optim.base_lr=inf", "model1.optim.base_lr"),
    ("model1.optim.base_lr=-1", "model1.optim.base_lr"), ("loss.teacher_momentum=1.5", "loss.teacher_momentum"),
    ("loss.centre_momentum=nan", "loss.centre_momentum"), ("checkpoint.every_steps=-5", "checkpoint.every_steps"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last"), ("eval.knn_k=0", "eval.knn_k"),
    ("data.train_samples=-10", "data.train_samples"), ("parallel.timeout_minutes=0", "parallel.timeout_minutes"),
    ("train.max_steps=-1", "train.max_steps"), ("train.log_every=0", "train.log_every"),
    ("model1.temperature.student=0", "model1.temperature.student"), ("head.out_dim=0", "head.out_dim"),
    ("data.num_workers=-1", "data.num_workers"), ("data.synthetic_size=4", "train.batch_size=8"),
])
def test_bad_values_are_refused_naming_the_key_before_the_run_directory_exists(tmp_path, capsys, override, named):
    preset = write_preset(tmp_path / "tiny.yaml")
    run_dir = tmp_path / "run"
    assert main(["train", "--preset", str(preset), "--no-progress", f"run_dir={run_dir}", override]) == 2
    err = capsys.readouterr().err
    assert named in err and len(err.strip().splitlines()) == 1
    assert not run_dir.exists()


def test_environment_errors_are_one_line_with_the_path_and_errno(tmp_path, capsys):
    preset = write_preset(tmp_path / "tiny.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model1:\n  width: 8\n   depth: [2\n")
    cases = [
        (["--preset", str(broken)], f"{broken}:3"),
        (["--preset", str(preset), f"run_dir={preset}"], "is a file, not a directory"),
        (["--preset", str(preset), "run_dir=/sys/mokd-unwritable-run"], "/sys/mokd-unwritable-run"),
        (["--preset", str(preset), f"run_dir={tmp_path / 'r'}", "data.source=fashion_mnist",
          f"data.root={tmp_path / 'nothing'}"], str(tmp_path / "nothing")),
    ]
    if not torch.cuda.is_available():
        cases.append((["--preset", str(preset), f"run_dir={tmp_path / 'r'}", "train.device=cuda"], "train.device=cuda"))
    for arguments, named in cases:
        assert main(["train", "--no-progress", *arguments]) == 2, arguments
        err = capsys.readouterr().err
        assert named in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r").exists()


def test_a_full_disk_fails_the_checkpoint_write_with_its_path_and_leaves_the_run_resumable(tmp_path):
    preset = write_preset(tmp_path / "tiny.yaml", ["train.max_steps=2", "checkpoint.every_steps=1"])
    run_dir = tmp_path / "run"
    assert Run.train(preset, run_dir).wait()[0] == 0

    def small_files() -> None:  # writes past 32 KiB fail (EFBIG), as writes to a full disk fail (ENOSPC)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (32 << 10, 32 << 10))

    command = [sys.executable, "-m", "mokd.launch.cli", "train", "--preset", str(preset), "--no-progress",
               f"run_dir={run_dir}", "train.max_steps=3"]
    proc = subprocess.run(command, env=child_env(), capture_output=True, text=True, preexec_fn=small_files,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "step_00000003.tmp" in proc.stderr and "EFBIG" in proc.stderr
    assert checkpoint_steps(run_dir) == [1, 2] and not list((run_dir / "checkpoints").glob("*.tmp"))
    assert Trainer(tiny_config(run_dir, extra=["train.max_steps=3"]), show_progress=False).step == 2


def _write_shards(tmp_path: Path, corrupt: bool) -> str:
    from PIL import Image

    from mokd.data.shard_writer import write_shards_from

    root = tmp_path / ("corrupt" if corrupt else "images")
    for index in range(24):
        path = root / f"class{index % 2}" / f"{index:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        if corrupt:
            path.write_bytes(b"not a png at all")
        else:
            Image.new("L", (16, 16), index * 10).save(path)
    manifest = write_shards_from("imagefolder", tmp_path / f"shards-{root.name}", "train", root, "train", shards=3)
    return manifest["pattern"]


def test_shards_missing_at_start_or_corrupt_in_a_worker_give_one_line(tmp_path):
    good = _write_shards(tmp_path, corrupt=False)
    preset = write_preset(tmp_path / "tiny.yaml", ["data.source=webdataset", f"data.shards={good}",
                                                   "data.shard_channels=1", "data.shard_statistics=fashion_mnist",
                                                   "train.max_steps=2", "data.num_workers=1",
                                                   "data.max_corrupt_fraction=0", "train.batch_size=4"])
    missing = tmp_path / "shards-images" / "train-000001.tar"
    missing.unlink()
    code, _, err = Run.train(preset, tmp_path / "run").wait()
    assert code == 2 and str(missing) in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()

    code, _, err = Run.train(preset, tmp_path / "run2", [f"data.shards={_write_shards(tmp_path, corrupt=True)}"]).wait()
    assert code == 2 and "max_corrupt_fraction" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_evaluation_results_are_merged_across_commands(tmp_path):
    run_dir = tmp_path / "run"
    Trainer(tiny_config(run_dir, extra=["train.max_steps=1", "eval.finetune_epochs=1"]), show_progress=False).train()
    overrides = ["eval.finetune_epochs=1", "eval.knn_untrained=false"]
    assert main(["eval", "finetune", "--run", str(run_dir), "--fraction", "0.5", *overrides]) == 0
    assert main(["eval", "knn", "--run", str(run_dir), *overrides]) == 0
    results = json.loads((run_dir / "results.json").read_text())
    for which in ("model1", "model2"):
        assert {"finetune_50pct_top1", "knn_top1"} <= results[which].keys()
    assert "finetune_50pct" in results and "knn" in results
