"""The two projection heads of each model: the DINO MLP-Head and the transformer T-Head."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from mokd.kernels import attention


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class WeightNormLinear(nn.Module):
    """Linear(in, out, bias=False) with W = g * v / ||v|| per output row; g starts at 1.

    Written out rather than with torch's weight_norm parametrisation so that v and g are plain
    parameters that shard, average and checkpoint like any other.
    """

    def __init__(self, in_features: int, out_features: int, trainable_norm: bool) -> None:
        super().__init__()
        # v keeps nn.Linear's default initialisation (as the official heads do: weight_norm wraps a fresh Linear),
        # rows of norm ~0.58 rather than trunc-normal(0.02)'s ~0.16; only its direction enters the output.
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))  # what nn.Linear.reset_parameters does
        self.weight_g = nn.Parameter(torch.ones(out_features, 1), requires_grad=trainable_norm)

    def forward(self, inputs: Optional[torch.Tensor]) -> torch.Tensor:
        """inputs W^T; with inputs None, the effective weight W = g * v / ||v|| itself, [out, in] (loss.fused_head
        multiplies with it tile by tile). Through forward either way, so that wrappers that gather parameters
        around a module's forward (FSDP2 units, ZeRO-3) gather them for this use too."""
        weight = self.weight_g * F.normalize(self.weight_v, dim=1)
        return weight if inputs is None else F.linear(inputs, weight)


class MLPHead(nn.Module):
    """Linear(C,2048)-GELU-Linear(2048,2048)-GELU-Linear(2048,256), L2-normalise, weight-normed Linear(256,K).

    With `batchnorm` (DINO's use_bn_in_head) a BatchNorm1d follows each hidden Linear: on small data the plain
    head maps every image to one vector within tens of steps, and the centred teacher turns uniform; the batch
    statistics keep the hidden features spread. Under every multi-process strategy the BatchNorm becomes
    GlobalBatchNorm like the backbone's, so it sees the whole global batch.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, bottleneck_dim: int, trainable_norm: bool,
                 batchnorm: bool = False) -> None:
        super().__init__()

        def hidden(width_in: int) -> list[nn.Module]:
            return [nn.Linear(width_in, hidden_dim), *([nn.BatchNorm1d(hidden_dim)] if batchnorm else []), nn.GELU()]

        self.mlp = nn.Sequential(*hidden(in_dim), *hidden(hidden_dim), nn.Linear(hidden_dim, bottleneck_dim))
        self.mlp.apply(_init_linear)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, trainable_norm)

    def forward(self, pooled: torch.Tensor, logits: bool = True) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The logits [rows, K]; with logits=False, the last layer's input (the L2-normalised bottleneck,
        [rows, bottleneck]) and its effective weight [K, bottleneck] instead."""
        features = F.normalize(self.mlp(pooled), dim=-1)
        return self.last_layer(features) if logits else (features, self.last_layer(None))


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, backend: str) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, length, dim = tokens.shape
        qkv = self.qkv(tokens).reshape(batch, length, 3, self.num_heads, dim // self.num_heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, N, head_dim]
        mixed = attention(query, key, value, backend=self.backend)
        return self.proj(mixed.transpose(1, 2).reshape(batch, length, dim))


class TransformerBlock(nn.Module):
    """Pre-norm ViT block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, backend: str) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = SelfAttention(dim, num_heads, backend)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens + self.attn(self.norm1(tokens))
        return tokens + self.mlp(self.norm2(tokens))


class THead(nn.Module):
    """T-Head g: project C -> D, add a learned positional embedding, 3 ViT-S blocks, LayerNorm, mean, Linear(D,K)
    (with `l2_normalise`, the mean L2-normalised before the last layer, as in the MLP-Head; not the official head).

    As in the official code the projection keeps its layer's default initialisation (a 1x1 convolution there, the
    same fan-in uniform as nn.Linear's), the blocks are trunc-normal(0.02), and the last layer's norm weight_g is
    always trainable (whatever the model's MLP-Head does). The positional embedding is learned on the global crops' token grid and interpolated to any other
    grid. With a query (feature search), the query is prepended without a positional embedding; through
    self-attention the tokens are re-weighted toward it, and its own output is dropped before the mean.
    """

    def __init__(self, in_dim: int, out_dim: int, dim: int, depth: int, num_heads: int, mlp_ratio: float,
                 base_grid: tuple[int, int], attention_backend: str, l2_normalise: bool = False) -> None:
        super().__init__()
        self.base_grid = base_grid
        self.l2_normalise = l2_normalise
        self.pos_embed = nn.Parameter(torch.zeros(1, base_grid[0] * base_grid[1], dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList(TransformerBlock(dim, num_heads, mlp_ratio, attention_backend) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.apply(_init_linear)
        self.proj = nn.Identity() if in_dim == dim else nn.Linear(in_dim, dim)  # after apply: default init
        self.last_layer = WeightNormLinear(dim, out_dim, trainable_norm=True)

    def project_query(self, pooled: torch.Tensor) -> torch.Tensor:
        """q = P(z): the query this model sends into the other model's teacher T-Head, [B, D]."""
        return self.proj(pooled)

    def positional_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        if tuple(grid) == tuple(self.base_grid):
            return self.pos_embed
        base = self.pos_embed.reshape(1, *self.base_grid, -1).permute(0, 3, 1, 2)
        resized = F.interpolate(base, size=grid, mode="bicubic", align_corners=False)
        return resized.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int], query: Optional[torch.Tensor] = None,
                logits: bool = True) -> torch.Tensor:
        """The logits [rows, K]; with logits=False the last layer's input instead (the mean of the normalised
        output tokens, [rows, D]; the weight is last_layer(None))."""
        hidden = self.proj(tokens) + self.positional_embedding(grid)
        if query is not None:
            hidden = torch.cat([query.unsqueeze(1).to(hidden.dtype), hidden], dim=1)
        for block in self.blocks:
            hidden = block(hidden)
        hidden = self.norm(hidden)
        if query is not None:
            hidden = hidden[:, 1:]
        pooled = hidden.mean(dim=1)
        if self.l2_normalise:
            pooled = F.normalize(pooled, dim=-1, p=2)
        return self.last_layer(pooled) if logits else pooled
