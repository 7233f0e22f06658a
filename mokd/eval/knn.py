"""Weighted k-NN classification on frozen features (DINO's protocol).

Features are L2-normalised; for each test feature the k most cosine-similar training features vote for
their class with weight exp(similarity / T); the class with the largest total vote wins.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader


@torch.no_grad()
def extract_features(backbone: nn.Module, loader: DataLoader, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled backbone features (ResNet: average pool; ViT: CLS after the final norm), L2-normalised, on CPU."""
    was_training = backbone.training
    backbone.eval()
    features, labels = [], []
    for images, targets in loader:
        pooled = backbone(images.to(device, non_blocking=True)).pooled
        features.append(F.normalize(pooled.float(), dim=1).cpu())
        labels.append(targets)
    backbone.train(was_training)
    return torch.cat(features), torch.cat(labels)


@torch.no_grad()
def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                num_classes: int, k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Predicted class per test feature; features must be L2-normalised."""
    k = min(k, train_features.shape[0])
    predictions = []
    for start in range(0, test_features.shape[0], chunk):
        similarity = test_features[start:start + chunk] @ train_features.T
        top_similarity, top_index = similarity.topk(k, dim=1)
        votes = torch.zeros(top_index.shape[0], num_classes, dtype=similarity.dtype)
        votes.scatter_add_(1, train_labels[top_index], (top_similarity / temperature).exp())
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions)


def knn_top1(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
             test_labels: torch.Tensor, num_classes: int, k: int = 20, temperature: float = 0.07) -> float:
    """Top-1 accuracy in percent."""
    predicted = knn_predict(train_features, train_labels, test_features, num_classes, k, temperature)
    return 100.0 * (predicted == test_labels).float().mean().item()
