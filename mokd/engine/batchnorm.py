"""Batch normalisation over the global batch of all ranks, on any device (torch's SyncBatchNorm is GPU-only).

With one process of batch 2B, a BatchNorm layer normalises with the statistics of 2B images; with two ranks of
B it would see only B each. GlobalBatchNorm all-reduces the per-channel sum and sum of squares (one collective
per layer and forward) so every rank normalises with the statistics of the whole global batch, and its
backward, through the differentiable all-reduce, is the gradient of the global-batch loss. Running statistics
get the same update on every rank, so they stay identical without a broadcast.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class _SumOverRanks(torch.autograd.Function):
    """y = sum over ranks of x; the gradient of a sum is the sum of the ranks' gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"GlobalBatchNorm expects [N, C, ...] input, got shape {tuple(input.shape)}")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(input)
        channels = input.shape[1]
        x = input.float().transpose(0, 1).reshape(channels, -1)
        count = torch.tensor([float(x.shape[1])], device=input.device)
        # fp32 sums; the differentiable all-reduce sums the gradient back to every rank in backward.
        stats = _SumOverRanks.apply(torch.cat([x.sum(dim=1), (x * x).sum(dim=1), count]))
        total = stats[-1]
        mean = stats[:channels] / total
        var = (stats[channels:2 * channels] / total - mean * mean).clamp(min=0.0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                unbiased = var * total / (total - 1).clamp(min=1.0)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        shape = [1, channels] + [1] * (input.dim() - 2)
        out = (input.float() - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(input.dtype)


def convert_to_global_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm1d/2d/3d (in place, keeping parameters and buffers) by GlobalBatchNorm."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, GlobalBatchNorm):
            replacement = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                          child.track_running_stats)
            replacement.load_state_dict(child.state_dict())
            replacement.train(child.training)
            for parameter, original in zip(replacement.parameters(), child.parameters()):
                parameter.requires_grad_(original.requires_grad)
            setattr(module, name, replacement)
        else:
            convert_to_global_batchnorm(child)
    return module


def has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


