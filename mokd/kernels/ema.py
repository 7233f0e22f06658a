"""In-place exponential moving average over many tensors: theta' <- theta' + (1 - m) (theta - theta').

Used for the teachers (theta' teacher, theta student, m on a cosine schedule) and for the DINO centres
(c <- m c + (1 - m) batch_mean). The tensors are whatever the caller holds locally: whole parameters, FSDP2
local shards (``DTensor.to_local()``) or DeepSpeed flat partitions; the update is elementwise, so shards need
no communication.

One launch per (device, dtype) group:
  * CUDA (and the Triton interpreter): one Triton kernel over a table of pointers. The plan (each tensor's
    target and source addresses, its size, and which program covers which block of which tensor) is built
    once per distinct set of addresses and cached on the device, so a training step costs one launch and no
    host-to-device copy. Pairs whose target or source is not contiguous cannot be addressed as a flat range
    and go through ``torch._foreach_lerp_`` instead (correct for any strides).
  * CPU, when the native kernels are built (mokd/kernels/native.py): ``torch.ops.mokd.ema_``, one C++ loop over
    all contiguous fp32/bf16/fp16 pairs of the group, split over threads;
  * elsewhere (and for strided or float64 pairs): ``torch._foreach_lerp_(targets, sources, 1 - m)``.
All compute in fp32 (torch's opmath for bf16/fp16) with torch.lerp's formula, so they agree with
``torch.lerp(target, source, 1 - m)``.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence

import torch

from mokd.kernels import native

try:
    import triton
    import triton.language as tl

    _jit = triton.jit
except ImportError:  # CPU-only torch wheels ship without Triton; the kernel is then never launched
    triton = None
    tl = None

    def _jit(fn):
        return fn


_BLOCK = 4096  # elements per program: large enough to amortise the table lookups, small enough for many programs


@_jit
def _ema_kernel(
    target_ptrs, source_ptrs, numels, program_tensor, program_block, weight_ptr, weight,
    DTYPE: tl.constexpr, WEIGHT_IS_TENSOR: tl.constexpr, BLOCK: tl.constexpr,
):
    """Program p updates block program_block[p] of tensor program_tensor[p] (addresses read from the tables)."""
    pid = tl.program_id(0)
    i = tl.load(program_tensor + pid)
    target = tl.load(target_ptrs + i).to(tl.pointer_type(DTYPE))
    source = tl.load(source_ptrs + i).to(tl.pointer_type(DTYPE))
    offs = tl.load(program_block + pid).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < tl.load(numels + i)
    if WEIGHT_IS_TENSOR:
        weight = tl.load(weight_ptr).to(tl.float32)
    t = tl.load(target + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(source + offs, mask=mask, other=0.0).to(tl.float32)
    # torch.lerp's two-sided form: exact at both ends (weight 0 and 1) and the same rounding as torch.
    out = tl.where(tl.abs(weight) < 0.5, t + weight * (s - t), s - (s - t) * (1.0 - weight))
    tl.store(target + offs, out.to(DTYPE), mask=mask)


# float64 stays on the foreach path: the kernel computes in fp32.
_TL_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _tables(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Device tables for the kernel: each pair's target address, source address and size, and for every program
    the tensor and block it covers. Built once per plan: parameters do not move."""
    device = targets[0].device
    addresses = [(t.data_ptr(), s.data_ptr(), t.numel()) for t, s in zip(targets, sources)]
    target_ptrs, source_ptrs, numels = (torch.tensor(column, dtype=torch.int64) for column in zip(*addresses))
    blocks = (numels + _BLOCK - 1) // _BLOCK
    program_tensor = torch.repeat_interleave(torch.arange(len(addresses), dtype=torch.int32), blocks)
    first_program = torch.cumsum(blocks, 0) - blocks
    program_block = (torch.arange(len(program_tensor)) - first_program[program_tensor.long()]).to(torch.int32)
    return tuple(x.to(device) for x in (target_ptrs, source_ptrs, numels, program_tensor, program_block))


def _triton_usable(device: torch.device) -> bool:
    # The Triton interpreter (TRITON_INTERPRET=1) runs the kernel on CPU tensors; it is how it is tested.
    return triton is not None and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


def _foreach_lerp(targets: list[torch.Tensor], sources: list[torch.Tensor], weight: float | torch.Tensor) -> None:
    if isinstance(weight, torch.Tensor):
        # The list overload keeps a device-side weight on the device (the scalar overload would sync to read it).
        torch._foreach_lerp_(targets, sources, [weight] * len(targets))
    else:
        torch._foreach_lerp_(targets, sources, weight)


