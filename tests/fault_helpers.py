"""Real `mokd train` processes for the fault tests: started, watched, signalled, read back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from helpers import tiny_config
from mokd.config import save_config

REPO = Path(__file__).resolve().parent.parent


def child_env() -> dict[str, str]:
    """This checkout first on the path of every child (torchrun's workers included), one thread each."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))}


def write_preset(path: Path, extra: list[str] = ()) -> Path:
    """The tiny test pair as a YAML preset (run_dir is given on each command line)."""
    save_config(tiny_config(path.parent / "unused", extra=list(extra)), path)
    return path


class Run:
    """One `mokd train` (or any command) in the background, its output in files."""

    def __init__(self, command: list[str], logs: Path, **popen) -> None:
        logs.mkdir(parents=True, exist_ok=True)
        self.out_path, self.err_path = logs / "stdout.txt", logs / "stderr.txt"
        self.out_file, self.err_file = open(self.out_path, "w"), open(self.err_path, "w")
        self.process = subprocess.Popen(command, stdout=self.out_file, stderr=self.err_file, env=child_env(), **popen)

    @classmethod
    def train(cls, preset: Path, run_dir: Path, overrides: list[str] = (), logs: Optional[Path] = None) -> "Run":
        command = [sys.executable, "-m", "mokd.launch.cli", "train", "--preset", str(preset), "--no-progress",
                   f"run_dir={run_dir}", *overrides]
        return cls(command, logs or run_dir.parent / f"logs-{time.monotonic_ns()}")

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait(self, timeout: float = 300) -> tuple[int, str, str]:
        code = self.process.wait(timeout=timeout)
        self.out_file.close()
        self.err_file.close()
        return code, self.out_path.read_text(), self.err_path.read_text()

    def output(self) -> str:
        return self.out_path.read_text() + self.err_path.read_text()


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]


def wait_for_step(run: Run, run_dir: Path, step: int, timeout: float = 240) -> None:
    """Until metrics.jsonl holds `step` (the run is inside its training loop, handlers installed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(logged >= step for logged in logged_steps(run_dir)):
            return
        if run.process.poll() is not None:
            raise AssertionError(f"the run ended (exit {run.process.returncode}) before step {step}:\n{run.output()}")
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout} s:\n{run.output()}")


def checkpoint_steps(run_dir: Path) -> list[int]:
    directory = run_dir / "checkpoints"
    return sorted(int(p.name.split("_")[1]) for p in directory.glob("step_*")
                  if not p.name.endswith(".tmp") and (p / "COMPLETE").exists())
