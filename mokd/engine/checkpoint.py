"""Atomic, verified checkpoints: written under a temporary name, checksummed, marked complete, renamed; the last k
are kept; resume takes the newest one that verifies, falling back to older ones.

Layout of RUN/checkpoints/step_00001234/ (written by all ranks into step_00001234.tmp/, then renamed by rank 0):
    meta.pt          step, data position, centres, world size, strategy, the resolved config (rank 0)
    rng/rank_N.pt    each rank's RNG states
    teachers.pt      both teachers' full weights (rank 0): what evaluation and export read
    dcp/             students, teachers, optimisers, scalers: torch.distributed.checkpoint (single/ddp/fsdp),
                     reshardable to another world size
    deepspeed/       or each student engine's own DeepSpeed checkpoint (deepspeed)
    COMPLETE         written last: JSON with the size and CRC-32 of every other file. A directory without it (a
                     run killed mid-write) is ignored and removed; one whose files differ from it is skipped.
Multi-node runs need RUN on a file system every node sees.

With asynchronous saving the rank's writing finishes in a background thread (`write` returns what is left to do);
rank 0 then checksums, marks and renames there, so COMPLETE is still written after every file.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import threading
import zlib
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch.distributed.checkpoint.api import CheckpointException

from mokd.engine.distributed import all_gather_objects, barrier, broadcast_object
from mokd.errors import CheckpointError

COMPLETE_MARKER = "COMPLETE"
META_FILE = "meta.pt"
TEACHERS_FILE = "teachers.pt"
_CHUNK = 16 << 20

# What a rank's `write` may leave for the background: a callable that finishes its files.
Finish = Optional[Callable[[], None]]

__all__ = ["CheckpointError", "CheckpointManager", "COMPLETE_MARKER", "META_FILE", "TEACHERS_FILE",
           "failure_message", "load_teachers_file", "save_torch"]


def _crc32(file: Path) -> int:
    value = 0
    with open(file, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            value = zlib.crc32(chunk, value)
    return value


def file_manifest(directory: Path) -> dict[str, list[int]]:
    """{relative path: [size, CRC-32]} of every file under `directory`."""
    return {str(file.relative_to(directory)): [file.stat().st_size, _crc32(file)]
            for file in sorted(directory.rglob("*")) if file.is_file()}


def verify(directory: Path) -> None:
    """Raise CheckpointError naming the first file that is missing or differs from the COMPLETE marker.
    Markers of checkpoints written before checksums existed (a bare step number) are accepted as they are."""
    try:
        marker = json.loads((directory / COMPLETE_MARKER).read_text())
    except json.JSONDecodeError:
        return
    if not isinstance(marker, dict):
        return
    for name, (size, crc) in marker["files"].items():
        file = directory / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint file {file} is missing")
        if file.stat().st_size != size:
            raise CheckpointError(f"checkpoint file {file} has {file.stat().st_size} bytes, {size} were written")
        if _crc32(file) != crc:
            raise CheckpointError(f"checkpoint file {file} fails its checksum (its contents changed after writing)")


def failure_message(error: BaseException) -> str:
    """One line for a checkpoint read or write failure; DCP's CheckpointException carries one error per rank."""
    if isinstance(error, CheckpointException):
        return "; ".join(f"rank {rank}: {failure_message(exc)}" for rank, (exc, _) in error.failures.items())
    if isinstance(error, OSError) and error.errno is not None:
        where = f"{error.filename}: " if error.filename else ""
        return f"{where}{error.strerror} ({errno.errorcode.get(error.errno, error.errno)})"
    return f"{type(error).__name__}: {error}"


def save_torch(obj: Any, file: Path) -> None:
    """torch.save through a Python file, so that a failed write (disk full) is an OSError naming the file."""
    with open(file, "wb") as handle:
        torch.save(obj, handle)


