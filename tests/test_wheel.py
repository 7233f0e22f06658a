"""The package as a user installs it: a wheel, not the checkout. Built from a copy of the sources, installed
non-editable into a fresh virtual environment (which borrows the project environment's torch and friends rather
than downloading them), and run from a directory that has nothing of the checkout in it."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("setup.py", "CMakeLists.txt", "README.md", "csrc", "mokd")


def _run(command: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(command)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def wheel_environment(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """(the fresh environment's bin/, an environment for its commands)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    source.mkdir()
    for name in SOURCES:
        origin = REPO / name
        if origin.is_dir():
            shutil.copytree(origin, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        else:
            shutil.copy2(origin, source / name)
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(MOKD_BUILD_NATIVE="0", OMP_NUM_THREADS="1")
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-build-isolation", "--no-deps", "--no-index",
          "-w", str(root / "dist"), str(source)], root, env)
    wheels = list((root / "dist").glob("mokd-*.whl"))
    assert len(wheels) == 1, wheels

    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], root, env)
    # The project environment's site-packages as a plain path entry: torch and the rest come from there, while
    # its .pth files (among them the editable install of the checkout) are not processed.
    venv_site = next((venv / "lib").glob("python*/site-packages"))
    (venv_site / "project_packages.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--quiet", "--no-deps",
          "--no-index", str(wheels[0])], root, env)
    return venv / "bin", env


def test_wheel_installs_and_lists_its_presets_outside_the_checkout(wheel_environment, tmp_path):
    bin_dir, env = wheel_environment
    where = _run([str(bin_dir / "python"), "-c", "import mokd; print(mokd.__file__)"], tmp_path, env).stdout
    assert "site-packages" in where and str(REPO) not in where, where
    listed = _run([str(bin_dir / "mokd"), "presets"], tmp_path, env).stdout
    assert "demo " in listed and "r101_vit_b" in listed, listed


def test_wheel_trains_a_few_demo_steps_outside_the_checkout(wheel_environment, tmp_path):
    bin_dir, env = wheel_environment
    run_dir = tmp_path / "run"
    _run([str(bin_dir / "mokd"), "train", "--preset", "demo", "--no-progress", f"run_dir={run_dir}",
          "train.max_steps=3", "train.batch_size=8", "data.train_samples=64", "data.num_workers=0",
          "train.log_every=1", "checkpoint.every_steps=0", "eval.knn_at_end=false", "eval.linear_at_end=false",
          "eval.analysis_at_end=false", "train.threads=1"], tmp_path, env)
    steps = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(steps) >= 3, steps
