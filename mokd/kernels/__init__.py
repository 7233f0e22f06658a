"""Fused ops: DINO cross-entropy, EMA update, attention dispatch (reference, torch fast path, native C++ on CPU,
Triton on CUDA)."""

from mokd.kernels.attention import attention
from mokd.kernels.dino_cross_entropy import DinoCrossEntropyOutput, dino_cross_entropy
from mokd.kernels.ema import EmaPlan, ema_, ema_per_tensor_
from mokd.kernels.native import NativeKernelsUnavailable

__all__ = ["DinoCrossEntropyOutput", "EmaPlan", "attention", "dino_cross_entropy", "ema_", "ema_per_tensor_",
           "NativeKernelsUnavailable"]
