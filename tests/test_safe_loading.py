"""A run directory mokd did not write cannot run code; evaluation and export pick the newest checkpoint that
verifies (or --checkpoint step_N); older run directories are converted once with `mokd convert-run --trust`.

The commands run in-process through `mokd.launch.cli.main`, whose return value is the exit code a user sees
(`sys.exit(main())`); errors reach the user as its stderr lines.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import tiny_config
from mokd.engine.trainer import Trainer
from mokd.launch.cli import main

EXTRA = ["train.max_steps=2", "checkpoint.every_steps=1", "checkpoint.keep_last=3"]
STEP1, STEP2 = "step_00000001", "step_00000002"


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("safe") / "run"
    Trainer(tiny_config(run_dir, extra=EXTRA), show_progress=False).train()
    assert sorted(path.name for path in (run_dir / "checkpoints").iterdir()) == [STEP1, STEP2]
    return run_dir


@pytest.fixture
def run_dir(tmp_path, two_checkpoints) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(two_checkpoints, copy)
    (copy / "config.yaml").write_text((two_checkpoints / "config.yaml").read_text().replace(
        str(two_checkpoints), str(copy)))
    return copy


def rewrite_manifest(checkpoint: Path) -> None:
    """COMPLETE as a writer of the whole directory would make it: {"step", "files": {path: [size, CRC-32]}}."""
    files = {str(file.relative_to(checkpoint)): [file.stat().st_size, zlib.crc32(file.read_bytes())]
             for file in sorted(checkpoint.rglob("*")) if file.is_file() and file.name != "COMPLETE"}
    step = int(checkpoint.name.split("_")[1])
    (checkpoint / "COMPLETE").write_text(json.dumps({"step": step, "files": files}))


class Payload:
    """Unpickling it runs a shell command that creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(item) for item in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("mokd: error:")]


def commands(run: Path, out: Path) -> dict[str, list]:
    return {"eval knn": ["eval", "knn", "--run", run], "eval linear": ["eval", "linear", "--run", run],
            "export": ["export", "--run", run, "--model", 1, "--format", "timm", "--out", out],
            "resume": ["train", "--preset", run / "config.yaml", "--no-progress"]}


@pytest.mark.parametrize("victim, raw", [("teachers.pt", False), ("teachers.pt", True), ("meta.pt", False),
                                         ("rng/rank_0.pt", False)],
                         ids=["teachers", "teachers-raw-pickle", "meta", "rng"])
def test_a_hostile_checkpoint_file_runs_no_code_and_every_command_stops_with_one_line(run_dir, tmp_path, capsys,
                                                                                      victim, raw):
    marker = tmp_path / "marker"
    # The payload works: loading it the unsafe way creates the marker.
    probe = tmp_path / "probe.pt"
    torch.save(Payload(tmp_path / "probe-marker"), probe)
    torch.load(probe, weights_only=False)
    assert (tmp_path / "probe-marker").exists()

    newest = run_dir / "checkpoints" / STEP2
    file = newest / victim
    if raw:
        file.write_bytes(pickle.dumps(Payload(marker)))
    else:
        torch.save(Payload(marker), file)
    rewrite_manifest(newest)
    for name, argv in commands(run_dir, tmp_path / "out.pth").items():
        code, out, err = run_cli(argv, capsys)
        assert code == 2, name
        assert not marker.exists(), name
        lines = error_lines(err)
        assert len(lines) == 1 and str(file) in lines[0], (name, err)
        assert f"mokd convert-run --run {run_dir} --trust" in lines[0], name
        assert "warning" not in err, name  # no fallback to the older checkpoint of a hostile run directory
    assert not (tmp_path / "out.pth").exists()


