"""Warning lines when a collapse monitor crosses its threshold: a teacher going uniform (entropy near ln K), or
its pooled features collapsing onto one direction (mean pairwise cosine near 1, effective rank near 1).

Each monitor warns when it enters its bad zone, and again only after it has left it, so a run stuck in a
collapse prints one line, not one per logged step."""

from __future__ import annotations

import math
from typing import Callable


class CollapseWatch:
    def __init__(self, out_dim: int, max_cosine: float, min_rank: float, max_entropy_fraction: float) -> None:
        self.rules: list[tuple[str, Callable[[float], bool], str]] = [
            ("collapse/feature_cosine/", lambda v: v >= max_cosine,
             f"mean pairwise cosine of the teacher's pooled features >= {max_cosine}"),
            ("collapse/feature_rank/", lambda v: v <= min_rank,
             f"effective rank of the teacher's pooled features <= {min_rank}"),
            ("collapse/teacher_entropy/", lambda v: v >= max_entropy_fraction * math.log(out_dim),
             f"teacher entropy >= {max_entropy_fraction} ln K = {max_entropy_fraction * math.log(out_dim):.3f} "
             f"(uniform)"),
        ]
        self.alarmed: set[str] = set()

    def check(self, step: int, scalars: dict[str, float]) -> list[str]:
        """The warning lines for the monitors that entered their bad zone at this logged step."""
        lines = []
        for name, value in scalars.items():
            for prefix, bad, meaning in self.rules:
                if not name.startswith(prefix):
                    continue
                if bad(value) and name not in self.alarmed:
                    self.alarmed.add(name)
                    lines.append(f"warning: step {step}: {name} = {value:.4g}: {meaning}")
                elif not bad(value):
                    self.alarmed.discard(name)
        return lines
