"""Stop requests: SIGTERM (what SLURM and Kubernetes send before killing), SIGINT (Ctrl-C) and SIGUSR1 (what
scripts/slurm.sbatch forwards ahead of the time limit) only set a flag. The trainer reads it at every step, all
ranks agree on it in the step's one flag all-reduce, a checkpoint is saved and training returns normally. A
second SIGINT aborts at once (KeyboardInterrupt), without saving. The data loaders' workers ignore the signals
meant for the trainer.

Both the engine (the trainer) and the data loaders (their workers) use this module: it sits below both.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Optional

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopRequest:
    """While installed, the stop signals set `signal_name` instead of killing the process."""

    def __init__(self) -> None:
        self.signal_name: Optional[str] = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def install(self) -> None:
        """Only the main thread of the main interpreter may set handlers; elsewhere (a notebook thread) the
        signals keep their default effect."""
        try:
            self._previous = {number: signal.signal(number, self._handle) for number in SIGNALS}
        except ValueError:
            self._previous = {}

    def uninstall(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def _handle(self, number: int, frame: Optional[FrameType]) -> None:
        if number == signal.SIGINT and self.signal_name == "SIGINT":
            self.uninstall()
            raise KeyboardInterrupt("second SIGINT: aborted without saving")
        self.signal_name = self.signal_name or signal.Signals(number).name


def ignore_stop_signals(worker_id: int) -> None:
    """worker_init_fn of the training loaders: Ctrl-C reaches every process of the terminal's group and SIGUSR1
    may be sent to the job's process tree; neither may kill a data worker under the trainer's feet. SIGTERM keeps
    its effect: the loader ends its workers with it."""
    for number in (signal.SIGINT, signal.SIGUSR1):
        signal.signal(number, signal.SIG_IGN)
