"""One model of the pair: backbone f, MLP-Head h and (optional) T-Head g, with the multi-crop forward."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn

from mokd.method.backbones import Backbone, BackboneOutput, patch_size
from mokd.method.heads import MLPHead, THead


class NetworkOutput(NamedTuple):
    pooled: torch.Tensor  # z for every crop, crops stacked crop-major: [S*B, C]
    mlp_logits: torch.Tensor  # h(z): [S*B, K]
    thead_logits: Optional[torch.Tensor]  # g(Z): [S*B, K], None without a T-Head
    features: list[BackboneOutput]  # backbone output per pass (resolution group or crop), in crop order


def resolution_groups(crops: list[torch.Tensor]) -> list[tuple[int, int]]:
    """[start, end) crop ranges of consecutive crops that share a resolution (one backbone pass each)."""
    groups, start = [], 0
    for index in range(1, len(crops) + 1):
        if index == len(crops) or crops[index].shape[-2:] != crops[start].shape[-2:]:
            groups.append((start, index))
            start = index
    return groups


class Network(nn.Module):
    """f + h (+ g). Students and teachers are both Networks; a teacher starts as a copy of its student."""

    def __init__(self, model_config, head_config, in_chans: int, global_crop_size: int, with_thead: bool,
                 drop_path: float) -> None:
        super().__init__()
        self.backbone = Backbone(model_config, in_chans, global_crop_size, drop_path)
        channels = self.backbone.num_features
        trainable_norm = model_config.trainable_last_layer_norm
        self.mlp_head = MLPHead(channels, head_config.out_dim, head_config.mlp_hidden_dim,
                                head_config.mlp_bottleneck_dim, trainable_norm)
        # One backbone pass per resolution group (true) or per crop (the official per-crop loop; perf.grouped_crops).
        self.grouped_crops = True
        self.thead: Optional[THead] = None
        if with_thead:
            side = global_crop_size // patch_size(model_config)
            self.thead = THead(channels, head_config.out_dim, head_config.thead_dim, head_config.thead_depth,
                               head_config.thead_heads, head_config.thead_mlp_ratio, (side, side),
                               head_config.attention, trainable_norm)

    def last_layers(self) -> list[nn.Module]:
        """The weight-normalised output layers, frozen during the first epoch(s)."""
        heads = [self.mlp_head] + ([self.thead] if self.thead is not None else [])
        return [head.last_layer for head in heads]

    def forward(self, crops: list[torch.Tensor]) -> NetworkOutput:
        groups = resolution_groups(crops) if self.grouped_crops else [(i, i + 1) for i in range(len(crops))]
        features = [self.backbone(crops[start] if end - start == 1 else torch.cat(crops[start:end]))
                    for start, end in groups]
        pooled = torch.cat([feature.pooled for feature in features])
        mlp_logits = self.mlp_head(pooled)
        thead_logits = None
        if self.thead is not None:
            thead_logits = torch.cat([self.thead(feature.tokens, feature.grid) for feature in features])
        return NetworkOutput(pooled, mlp_logits, thead_logits, features)
