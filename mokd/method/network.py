"""One model of a run: backbone f, MLP-Head h and (optional) T-Head g, with the multi-crop forward."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn

from mokd.method.backbones import Backbone, BackboneOutput
from mokd.method.heads import MLPHead, THead


class HeadInput(NamedTuple):
    """A head's logits before its last layer: logits = features @ weight.T (loss.fused_head keeps them so)."""

    features: torch.Tensor  # [S*B, d]
    weight: torch.Tensor  # [K, d], the weight-normalised last layer's effective weight


class NetworkOutput(NamedTuple):
    pooled: torch.Tensor  # z for every crop, crops stacked crop-major: [S*B, C]
    mlp_logits: Optional[torch.Tensor]  # h(z): [S*B, K]; None when the forward returns head inputs instead
    thead_logits: Optional[torch.Tensor]  # g(Z): [S*B, K], None without a T-Head (or with head inputs)
    features: list[BackboneOutput]  # backbone output per pass (resolution group or crop), in crop order, detached
    queries: Optional[torch.Tensor]  # q = P(z), detached: what this model sends into the other's T-Head [S*B, D]
    mlp_input: Optional[HeadInput] = None  # with head_logits=False: h's last-layer input and weight
    thead_input: Optional[HeadInput] = None  # with head_logits=False: g's last-layer input and weight


class SearchRequest(NamedTuple):
    """A feature search in this network's T-Head: the other student's queries, each prepended to the token
    map it searches (from this network's own forward over the global crops)."""

    queries: torch.Tensor  # [R, D]
    tokens: torch.Tensor  # [R, N, C]
    grid: tuple[int, int]


def searched_rows(pairing: str, batch_size: int, n_crops: int) -> slice:
    """Rows (crop-major) of the student crops whose queries search: the locals, or the two globals."""
    return slice(2 * batch_size, n_crops * batch_size) if pairing == "local_to_global" else slice(0, 2 * batch_size)


def search_request(teacher_out: NetworkOutput, queries: torch.Tensor, pairing: str, batch_size: int,
                   n_crops: int) -> SearchRequest:
    """Row for row, the token map each query searches: local_to_global, the teacher's first global view for
    every local crop's query; global_to_global, global b for the query of global a != b."""
    globals_ = torch.cat([feature.tokens for feature in teacher_out.features])[:2 * batch_size]
    if pairing == "local_to_global":
        tokens = globals_[:batch_size].repeat(n_crops - 2, 1, 1)
    else:
        tokens = torch.cat([globals_[batch_size:], globals_[:batch_size]])
    return SearchRequest(queries, tokens, teacher_out.features[0].grid)


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

    def __init__(self, model_config, head_config, in_chans: int, global_crop_size: int, thead_dim: Optional[int],
                 drop_path: float) -> None:
        """`thead_dim`: the T-Head width D shared by every model (see models.thead_width), or None for no T-Head."""
        super().__init__()
        self.backbone = Backbone(model_config, in_chans, global_crop_size, drop_path)
        channels = self.backbone.num_features
        self.mlp_head = MLPHead(channels, head_config.out_dim, head_config.mlp_hidden_dim,
                                head_config.mlp_bottleneck_dim, model_config.trainable_last_layer_norm,
                                batchnorm=head_config.mlp_batchnorm)
        # One backbone pass per resolution group (true) or per crop (the official per-crop loop; perf.grouped_crops).
        self.grouped_crops = True
        self.thead: Optional[THead] = None
        if thead_dim is not None:
            side = global_crop_size // self.backbone.patch_size
            self.thead = THead(channels, head_config.out_dim, thead_dim, head_config.thead_depth,
                               head_config.thead_heads, head_config.thead_mlp_ratio, (side, side),
                               head_config.attention, model_config.thead_l2_normalise)

    def sharding_units(self) -> list[nn.Module]:
        """The modules FSDP2 shards as units of their own below the root (and `mokd plan` counts as gathered whole
        at once): the backbone's blocks and the MLP-Head. The T-Head stays in the root unit: besides its forward
        (once per resolution group, and the search) the network calls its query projection directly, which only
        the root's gathered parameters serve."""
        return [*self.backbone.sharding_units(), self.mlp_head]

    def last_layers(self) -> list[nn.Module]:
        """The weight-normalised output layers, frozen during the first epoch(s)."""
        heads = [self.mlp_head] + ([self.thead] if self.thead is not None else [])
        return [head.last_layer for head in heads]

    def forward(self, crops: Optional[list[torch.Tensor]] = None, search: Optional[SearchRequest] = None,
                head_logits: bool = True) -> NetworkOutput | torch.Tensor:
        """The multi-crop forward (crops), or a feature search in the T-Head (search: returns its logits).

        With head_logits=False the heads stop before their last layer: the output carries each head's input and
        effective weight (mlp_input, thead_input) instead of the [S*B, K] logits, for loss.fused_head. The weights
        come from the heads' own forwards, inside this one, so that parameter-gathering wrappers see their use.

        Every use of the parameters goes through this method, so that wrappers that gather parameters around
        the forward (FSDP2, ZeRO-3) or track their use (DDP) see all of it."""
        if search is not None:
            return self.thead(search.tokens, search.grid, query=search.queries)
        groups = resolution_groups(crops) if self.grouped_crops else [(i, i + 1) for i in range(len(crops))]
        features = [self.backbone(crops[start] if end - start == 1 else torch.cat(crops[start:end]))
                    for start, end in groups]
        pooled = torch.cat([feature.pooled for feature in features])
        thead_logits = queries = mlp_input = thead_input = None
        if head_logits:
            mlp_logits = self.mlp_head(pooled)
        else:
            mlp_logits = None
            mlp_input = HeadInput(*self.mlp_head(pooled, logits=False))
        if self.thead is not None:
            if head_logits:
                thead_logits = torch.cat([self.thead(feature.tokens, feature.grid) for feature in features])
            else:
                thead_input = HeadInput(torch.cat([self.thead(f.tokens, f.grid, logits=False) for f in features]),
                                        self.thead.last_layer(None))
            queries = self.thead.project_query(pooled).detach()  # queries carry no gradient into the other model
        # The per-pass backbone outputs are only read from the teachers (feature searches, no gradient), and
        # they are views (class token, patch slice, transposed map): detached, none leaves a wrapped forward as a
        # view with a gradient, which an in-place op could cut off from FSDP2's pre-backward all-gather.
        features = [feature._replace(pooled=feature.pooled.detach(), tokens=feature.tokens.detach())
                    for feature in features]
        return NetworkOutput(pooled, mlp_logits, thead_logits, features, queries, mlp_input, thead_input)
