"""The project's own error types: what the command line reports as one message and exit code 2.

Every error a user can cause or fix (a bad value, a missing file, a damaged checkpoint, a locked run, a diverged
run, a hung rank) is a MokdError; anything else that escapes is a bug and keeps its traceback. Errors that used
to be ValueErrors still are (ConfigError, DataError), so callers that caught ValueError keep working.
"""

from __future__ import annotations


class MokdError(Exception):
    """An error with a message meant for the user; the command line prints it alone and exits 2."""


class ConfigError(MokdError, ValueError):
    """A configuration that cannot be trained: unknown key, wrong type, a value out of range, an impossible
    combination, a device that is not there, or a resume whose configuration differs from the checkpoint's."""


class DataError(MokdError, ValueError):
    """Training or evaluation data that is missing, unreadable or too small, naming the file or shard."""


class CheckpointError(MokdError, RuntimeError):
    """A checkpoint that exists but cannot be read, fails its checksums, or cannot be written."""


class UnsafeCheckpointError(CheckpointError):
    """A file in a run directory that holds Python objects other than tensors and plain values: unpickling it
    could run code, so mokd does not load it. Written by an older mokd (`mokd convert-run --trust` converts the
    run once) or not by mokd at all. Never a reason to fall back to an older checkpoint."""


class RunLockedError(MokdError):
    """Another live process trains in the same run directory."""


class NonFiniteError(MokdError):
    """Training diverged: too many consecutive steps with a non-finite loss or gradient, or non-finite weights."""


class CollectiveError(MokdError):
    """A collective did not complete within parallel.timeout_minutes, or a peer rank died during it."""


def user_message(error: BaseException) -> str:
    """The error's message on one line. An error raised in a DataLoader worker arrives re-raised by torch with
    the worker's traceback inside its message; only the original message (its last line) is kept."""
    text = str(error).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(f"{type(error).__name__}: ", 1)[-1]
    if isinstance(error, OSError) and error.filename is not None and error.errno is not None:
        import errno as errno_names

        name = errno_names.errorcode.get(error.errno, str(error.errno))
        text = f"{error.filename}: {error.strerror} ({name})"
    return " ".join(text.split("\n"))
