"""Warning lines when a collapse monitor crosses its threshold: a teacher going uniform (entropy near ln K), or
its pooled features collapsing onto one direction (mean pairwise cosine rising toward 1, effective rank falling).

The feature monitors are judged against the same teacher at step 0, the untrained network, not against fixed
numbers: an untrained ResNet's pooled features are post-ReLU and already aligned (mean cosine 0.86, effective
rank 3.8-6.1 for the demo's ResNet-18s on Fashion-MNIST) while an untrained ViT's are 0.65 and 1.7, so one fixed
threshold would call a healthy ResNet collapsed and miss a collapsing ViT.

Each monitor warns the first time it enters its bad zone, and never again in that process: a run stuck in a
collapse, or hovering at a threshold (the demo's rank monitors cross it back and forth), prints one line, not one
per logged step or per crossing. The metrics keep every value."""

from __future__ import annotations

import math
from typing import Callable

# the monitors judged against their own step-0 values
FEATURE_MONITORS = ("collapse/feature_cosine/", "collapse/feature_rank/")


def step0_name(name: str) -> str:
    """collapse/feature_cosine/model1 -> collapse/feature_cosine_step0/model1."""
    prefix, model = name.rsplit("/", 1)
    return f"{prefix}_step0/{model}"


class CollapseWatch:
    def __init__(self, out_dim: int, cosine_gap_fraction: float, rank_fraction: float,
                 max_entropy_fraction: float) -> None:
        self.baseline: dict[str, float] = {}  # feature monitor -> its value at step 0
        entropy_limit = max_entropy_fraction * math.log(out_dim)
        self.rules: list[tuple[str, Callable[[str, float], bool], Callable[[str], str]]] = [
            ("collapse/feature_cosine/",
             lambda name, v: 1 - v <= cosine_gap_fraction * (1 - self.baseline[name]),
             lambda name: f"mean pairwise cosine of the teacher's pooled features: its gap to 1 is at most "
                          f"{cosine_gap_fraction} of the gap at step 0 ({self.baseline[name]:.4g})"),
            ("collapse/feature_rank/", lambda name, v: v <= rank_fraction * self.baseline[name],
             lambda name: f"effective rank of the teacher's pooled features is at most {rank_fraction} of its "
                          f"step-0 value ({self.baseline[name]:.4g})"),
            ("collapse/teacher_entropy/", lambda name, v: v >= entropy_limit,
             lambda name: f"teacher entropy >= {max_entropy_fraction} ln K = {entropy_limit:.3f} (uniform)"),
        ]
        self.warned: set[str] = set()

    def set_baseline(self, step0: dict[str, float]) -> None:
        """The feature monitors of the untrained teachers (the first step of a run), by metric name."""
        self.baseline = dict(step0)

    def check(self, step: int, scalars: dict[str, float]) -> list[str]:
        """The warning lines for the monitors that entered their bad zone for the first time at this step."""
        lines = []
        for name, value in scalars.items():
            for prefix, bad, meaning in self.rules:
                if not name.startswith(prefix) or (prefix in FEATURE_MONITORS and name not in self.baseline):
                    continue
                if name not in self.warned and bad(name, value):
                    self.warned.add(name)
                    lines.append(f"warning: step {step}: {name} = {value:.4g}: {meaning(name)}")
        return lines
