"""Atomic, verified checkpoints: written under a temporary name, checksummed, marked complete, renamed; the last k
are kept; resume takes the newest one that verifies, falling back to older ones.

Layout of RUN/checkpoints/step_00001234/ (written by all ranks into step_00001234.tmp/, then renamed by rank 0):
    meta.pt          step, data position, centres, world size, strategy, the resolved config (rank 0)
    rng/rank_N.pt    each rank's RNG states
    teachers.pt      every teacher's full weights (rank 0): what evaluation and export read
    dcp/             students, teachers, optimisers, scalers: torch.distributed.checkpoint (single/ddp/fsdp),
                     reshardable to another world size
    deepspeed/       or each student engine's own DeepSpeed checkpoint (deepspeed)
    COMPLETE         written last: JSON with the size and CRC-32 of every other file. A directory without it (a
                     run killed mid-write) is ignored and removed; one whose files differ from it is skipped.
Multi-node runs need RUN on a file system every node sees.

Every file mokd itself writes there (meta.pt, teachers.pt, rng/) holds tensors and plain values only and is read
by `read_checkpoint_file` (weights_only=True): a run directory someone else wrote cannot run code through them.
DCP's `.metadata` and DeepSpeed's files are read by their own libraries with full unpickling, on resume only.

With asynchronous saving the rank's writing finishes in a background thread (`write` returns what is left to do);
rank 0 then checksums, marks and renames there, so COMPLETE is still written after every file.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import sys
import threading
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch.distributed.checkpoint.api import CheckpointException

from mokd.engine.distributed import all_gather_objects, barrier, broadcast_object
from mokd.errors import CheckpointError, UnsafeCheckpointError

COMPLETE_MARKER = "COMPLETE"
META_FILE = "meta.pt"
TEACHERS_FILE = "teachers.pt"
RNG_DIR = "rng"
_CHUNK = 16 << 20

# What a rank's `write` may leave for the background: a callable that finishes its files.
Finish = Optional[Callable[[], None]]

__all__ = ["CheckpointError", "CheckpointManager", "COMPLETE_MARKER", "META_FILE", "RNG_DIR", "TEACHERS_FILE",
           "UnsafeCheckpointError", "convert_run", "failure_message", "load_teachers_file", "read_checkpoint_file",
           "save_torch"]


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
        _write_marker(staging, step)
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
    def resume(self, load: Callable[[Path], None], fallback: bool, is_main: bool,
               choice: Optional[str] = None) -> Optional[Path]:
        """Collective: load the newest complete checkpoint that verifies (checked by rank 0) and that every rank
        can read; with `fallback`, an older one after a warning naming the failing file. None: nothing to load.
        `choice` ("step_N"): that checkpoint or an error listing the complete ones. Training resumes through
        here, and evaluation and export pick their checkpoint the same way.

        A file that is not tensors and plain values (UnsafeCheckpointError) stops here, with no fallback: it
        was not damaged in transit, and the older checkpoints of such a run are no safer."""
        candidates = [self._chosen(choice)] if choice is not None else list(reversed(self.complete()))
        failures = []
        for directory in candidates:
            problem = broadcast_object(_check(directory) if is_main else None)
            if problem is None:
                try:
                    load(directory)
                except CheckpointError as error:
                    problem = error
                problem = next((p for p in all_gather_objects(problem) if p is not None), None)
            if problem is None:
                return directory
            if isinstance(problem, UnsafeCheckpointError):
                raise problem
            if choice is not None:
                raise CheckpointError(f"checkpoint {choice} cannot be used: {problem} (complete checkpoints: "
                                      f"{self._names()})")
            problem = str(problem)
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

    def _names(self) -> str:
        return ", ".join(path.name for path in self.complete()) or "none"

    def _chosen(self, choice: str) -> Path:
        """The directory of checkpoint `choice` ("step_N", N with or without the leading zeros)."""
        number = choice.removeprefix("step_")
        directory = self.directory / f"step_{int(number):08d}" if number.isdigit() else None
        if directory is None or directory not in self.complete():
            raise CheckpointError(f"checkpoint {choice} is not a complete checkpoint under {self.directory} "
                                  f"(complete checkpoints: {self._names()})")
        return directory

    @staticmethod
    def load_meta(path: Path) -> dict[str, Any]:
        return read_checkpoint_file(Path(path) / META_FILE)


def load_teachers_file(path: Path) -> list[dict[str, torch.Tensor]]:
    """Both teachers' full state dicts from a checkpoint directory."""
    return read_checkpoint_file(Path(path) / TEACHERS_FILE)


def own_files(directory: Path) -> list[Path]:
    """The files mokd writes into a checkpoint itself (not DCP's or DeepSpeed's)."""
    return [directory / META_FILE, directory / TEACHERS_FILE, *sorted((directory / RNG_DIR).glob("*.pt"))]


