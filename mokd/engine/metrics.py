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
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=initial_step)
        self.jsonl = open(Path(run_dir) / "metrics.jsonl", "a", buffering=1)
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

    def advance(self, steps: int = 1) -> None:
        if self.progress is not None:
            self.progress.update(steps)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        self.writer.close()
        self.jsonl.close()