def test_eval_falls_back_past_a_truncated_newest_teachers_file_with_a_warning(run_dir, capsys):
    teachers = run_dir / "checkpoints" / STEP2 / "teachers.pt"
    teachers.write_bytes(teachers.read_bytes()[: teachers.stat().st_size // 2])
    code, out, err = run_cli(["eval", "knn", "--run", run_dir], capsys)
    assert code == 0
    assert json.loads((run_dir / "results.json").read_text())["steps"] == 1
    warning = [line for line in err.splitlines() if line.startswith("mokd: warning:")]
    assert len(warning) == 1 and str(teachers) in warning[0] and STEP2 in warning[0]


def exported(run: Path, out: Path, capsys, *choice: str) -> tuple[int, str]:
    code, _, err = run_cli(["export", "--run", run, "--model", 2, "--format", "timm", "--out", out, *choice], capsys)
    return code, err


def teacher_backbone(checkpoint: Path) -> dict[str, torch.Tensor]:
    state = torch.load(checkpoint / "teachers.pt", weights_only=True)[1]
    return {key.removeprefix("backbone.net."): value for key, value in state.items()
            if key.startswith("backbone.net.")}


def test_checkpoint_option_picks_that_checkpoint_and_names_the_available_ones(run_dir, tmp_path, capsys):
    first, second = teacher_backbone(run_dir / "checkpoints" / STEP1), teacher_backbone(run_dir / "checkpoints" / STEP2)
    assert any(not torch.equal(first[key], second[key]) for key in first)  # the two are told apart
    for choice, expected in (([], second), (["--checkpoint", "step_1"], first), (["--checkpoint", STEP2], second)):
        assert exported(run_dir, tmp_path / "out.pth", capsys, *choice)[0] == 0
        written = torch.load(tmp_path / "out.pth", weights_only=True)
        assert written.keys() == expected.keys() and all(torch.equal(written[k], expected[k]) for k in expected)

    code, err = exported(run_dir, tmp_path / "missing.pth", capsys, "--checkpoint", "step_7")
    assert code == 2 and len(error_lines(err)) == 1
    assert "step_7" in err and f"{STEP1}, {STEP2}" in err
    # A chosen checkpoint that fails its checksums is not replaced by another one.
    teachers = run_dir / "checkpoints" / STEP1 / "teachers.pt"
    teachers.write_bytes(teachers.read_bytes()[:-8])
    code, err = exported(run_dir, tmp_path / "damaged.pth", capsys, "--checkpoint", "step_1")
    assert code == 2 and len(error_lines(err)) == 1
    assert "step_1" in err and str(teachers) in err and f"{STEP1}, {STEP2}" in err
    assert not (tmp_path / "missing.pth").exists() and not (tmp_path / "damaged.pth").exists()


def write_old_rng_files(run: Path) -> dict:
    """The RNG files as mokd wrote them before they were tensors and plain values (numpy's state as it comes)."""
    random.seed(11)
    np.random.seed(12)
    np.random.standard_normal()  # a cached Gaussian, so every field of numpy's state is non-trivial
    old = {"torch": torch.manual_seed(13).get_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    for checkpoint in (run / "checkpoints").iterdir():
        torch.save(old, checkpoint / "rng" / "rank_0.pt")
        rewrite_manifest(checkpoint)
    return old


def test_an_old_run_directory_is_refused_until_converted_with_trust(run_dir, tmp_path, capsys):
    old = write_old_rng_files(run_dir)
    rng_file = run_dir / "checkpoints" / STEP2 / "rng" / "rank_0.pt"
    for name, argv in commands(run_dir, tmp_path / "out.pth").items():
        code, _, err = run_cli(argv, capsys)
        lines = error_lines(err)
        assert code == 2 and len(lines) == 1, (name, err)
        assert str(rng_file) in lines[0] and f"mokd convert-run --run {run_dir} --trust" in lines[0], name

    before = rng_file.read_bytes()
    code, out, err = run_cli(["convert-run", "--run", run_dir], capsys)
    assert code == 2 and len(error_lines(err)) == 1 and "--trust" in err
    assert rng_file.read_bytes() == before

    code, out, err = run_cli(["convert-run", "--run", run_dir, "--trust"], capsys)
    assert code == 0 and f"{STEP1}: converted rng/rank_0.pt" in out and f"{STEP2}: converted rng/rank_0.pt" in out
    assert run_cli(commands(run_dir, tmp_path / "out.pth")["export"], capsys)[0] == 0
    code, out, _ = run_cli(["convert-run", "--run", run_dir, "--trust"], capsys)
    assert code == 0 and f"{STEP2}: already safe" in out

    # A resume restores exactly the states the old files held.
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    assert Trainer(tiny_config(run_dir, extra=EXTRA), show_progress=False).step == 2
    assert random.getstate() == old["python"]
    name, key, position, has_gauss, gauss = np.random.get_state()
    assert (name, position, has_gauss, gauss) == (old["numpy"][0], *old["numpy"][2:])
    assert np.array_equal(key, old["numpy"][1])
    assert torch.equal(torch.get_rng_state(), old["torch"])
