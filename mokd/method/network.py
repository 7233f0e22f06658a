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
    features: list[BackboneOutput]  # backbone output per resolution group, in crop order
    queries: Optional[torch.Tensor]  # q = P(z), detached: what this model sends into the other's T-Head [S*B, D]
    search_logits: Optional[torch.Tensor]  # g([q ; Z(globals)]) for a SearchRequest's queries, else None


class SearchRequest(NamedTuple):
    """The other student's queries for a feature search in this network's T-Head (L_ct of the other model).

    local_to_global: each local crop's query searches this network's first global view;
    global_to_global: global a's query searches global b != a."""

    queries: torch.Tensor  # the other student's queries for the searched crops, crop-major
    pairing: str  # "local_to_global" | "global_to_global"
    n_crops: int  # crops of the other student (2 globals + locals)


def searched_rows(pairing: str, batch_size: int, n_crops: int) -> slice:
    """Rows (crop-major) of the student crops whose queries search: the locals, or the two globals."""
    return slice(2 * batch_size, n_crops * batch_size) if pairing == "local_to_global" else slice(0, 2 * batch_size)


def search_tokens(global_tokens: torch.Tensor, batch_size: int, request: SearchRequest) -> torch.Tensor:
    """The token maps the queries search, row for row: global 1 repeated per local crop, or the swapped globals."""
    if request.pairing == "local_to_global":
        return global_tokens[:batch_size].repeat(request.n_crops - 2, 1, 1)
    return torch.cat([global_tokens[batch_size:], global_tokens[:batch_size]])


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

    def forward(self, crops: list[torch.Tensor], search: Optional[SearchRequest] = None) -> NetworkOutput:
        """Every use of the parameters happens here, inside the module's forward, so that wrappers that gather
        parameters around the forward (FSDP2, ZeRO-3) or track their use (DDP) see all of it."""
        features = [self.backbone(torch.cat(crops[start:end])) for start, end in resolution_groups(crops)]
        pooled = torch.cat([feature.pooled for feature in features])
        mlp_logits = self.mlp_head(pooled)
        thead_logits = queries = search_logits = None
        if self.thead is not None:
            thead_logits = torch.cat([self.thead(feature.tokens, feature.grid) for feature in features])
            queries = self.thead.project_query(pooled).detach()  # queries carry no gradient into the other model
            if search is not None:
                globals_ = features[0]  # the two global crops share the first resolution group
                tokens = search_tokens(globals_.tokens, crops[0].shape[0], search)
                search_logits = self.thead(tokens, globals_.grid, query=search.queries)
        return NetworkOutput(pooled, mlp_logits, thead_logits, features, queries, search_logits)
