"""Linear probe on frozen features (DINO's protocol, on features cached once).

Features: ResNet, the globally pooled last stage; ViT, the CLS token of each of the last n blocks (all blocks if fewer) (each through
the final norm), concatenated, optionally with the average of the last block's patch tokens appended.
Classifier: one Linear layer (weights N(0, 0.01), bias 0) trained with SGD, momentum 0.9, no weight decay,
lr = base_lr * batch / 256 on a per-step cosine schedule to 0.

Departure from DINO: the training images are embedded once, without augmentation, and the epochs run over the
cached features. DINO re-augments (random resized crop, flip) every epoch, which needs a full backbone forward
per sample per epoch; caching makes a 100-epoch probe cost one forward pass, so it fits at the end of a CPU run.
The price is a somewhat lower (and less regularised) probe than with augmentation. The cached features are
standardised with the training statistics: an affine map a linear classifier could absorb anyway, it only
conditions the short SGD run so one learning rate works for every backbone.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from mokd.method.backbones import Backbone


class EvalFeatures(NamedTuple):
    pooled: torch.Tensor  # [N, C] the backbone's pooled vector (k-NN input, before L2 normalisation)
    probe: torch.Tensor  # [N, D] linear-probe input (ResNet: = pooled; ViT: last-n CLS [+ avg patch tokens])
    labels: torch.Tensor  # [N]


def _vit_features(backbone: Backbone, images: torch.Tensor, n_last_blocks: int,
                  avgpool_patch_tokens: bool) -> tuple[torch.Tensor, torch.Tensor]:
    net = backbone.net
    depth = len(net.blocks)
    if n_last_blocks < 1:
        raise ValueError(f"eval.linear_n_last_blocks={n_last_blocks} must be at least 1")
    # A ViT shallower than n (the tiny test and CPU ViTs) contributes all of its blocks.
    blocks = list(range(max(depth - n_last_blocks, 0), depth))
    # NLC outputs of the chosen blocks through the final norm, with the CLS (prefix) tokens returned apart.
    outputs = net.forward_intermediates(images, indices=blocks, return_prefix_tokens=True, norm=True,
                                        output_fmt="NLC", intermediates_only=True)
    probe = [prefix[:, 0] for _, prefix in outputs]
    if avgpool_patch_tokens:
        probe.append(outputs[-1][0].mean(dim=1))
    # The last block's CLS through the final norm is exactly the pooled vector of Backbone.forward.
    return outputs[-1][1][:, 0], torch.cat(probe, dim=1)


@torch.no_grad()
def extract_eval_features(backbone: Backbone, loader: DataLoader, device: torch.device, n_last_blocks: int = 4,
                          avgpool_patch_tokens: bool = False) -> EvalFeatures:
    """k-NN and probe features of every image of `loader`, in loader order, on CPU (one pass for both)."""
    was_training = backbone.training
    backbone.eval()
    pooled, probe, labels = [], [], []
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        if backbone.is_vit:
            batch_pooled, batch_probe = _vit_features(backbone, images, n_last_blocks, avgpool_patch_tokens)
        else:
            batch_pooled = batch_probe = backbone(images).pooled
        pooled.append(batch_pooled.float().cpu())
        probe.append(batch_probe.float().cpu())
        labels.append(targets)
    backbone.train(was_training)
    return EvalFeatures(torch.cat(pooled), torch.cat(probe), torch.cat(labels))


class LinearProbe(nn.Module):
    """Standardisation with fixed training statistics, then the trained Linear layer."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, num_classes: int,
                 generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.linear = nn.Linear(mean.numel(), num_classes)
        nn.init.normal_(self.linear.weight, std=0.01, generator=generator)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear((features - self.mean) / self.std)


def train_linear_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, epochs: int = 100,
                       batch_size: int = 256, base_lr: float = 0.1, seed: int = 0) -> LinearProbe:
    """A linear classifier fitted on cached features (SGD, momentum 0.9, no weight decay, cosine lr)."""
    if features.shape[0] != labels.shape[0] or features.shape[0] == 0:
        raise ValueError(f"need as many labels as features (and at least one): {features.shape[0]} features, "
                         f"{labels.shape[0]} labels")
    features = features.float()
    std = features.std(dim=0, unbiased=False).clamp_min(1e-6)
    generator = torch.Generator().manual_seed(seed)  # the initial weights and the batch order: a probe is repeatable
    probe = LinearProbe(features.mean(dim=0), std, num_classes, generator)
    lr = base_lr * batch_size / 256
    optimizer = torch.optim.SGD(probe.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    steps_per_epoch = math.ceil(features.shape[0] / batch_size)
    total = epochs * steps_per_epoch
    standardised = (features - probe.mean) / probe.std  # once, not per step: the epochs are many and cheap
    # The steps are tiny matmuls: extra threads only add synchronisation (on 2 cores, 100 epochs of 10,000 x 128
    # features took 13x longer with 2 threads than with 1).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        step = 0
        for _ in range(epochs):
            order = torch.randperm(features.shape[0], generator=generator)
            for start in range(0, features.shape[0], batch_size):
                index = order[start:start + batch_size]
                for group in optimizer.param_groups:
                    group["lr"] = 0.5 * lr * (1 + math.cos(math.pi * step / total))
                loss = F.cross_entropy(probe.linear(standardised[index]), labels[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
    finally:
        torch.set_num_threads(threads)
    return probe.eval()


@torch.no_grad()
def probe_top1(probe: LinearProbe, features: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    predicted = probe(features.float()).argmax(dim=1)
    return 100.0 * (predicted == labels).float().mean().item()
