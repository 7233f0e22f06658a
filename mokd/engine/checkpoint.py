"""Atomic checkpoints: written under a temporary name, renamed, marked complete; the last k are kept.

Layout: RUN/checkpoints/step_00001234/{state.pt, COMPLETE}. A directory without COMPLETE (a run killed
mid-write) is ignored and later removed; resume takes the newest complete one.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

COMPLETE_MARKER = "COMPLETE"
STATE_FILE = "state.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that exists but cannot be read."""


class CheckpointManager:
    def __init__(self, run_dir: Path, keep_last: int) -> None:
        self.directory = Path(run_dir) / "checkpoints"
        self.keep_last = max(1, keep_last)

    def complete(self) -> list[Path]:
        if not self.directory.exists():
            return []
        found = [path for path in self.directory.glob("step_*")
                 if path.is_dir() and not path.name.endswith(".tmp") and (path / COMPLETE_MARKER).exists()]
        return sorted(found, key=lambda path: int(path.name.split("_")[1]))

    def latest(self) -> Optional[Path]:
        complete = self.complete()
        return complete[-1] if complete else None

    def save(self, state: dict[str, Any], step: int) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.directory / f"step_{step:08d}"
        staging = self.directory / f"step_{step:08d}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        torch.save(state, staging / STATE_FILE)
        (staging / COMPLETE_MARKER).write_text(f"{step}\n")
        _fsync_directory(staging)
        if final.exists():  # the same step saved twice (end of epoch and every_steps): replace it
            shutil.rmtree(final)
        os.replace(staging, final)
        _fsync_directory(self.directory)
        self._prune()
        return final

    def _prune(self) -> None:
        for stale in self.complete()[:-self.keep_last]:
            shutil.rmtree(stale, ignore_errors=True)
        for leftover in self.directory.glob("step_*.tmp"):
            shutil.rmtree(leftover, ignore_errors=True)

    @staticmethod
    def load(path: Path) -> dict[str, Any]:
        state_file = Path(path) / STATE_FILE
        try:
            return torch.load(state_file, map_location="cpu", weights_only=False)
        except Exception as error:  # noqa: BLE001 - any unreadable file gets the same clear message
            raise CheckpointError(
                f"cannot read checkpoint {state_file}: {error}. Remove that directory to resume from the "
                f"previous checkpoint, or start fresh with checkpoint.resume=false") from error


def _fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