def read_checkpoint_file(file: Path, mmap: bool = False) -> Any:
    """The one reader of mokd's files in a run directory: tensors and plain values only (weights_only=True), so
    that a file mokd did not write cannot run code. `mmap`: map the tensors rather than read them (a check)."""
    try:
        with warnings.catch_warnings():
            # A foreign pickle's protocol notice would add lines to the one-line error below.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(file))
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpointError(_unsafe_message(file, error)) from error
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise CheckpointError(f"cannot read checkpoint file {file}: {failure_message(error)}") from error


def _unsafe_message(file: Path, error: pickle.UnpicklingError) -> str:
    found = re.search(r"GLOBAL (\S+)", str(error))
    what = f"it needs {found.group(1)}" if found else "it is not a tensors-only pickle"
    run = next((parent.parent for parent in file.parents if parent.name == "checkpoints"), file.parent)
    return (f"checkpoint file {file} holds more than tensors and plain values ({what}); mokd does not load it, "
            f"since unpickling it could run code. A run directory written by an older mokd is converted once, "
            f"if you trust it, with: mokd convert-run --run {run} --trust")


def _check(directory: Path) -> Optional[CheckpointError]:
    """Rank 0's check of a checkpoint before any rank loads it: every file matches COMPLETE, and every file of
    mokd's own loads as tensors and plain values (before DCP or DeepSpeed unpickle anything of it)."""
    try:
        verify(directory)
        for file in own_files(directory):
            read_checkpoint_file(file, mmap=True)
    except CheckpointError as error:
        return error
    return None


def _write_marker(directory: Path, step: int) -> None:
    """COMPLETE with the size and CRC-32 of every other file, replaced atomically (a half-written marker would
    read as a pre-checksum one and be accepted unchecked)."""
    files = file_manifest(directory)
    files.pop(COMPLETE_MARKER, None)
    staging = directory / f"{COMPLETE_MARKER}.tmp"
    staging.write_text(json.dumps({"step": step, "files": files}, indent=0) + "\n")
    os.replace(staging, directory / COMPLETE_MARKER)
    _fsync_directory(directory)


def convert_run(run_dir: Path, trust: bool) -> list[str]:
    """Rewrite mokd's own files in every complete checkpoint of a run directory written before they were
    tensors and plain values, and their checksums in COMPLETE. Reading the old files unpickles them in full,
    which runs whatever code they hold: only with `trust`. Returns one line per checkpoint."""
    run_dir = Path(run_dir)
    if not trust:
        raise CheckpointError(f"mokd convert-run unpickles the checkpoint files of {run_dir} in full, which runs "
                              f"any code they hold; pass --trust if you wrote this run directory (or trust whoever "
                              f"did)")
    checkpoints = CheckpointManager(run_dir, keep_last=1).complete()
    if not checkpoints:
        raise CheckpointError(f"no complete checkpoint under {run_dir / 'checkpoints'}")
    report = []
    for directory in checkpoints:
        try:
            verify(directory)  # a damaged checkpoint keeps failing its checksums: converting must not bless it
            converted = [file for file in own_files(directory) if _convert_file(file)]
        except CheckpointError as error:
            report.append(f"{directory.name}: left as it was: {error}")
            continue
        if converted:
            _write_marker(directory, int(directory.name.split("_")[1]))
        names = ", ".join(str(file.relative_to(directory)) for file in converted)
        report.append(f"{directory.name}: converted {names}" if converted else f"{directory.name}: already safe")
    return report


def _convert_file(file: Path) -> bool:
    """Rewrite `file` as tensors and plain values unless it is already; whether it was rewritten."""
    try:
        read_checkpoint_file(file, mmap=True)
        return False
    except UnsafeCheckpointError:
        pass
    try:
        content = torch.load(file, map_location="cpu", weights_only=False)  # trusted: the user said --trust
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise CheckpointError(f"cannot read checkpoint file {file}: {failure_message(error)}") from error
    staging = file.with_name(f".{file.name}.converting")
    save_torch(plain_values(content, file), staging)
    os.replace(staging, file)
    return True


def plain_values(value: Any, file: Path) -> Any:
    """`value` as tensors and plain values (what weights_only=True loads): numpy arrays become tensors, numpy
    scalars Python numbers; anything else that is not a container, tensor or plain value cannot be converted."""
    if value is None or isinstance(value, (torch.Tensor, str, bool, int, float)):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {key: plain_values(item, file) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        items = [plain_values(item, file) for item in value]
        return tuple(items) if isinstance(value, tuple) else items
    kind = type(value)
    raise CheckpointError(f"cannot convert checkpoint file {file}: it holds a {kind.__module__}.{kind.__qualname__}, "
                          f"which is not a tensor or a plain value")


def _fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
