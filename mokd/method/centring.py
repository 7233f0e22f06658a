"""Sinkhorn-Knopp centring of teacher outputs (SwAV, DINOv2/v3), the alternative to DINO's running centre.

The centre subtracts a running mean of the teacher logits before the softmax; Sinkhorn-Knopp instead makes the
teacher's targets for the current global batch an equipartition: Q = exp(t / tau) is alternately normalised so
that every prototype (column) carries the same total mass 1/K and every row the same mass 1/R; after n rounds
each row is rescaled into a probability vector. The sums run over the global batch, so the two reductions are
summed over ranks (`reduce_sum`, identity in one process).
"""

from __future__ import annotations

from typing import Callable

import torch

ReduceSum = Callable[[torch.Tensor], torch.Tensor]


def no_reduction(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, temperature: float, iterations: int,
                   reduce_sum: ReduceSum = no_reduction) -> torch.Tensor:
    """Teacher probabilities [R, K] (each row sums to 1) for teacher logits [R, K] of this rank's rows."""
    logits = teacher_logits.float() / temperature
    # A shift common to all ranks cancels in the first normalisation; the mean of the ranks' maxima keeps exp in
    # range (teacher logits are bounded by the last layer's row norms, so the ranks' maxima differ little).
    ranks = reduce_sum(torch.ones(1, device=logits.device))
    q = torch.exp(logits - reduce_sum(logits.max().reshape(1)) / ranks).t()  # [K, R]
    rows = reduce_sum(torch.tensor([float(q.shape[1])], device=q.device))
    prototypes = q.shape[0]
    q /= reduce_sum(q.sum().reshape(1))
    # Sharp, unbounded logits (the T-Head's last layer has no L2-normalised input) can underflow a whole prototype
    # or row to 0: the floor keeps such a sum from turning 0 / 0 into NaN (those entries stay 0).
    tiny = torch.finfo(q.dtype).tiny
    for _ in range(iterations):
        q /= reduce_sum(q.sum(dim=1, keepdim=True)).clamp(min=tiny)  # every prototype's total mass ...
        q /= prototypes  # ... is 1 / K
        q /= q.sum(dim=0, keepdim=True).clamp(min=tiny)  # every row's mass (a row lives on one rank) ...
        q /= rows  # ... is 1 / R
    return (q * rows).t()  # rows sum to 1
