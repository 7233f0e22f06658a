"""Feature-collapse monitors of the teachers' pooled features, beside the teacher entropy of each loss term.

- mean pairwise cosine similarity of the L2-normalised features (-> 1: every image maps to one direction);
- effective rank, the participation ratio (sum of eigenvalues)^2 / sum of squared eigenvalues of the features'
  covariance (1: one direction carries all the variance; C: all equally). Computed from the B x B Gram matrix
  of the centred features, which has the same non-zero eigenvalues as the C x C covariance.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def feature_statistics(features: torch.Tensor) -> dict[str, torch.Tensor]:
    """features [N, C], N >= 2 -> {"mean_cosine": scalar, "effective_rank": scalar}."""
    features = features.float()
    count = features.shape[0]
    unit = F.normalize(features, dim=-1)
    cosine_sum = (unit.sum(dim=0) ** 2).sum() - (unit * unit).sum()
    centred = features - features.mean(dim=0, keepdim=True)
    gram = centred @ centred.t()
    trace = torch.diagonal(gram).sum()
    rank = trace ** 2 / (gram * gram).sum().clamp(min=torch.finfo(gram.dtype).tiny)
    return {"mean_cosine": cosine_sum / (count * (count - 1)), "effective_rank": rank}
