"""Atomic checkpoints: written under a temporary name, renamed, marked complete; the last k are kept.

Layout of RUN/checkpoints/step_00001234/ (written by all ranks into step_00001234.tmp/, then renamed by rank 0):
    meta.pt          step, data position, centres, world size, strategy, the resolved config (rank 0)
    rng/rank_N.pt    each rank's RNG states
    teachers.pt      both teachers' full weights (rank 0): what evaluation and export read
    dcp/             students, teachers, optimisers, scalers: torch.distributed.checkpoint (single/ddp/fsdp),
                     reshardable to another world size
    deepspeed/       or each student engine's own DeepSpeed checkpoint (deepspeed)
    COMPLETE         written last: a directory without it (a run killed mid-write) is ignored and removed.
Multi-node runs need RUN on a file system every node sees. Resume takes the newest complete checkpoint.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from mokd.engine.distributed import barrier

COMPLETE_MARKER = "COMPLETE"
META_FILE = "meta.pt"
TEACHERS_FILE = "teachers.pt"


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

    def save(self, step: int, write: Callable[[Path], None], is_main: bool = True) -> Path:
        """Collective: every rank calls ``write(staging_directory)``; rank 0 then marks and renames."""
        final = self.directory / f"step_{step:08d}"
        staging = self.directory / f"step_{step:08d}.tmp"
        if is_main:
            self.directory.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
        barrier()
        write(staging)
        barrier()
        if is_main:
            (staging / COMPLETE_MARKER).write_text(f"{step}\n")
            _fsync_directory(staging)
            if final.exists():  # the same step saved twice (end of epoch and every_steps): replace it
                shutil.rmtree(final)
            os.replace(staging, final)
            _fsync_directory(self.directory)
            self._prune()
        barrier()
        return final

    def _prune(self) -> None:
        for stale in self.complete()[:-self.keep_last]:
            shutil.rmtree(stale, ignore_errors=True)
        for leftover in self.directory.glob("step_*.tmp"):
            shutil.rmtree(leftover, ignore_errors=True)

    @staticmethod
    def load_meta(path: Path) -> dict[str, Any]:
        return _read(Path(path) / META_FILE)


def load_teachers_file(path: Path) -> list[dict[str, torch.Tensor]]:
    """Both teachers' full state dicts from a checkpoint directory."""
    return _read(Path(path) / TEACHERS_FILE)


def _read(file: Path) -> Any:
    try:
        return torch.load(file, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise CheckpointError(
            f"cannot read checkpoint file {file}: {error}. Remove {file.parent} to resume from the previous "
            f"checkpoint, or start fresh with checkpoint.resume=false") from error


def _fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
