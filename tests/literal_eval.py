"""Literal references for evaluation: the weighted k-NN vote one query at a time, and a run's k-NN predictions
from it (the teachers' pooled features through the run's own evaluation loaders)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from mokd.eval.run_evaluation import eval_loaders, load_run, untrained_networks


def literal_knn(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, classes: int,
                k: int = 20, temperature: float = 0.07) -> torch.Tensor:
    """One query at a time: cosine similarity to every bank feature, the k most similar (all of them when the bank
    is smaller) vote for their class with weight exp(similarity / T), the class with the largest sum wins."""
    bank, queries = bank.double(), queries.double()
    bank = bank / bank.norm(dim=1, keepdim=True)
    predictions = []
    for query in queries:
        query = query / query.norm()
        similarity = [float(query @ row) for row in bank]
        nearest = sorted(range(len(similarity)), key=lambda i: -similarity[i])[:k]
        scores = [0.0] * classes
        for i in nearest:
            scores[int(bank_labels[i])] += math.exp(similarity[i] / temperature)
        predictions.append(max(range(classes), key=lambda c: scores[c]))
    return torch.tensor(predictions)


def literal_run_predictions(run_dir: Path, split: str = "test",
                            untrained: bool = False) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each teacher's k-NN predictions on the run's `split` (its newest checkpoint's teachers, or the networks at
    step 0 when `untrained`), and that split's labels."""
    config, teachers, _ = load_run(run_dir, [f"eval.split={split}"])
    if untrained:
        teachers = untrained_networks(config, teachers[0].backbone.in_chans, torch.device("cpu"))
    bank_loader, test_loader, classes = eval_loaders(config)
    predictions = []
    with torch.no_grad():
        for teacher in teachers:
            backbone = teacher.backbone.eval()
            bank = torch.cat([backbone(images).pooled for images, _ in bank_loader])
            test = torch.cat([backbone(images).pooled for images, _ in test_loader])
            bank_labels = torch.cat([labels for _, labels in bank_loader])
            predictions.append(literal_knn(bank, bank_labels, test, classes, config.eval.knn_k,
                                           config.eval.knn_temperature))
    return predictions, torch.cat([labels for _, labels in test_loader])


def agreement(first: torch.Tensor, second: torch.Tensor) -> float:
    """Percentage of positions where two prediction vectors agree, counted one by one."""
    return 100.0 * sum(int(a) == int(b) for a, b in zip(first, second)) / len(first)
