"""Attention dispatch for the T-Head: softmax(Q K^T / sqrt(d)) V over [B, heads, N, head_dim] tensors.

The backends (head.attention) are registered in BACKENDS, each with what it runs.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from mokd.config import register_choices
from mokd.registry import Registry

Backend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]  # (q, k, v, dropout_p)
BACKENDS: Registry[Backend] = Registry("head.attention")
register_choices(BACKENDS.key, BACKENDS.helps)


@BACKENDS.register("sdpa", "torch's scaled_dot_product_attention: FlashAttention-2 or memory-efficient kernels on "
                           "CUDA, a fused kernel on CPU")
def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)


@BACKENDS.register("flash", "flash_attn.flash_attn_func (optional package mokd[flash]; CUDA, fp16 or bf16)")
def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
    try:
        from flash_attn import flash_attn_func
    except ImportError as err:
        raise ImportError(
            "attention: backend='flash' needs the optional package flash_attn (pip install 'mokd[flash]'); "
            "it is not installed. Use backend='sdpa', which already runs FlashAttention-2 kernels on CUDA."
        ) from err
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(
            f"attention: backend='flash' needs CUDA fp16/bf16 tensors, got {q.dtype} on {q.device}; use 'sdpa'"
        )
    # flash_attn takes [B, N, heads, d]: transposed in, and the output back.
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p)
    return out.transpose(1, 2)


@BACKENDS.register("math", "the explicit softmax(QK^T / sqrt(d))V with plain ops (the reference of the tests)")
def _math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ v


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa", dropout_p: float = 0.0
) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim)) v for q, k, v of shape [B, heads, N, head_dim]; same shape out.

    ``dropout_p`` is applied to the attention weights; pass 0.0 outside training.
    """
    if backend not in BACKENDS:
        raise ValueError(f"attention: backend must be one of {', '.join(BACKENDS.names())}, got {backend!r}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            "attention: q, k, v must be [B, heads, N, head_dim], got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    return BACKENDS.get(backend)(q, k, v, dropout_p)
