"""One training process per run directory: an exclusive fcntl lock on RUN/.lock, held by rank 0 for the run.

The kernel drops the lock when its holder dies, however it dies, so a lock is never stale in the kernel's
eyes; the file's text (pid and host of the holder) is what survives a `kill -9`. A new holder that finds a
previous holder's text in an unlocked file says so (the takeover notice); a clean release empties the file.
The lock needs a file system whose fcntl locks every node honours (local, or NFS with lockd).
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
from pathlib import Path
from typing import IO, Optional

from mokd.errors import ConfigError, RunLockedError

LOCK_FILE = ".lock"


def check_run_directory(run_dir: Path) -> None:
    """Refuse a run_dir that is a file before anything else is done (creating it comes later, in `acquire`)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run_dir={run_dir} is a file, not a directory")


def _write_probe(directory: Path) -> None:
    """Create and remove a file: an unwritable or full directory fails here, at start, as an OSError with its path."""
    probe = directory / f".write-test-{os.getpid()}"
    with open(probe, "w") as handle:
        handle.write("mokd\n")
        handle.flush()
        os.fsync(handle.fileno())
    probe.unlink()


class RunLock:
    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.handle: Optional[IO[str]] = None

    def acquire(self) -> None:
        """Create the run directory and its checkpoints/ (both tested for writing), then take the lock or raise
        RunLockedError naming the live holder's pid and host."""
        checkpoints = self.path.parent / "checkpoints"
        checkpoints.mkdir(parents=True, exist_ok=True)
        for directory in (self.path.parent, checkpoints):
            _write_probe(directory)
        handle = open(self.path, "a+")
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "an unknown process"
            handle.close()
            raise RunLockedError(f"{self.path.parent} is in use by {holder} (lock {self.path}): one training "
                                 f"process per run directory; wait for it, stop it, or choose another run_dir") from None
        handle.seek(0)
        previous = handle.read().strip()
        if previous:
            print(f"mokd: taking over the stale lock of {previous} (that process is gone; {self.path})",
                  file=sys.stderr, flush=True)
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on host {socket.gethostname()}\n")
        handle.flush()
        self.handle = handle

    def release(self) -> None:
        if self.handle is None:
            return
        self.handle.seek(0)
        self.handle.truncate()  # an empty file: the next holder has nothing to report as stale
        self.handle.flush()
        fcntl.lockf(self.handle, fcntl.LOCK_UN)
        self.handle.close()
        self.handle = None