def _native_usable(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype in _TL_DTYPES and native.available()


class _Group:
    """The pairs of one (device, dtype): contiguous pairs go to the Triton kernel (tables built here, once) or, on
    CPU, to the native op; the rest (strided, float64, or neither kernel) to torch._foreach_lerp_."""

    def __init__(self, device: torch.device, dtype: torch.dtype, pairs: list[tuple[torch.Tensor, torch.Tensor]]):
        self.device, self.dtype = device, dtype
        triton_kernel = _triton_usable(device) and dtype in _TL_DTYPES
        kernel = triton_kernel or _native_usable(device, dtype)
        flat = [(t, s) for t, s in pairs if kernel and t.is_contiguous() and s.is_contiguous() and t.numel()]
        rest = [(t, s) for t, s in pairs if not (kernel and t.is_contiguous() and s.is_contiguous())]
        self.tables = _tables([t for t, _ in flat], [s for _, s in flat]) if flat and triton_kernel else None
        self.native = ([t for t, _ in flat], [s for _, s in flat]) if flat and not triton_kernel else None
        self.foreach = ([t for t, _ in rest], [s for _, s in rest])

    def update(self, weight: float | torch.Tensor) -> None:
        if isinstance(weight, torch.Tensor):
            weight = weight.to(self.device)
        if self.native is not None:
            # A 0-dim tensor weight is rounded to the group's dtype first, as torch's type promotion does for
            # lerp with a tensor weight (and so _foreach_lerp_). On CPU, reading it is no device sync.
            value = float(weight.to(self.dtype)) if isinstance(weight, torch.Tensor) else weight
            torch.ops.mokd.ema_(*self.native, value)
        if self.tables is not None:
            weight_is_tensor = isinstance(weight, torch.Tensor)
            _ema_kernel[(len(self.tables[3]),)](
                *self.tables,
                weight if weight_is_tensor else None,
                0.0 if weight_is_tensor else weight,
                DTYPE=getattr(tl, _TL_DTYPES[self.dtype]), WEIGHT_IS_TENSOR=weight_is_tensor, BLOCK=_BLOCK,
            )
        if self.foreach[0]:
            _foreach_lerp(*self.foreach, weight)


class EmaPlan:
    """A fixed set of (target, source) pairs, validated and grouped once, so that ``update`` costs one launch
    per (device, dtype) group and no per-tensor Python (which, at the ~470 tensors of R101 + ViT-B, takes
    milliseconds: longer than the update itself on a GPU). Valid while the tensors keep their storage, as
    parameters, FSDP2 local shards and DeepSpeed partitions do."""

    def __init__(self, targets: Sequence[torch.Tensor], sources: Sequence[torch.Tensor]) -> None:
        if len(targets) != len(sources):
            raise ValueError(f"ema_: {len(targets)} targets but {len(sources)} sources")
        grouped: dict[tuple[torch.device, torch.dtype], list] = defaultdict(list)
        for i, (target, source) in enumerate(zip(targets, sources)):
            if target.shape != source.shape:
                raise ValueError(f"ema_: pair {i}: target shape {tuple(target.shape)} != source {tuple(source.shape)}")
            if target.dtype != source.dtype or target.device != source.device:
                raise ValueError(
                    f"ema_: pair {i}: target is {target.dtype} on {target.device}, source {source.dtype} on "
                    f"{source.device}; they must match"
                )
            if not target.is_floating_point():
                raise ValueError(f"ema_: pair {i}: dtype {target.dtype} is not floating point")
            grouped[(target.device, target.dtype)].append((target.detach(), source.detach()))
        self.groups = [_Group(device, dtype, pairs) for (device, dtype), pairs in grouped.items()]

    def update(self, momentum: float | torch.Tensor) -> None:
        """target <- target + (1 - momentum) * (source - target) for every pair, in place."""
        if isinstance(momentum, torch.Tensor):
            if momentum.dim() != 0:
                raise ValueError(f"ema_: momentum tensor must be 0-dim, got shape {tuple(momentum.shape)}")
            weight: float | torch.Tensor = 1.0 - momentum.detach().float()
        else:
            weight = 1.0 - float(momentum)
        for group in self.groups:
            group.update(weight)


def ema_per_tensor_(targets: Sequence[torch.Tensor], sources: Sequence[torch.Tensor], momentum: float) -> None:
    """DINO's teacher update, one tensor at a time: target <- m * target + (1 - m) * source (two ops and a
    temporary per tensor). The baseline the fused path is measured against (perf.fused_ema=false)."""
    if len(targets) != len(sources):
        raise ValueError(f"ema_per_tensor_: {len(targets)} targets but {len(sources)} sources")
    for target, source in zip(targets, sources):
        target.detach().mul_(momentum).add_((1 - momentum) * source.detach())


def ema_(
    targets: Sequence[torch.Tensor], sources: Sequence[torch.Tensor], momentum: float | torch.Tensor
) -> None:
    """In place, for every pair: target <- target + (1 - momentum) * (source - target).

    ``momentum`` is a float or a 0-dim tensor (it may live on the device, so a schedule never forces a sync).
    Pairs must agree in shape, dtype and device; any mix of dtypes and devices is grouped, one launch per group.
    Sources are read without autograd (``.detach()``), targets are written in place. For the same pairs every
    step, build an ``EmaPlan`` once and call its ``update``.
    """
    EmaPlan(targets, sources).update(momentum)
