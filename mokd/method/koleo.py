"""The KoLeo regulariser (Sablayrolles et al. 2019; DINOv2): -mean log of each feature's distance to its nearest
neighbour in the batch, after L2 normalisation. It pushes a batch's features apart, against the dimensional
collapse in which every image's feature lies in one or two directions."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """features [B, C], B >= 2 (one crop of the rank's batch) -> scalar."""
    unit = F.normalize(features.float(), dim=-1, eps=eps)
    similarity = unit @ unit.t()
    similarity.fill_diagonal_(-2.0)  # never one's own neighbour
    nearest = similarity.argmax(dim=1)
    distance = (unit - unit[nearest]).norm(dim=-1)
    return -torch.log(distance + eps).mean()
