"""Fine-tuning on a label subset (the semi-supervised protocol: 1 % or 10 % of the training labels).

The whole teacher backbone plus a new linear head are trained with cross-entropy on a class-balanced subset of
the training split, then scored on the test split. SGD, momentum 0.9, no weight decay, lr = base_lr * batch / 256
on a per-step cosine schedule; augmentation is a random horizontal flip plus a random translation of up to 1/8
of the side (reflect padding), applied on the batch tensor so it works for every source and channel count.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from mokd.errors import ConfigError
from mokd.method.backbones import Backbone


def balanced_subset(targets: Sequence[int], fraction: float, seed: int) -> list[int]:
    """Sorted indices of round(fraction * n_c) samples (at least one) of every class c, drawn with `seed`.

    The draw depends only on (targets, fraction, seed): the same call gives the same subset on every machine.
    """
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"label fraction must be in (0, 1], got {fraction}")
    by_class: dict[int, list[int]] = defaultdict(list)
    for index, target in enumerate(targets):
        by_class[int(target)].append(index)
    generator = torch.Generator().manual_seed(seed)
    chosen: list[int] = []
    for target in sorted(by_class):
        members = by_class[target]
        count = max(1, round(fraction * len(members)))
        order = torch.randperm(len(members), generator=generator)[:count]
        chosen.extend(members[i] for i in order.tolist())
    return sorted(chosen)


def label_subset(dataset: Dataset, fraction: float, seed: int) -> Subset:
    targets = getattr(dataset, "targets", None)
    if targets is None:
        raise TypeError(f"{type(dataset).__name__} has no .targets: cannot draw a class-balanced label subset")
    return Subset(dataset, balanced_subset(targets, fraction, seed))


class Classifier(nn.Module):
    """A backbone and a linear head on its pooled vector."""

    def __init__(self, backbone: Backbone, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.num_features, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images).pooled)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random flip and translation per image of a [B, C, H, W] batch."""
    batch, _, height, width = images.shape
    flip = torch.rand(batch, generator=generator) < 0.5
    images = torch.where(flip.view(-1, 1, 1, 1).to(images.device), images.flip(-1), images)
    pad = max(1, min(height, width) // 8)
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect")
    shifts = torch.randint(0, 2 * pad + 1, (batch, 2), generator=generator).tolist()
    return torch.stack([padded[i, :, dy:dy + height, dx:dx + width] for i, (dy, dx) in enumerate(shifts)])


def finetune(backbone: Backbone, train_loader: DataLoader, num_classes: int, device: torch.device, epochs: int,
             base_lr: float, seed: int) -> Classifier:
    """A copy of `backbone` with a linear head, fine-tuned end to end (the given backbone is left untouched)."""
    torch.manual_seed(seed)
    model = Classifier(copy.deepcopy(backbone), num_classes).to(device).train()
    batch_size = train_loader.batch_size or 1
    lr = base_lr * batch_size / 256
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    total = max(1, epochs * len(train_loader))
    generator = torch.Generator().manual_seed(seed)
    step = 0
    for _ in range(epochs):
        for images, labels in train_loader:
            for group in optimizer.param_groups:
                group["lr"] = 0.5 * lr * (1 + math.cos(math.pi * step / total))
            logits = model(augment(images.to(device), generator))
            loss = F.cross_entropy(logits, labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    return model.eval()


@torch.no_grad()
def classifier_top1(model: Classifier, loader: DataLoader, device: torch.device) -> float:
    """Top-1 accuracy in percent."""
    correct = total = 0
    for images, labels in loader:
        predicted = model(images.to(device)).argmax(dim=1).cpu()
        correct += int((predicted == labels).sum())
        total += labels.numel()
    return 100.0 * correct / max(total, 1)