class CheckpointManager:
    def __init__(self, run_dir: Path, keep_last: int) -> None:
        self.directory = Path(run_dir) / "checkpoints"
        self.keep_last = max(1, keep_last)
        self._in_flight: Optional[threading.Thread] = None
        self._background_error: Optional[BaseException] = None

    def complete(self) -> list[Path]:
        if not self.directory.exists():
            return []
        found = [path for path in self.directory.glob("step_*")
                 if path.is_dir() and not path.name.endswith(".tmp") and (path / COMPLETE_MARKER).exists()]
        return sorted(found, key=lambda path: int(path.name.split("_")[1]))

    def latest(self) -> Optional[Path]:
        complete = self.complete()
        return complete[-1] if complete else None

    # ---- writing --------------------------------------------------------------------------------
    def save(self, step: int, write: Callable[[Path], Finish], is_main: bool = True) -> Path:
        """Collective: every rank calls ``write(staging_directory)``; rank 0 then checksums, marks and renames.
        When `write` returns a callable, the rest happens in a background thread (see `wait`)."""
        self.wait()  # one checkpoint in flight at a time
        final = self.directory / f"step_{step:08d}"
        staging = self.directory / f"step_{step:08d}.tmp"
        if is_main:
            self.directory.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
        barrier()
        finish = self._guarded(staging, lambda: write(staging))
        if finish is None:
            barrier()
            if is_main:
                self._finalise(staging, final, step)
            barrier()
        else:
            self._background_error = None
            self._in_flight = threading.Thread(target=self._background, args=(finish, staging, final, step, is_main),
                                               name=f"mokd-checkpoint-{step}", daemon=False)
            self._in_flight.start()
        return final

    def wait(self, raise_errors: bool = True) -> None:
        """Block until the checkpoint in flight (if any) is complete; re-raise what failed in the background
        (unless another error is already on its way: `raise_errors=False`)."""
        if self._in_flight is not None:
            self._in_flight.join()
            self._in_flight = None
        error, self._background_error = self._background_error, None
        if error is not None and raise_errors:
            raise error

    def _background(self, finish: Callable[[], None], staging: Path, final: Path, step: int, is_main: bool) -> None:
        try:
            self._guarded(staging, finish)
            if is_main:  # rank 0's DCP save completes only after every rank's files are written
                self._finalise(staging, final, step)
        except BaseException as error:  # noqa: BLE001 - handed to the training thread by wait()
            self._background_error = error

    def _guarded(self, staging: Path, work: Callable[[], Any]) -> Any:
        """Run a part of the writing; a failed write (disk full, quota) becomes a CheckpointError naming the
        checkpoint, and its partial directory is removed (the previous checkpoints stay as they were)."""
        try:
            return work()
        except (OSError, CheckpointException) as error:
            shutil.rmtree(staging, ignore_errors=True)
            free = shutil.disk_usage(self.directory).free if self.directory.exists() else 0
            raise CheckpointError(f"writing checkpoint {staging} failed: {failure_message(error)} "
                                  f"({free / 2**30:.1f} GiB free there); the previous checkpoints are "
                                  f"untouched") from error

    def _finalise(self, staging: Path, final: Path, step: int) -> None:
        marker = {"step": step, "files": file_manifest(staging)}
        (staging / COMPLETE_MARKER).write_text(json.dumps(marker, indent=0) + "\n")
        _fsync_directory(staging)
        if final.exists():  # the same step saved twice (end of epoch and every_steps): replace it
            shutil.rmtree(final)
        os.replace(staging, final)
        _fsync_directory(self.directory)
        self._prune()

    def _prune(self) -> None:
        for stale in self.complete()[:-self.keep_last]:
            shutil.rmtree(stale, ignore_errors=True)
        for leftover in self.directory.glob("step_*.tmp"):
            shutil.rmtree(leftover, ignore_errors=True)

    # ---- reading --------------------------------------------------------------------------------
    def resume(self, load: Callable[[Path], None], fallback: bool, is_main: bool) -> Optional[Path]:
        """Collective: load the newest complete checkpoint that verifies (checked by rank 0) and that every rank
        can read; with `fallback`, an older one after a warning naming the failing file. None: nothing to load."""
        candidates = list(reversed(self.complete()))
        failures = []
        for directory in candidates:
            problem = None
            if is_main:
                try:
                    verify(directory)
                except CheckpointError as error:
                    problem = str(error)
            problem = broadcast_object(problem)
            if problem is None:
                try:
                    load(directory)
                except CheckpointError as error:
                    problem = str(error)
                problem = next((p for p in all_gather_objects(problem) if p is not None), None)
            if problem is None:
                return directory
            failures.append(problem)
            if not fallback:
                raise CheckpointError(f"{problem}; checkpoint.fallback=false, so the run stops here (remove "
                                      f"{directory} to resume from the previous checkpoint)")
            if is_main:
                print(f"mokd: warning: {problem}; skipping {directory.name}, trying the previous complete "
                      f"checkpoint", file=sys.stderr, flush=True)
        if failures:
            raise CheckpointError(f"none of the {len(candidates)} complete checkpoints under {self.directory} can "
                                  f"be read (newest: {failures[0]}); start a new run_dir or restore them")
        return None

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
        raise CheckpointError(f"cannot read checkpoint file {file}: {failure_message(error)}") from error


def _fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
