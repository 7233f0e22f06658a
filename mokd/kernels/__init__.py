"""Fused ops: DINO cross-entropy (per term, all terms of one student tensor, fused with the head's last layer), EMA
update, attention dispatch (reference, torch fast path, native C++ on CPU, Triton on CUDA)."""

from mokd.kernels.attention import attention
from mokd.kernels.dino_cross_entropy import DinoCrossEntropyOutput, dino_cross_entropy
from mokd.kernels.fused_head import fused_head
from mokd.kernels.fused_terms import DinoTarget, FusedTermsOutput, fused_terms
from mokd.kernels.ema import EmaPlan, ema_, ema_per_tensor_
from mokd.kernels.native import NativeKernelsUnavailable

__all__ = ["DinoCrossEntropyOutput", "DinoTarget", "EmaPlan", "FusedTermsOutput", "attention", "dino_cross_entropy",
           "ema_", "ema_per_tensor_", "fused_head", "fused_terms", "NativeKernelsUnavailable"]
