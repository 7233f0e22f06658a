"""Where a run's numbers go: TensorBoard scalars, a JSONL file, and a progress bar."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm


class MetricsLogger:
    """`log(step, scalars)` writes the same record to TensorBoard (RUN/tensorboard) and RUN/metrics.jsonl."""

    def __init__(self, run_dir: Path, total_steps: int, initial_step: int, show_progress: bool = True) -> None:
        # A resumed run repeats the steps after its checkpoint: drop what was logged for them before (TensorBoard's
        # purge_step does the same for the event files).
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=initial_step)
        jsonl_path = Path(run_dir) / "metrics.jsonl"
        _truncate_after(jsonl_path, initial_step)
        self.jsonl = open(jsonl_path, "a", buffering=1)
        self.progress: Optional[tqdm] = None
        if show_progress:
            self.progress = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True,
                                 desc="train")

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        self.jsonl.write(json.dumps({"step": step, "time": time.time(), **scalars}) + "\n")
        if self.progress is not None:
            self.progress.set_postfix({name.split("/", 1)[-1]: f"{value:.3g}" for name, value in scalars.items()
                                       if name.startswith("loss/") and name.endswith("total")})

    def write_line(self, line: str) -> None:
        """A message for the user (a warning), printed without breaking the progress bar."""
        if self.progress is not None:
            self.progress.write(line)
        else:
            print(line, flush=True)

    def advance(self, steps: int = 1) -> None:
        if self.progress is not None:
            self.progress.update(steps)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        self.writer.close()
        self.jsonl.close()


def _truncate_after(path: Path, step: int) -> None:
    """Keep only the records of steps <= `step` (written atomically)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    staging = path.with_suffix(".jsonl.tmp")
    staging.write_text("".join(line + "\n" for line in kept))
    staging.replace(path)
