"""Process-level settings of a run: device, mixed precision, determinism and RNG state."""

from __future__ import annotations

import contextlib
import functools
import random
import resource
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from mokd.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible; use train.device=cpu")
    return torch.device(name)


@functools.lru_cache(maxsize=None)  # the CPU does not change while a process runs
def cpu_bf16_matrix_unit() -> Optional[str]:
    """The CPU's bf16 matrix/dot-product instructions that oneDNN uses for bf16 convolutions and matmuls
    (AMX-BF16 on Intel Sapphire Rapids and later, AVX512-BF16 on Cooper Lake and AMD Zen 4/5), or None.
    Read from /proc/cpuinfo's flags (Linux); elsewhere None, so `auto` stays fp32."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        return None
    return next((name for flag, name in (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16"))
                 if flag in flags), None)


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """auto: bf16 autocast on CUDA and on CPUs with bf16 matrix instructions (measured on the demo pair, batch 64,
    one thread: 1.6x the images/s of fp32 on an AVX512-BF16 CPU, 1.4x with AMX-BF16; README "The recipe"), fp32 on
    other CPUs. fp16 on request (with a GradScaler per model)."""
    if precision == "auto":
        fast_bf16 = device.type == "cuda" or (device.type == "cpu" and cpu_bf16_matrix_unit() is not None)
        return torch.bfloat16 if fast_bf16 else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def describe_precision(precision: str, device: torch.device) -> str:
    """The start-of-run line saying what the step computes in, and why."""
    dtype = autocast_dtype(precision, device)
    chosen = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + GradScalers"}[dtype]
    if precision != "auto":
        return f"mokd: precision {chosen} (train.precision={precision})"
    why = ("CUDA" if device.type == "cuda" else
           f"this CPU has {cpu_bf16_matrix_unit()}" if dtype is not None else "this CPU has no bf16 matrix unit")
    return f"mokd: precision {chosen} (train.precision=auto: {why}; train.precision=fp32 to override)"


def autocast(device: torch.device, dtype: Optional[torch.dtype]) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def set_determinism(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def rng_state() -> dict[str, Any]:
    """Every generator's state as tensors and plain values (a checkpoint file loads with weights_only=True):
    Python's is a tuple of ints already; numpy's key array is stored as a tensor."""
    name, key, position, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (name, torch.from_numpy(key.copy()), int(position), int(has_gauss), float(gauss))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, key, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, key.numpy(), position, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def peak_memory_bytes(device: torch.device) -> int:
    """Peak CUDA memory allocated, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def seed_rng_for_rank(seed: int, step: int, rank: int) -> None:
    """Fresh, reproducible RNG states for a rank that has no saved state (a resume on more processes)."""
    derived = (seed * 1_000_003 + step * 101 + rank) % 2**31
    random.seed(derived)
    np.random.seed(derived)
    torch.manual_seed(derived)


def peak_extra_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes allocated during one call of fn beyond what was live before it, outputs included.

    CUDA: the allocator's peak minus the allocation before the call. CPU: replayed from torch.profiler's memory
    timeline (every tensor CREATE/DESTROY of the call, profile_memory=True); RSS cannot be used, because glibc
    keeps freed pages and a later call reuses them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    live = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        if action == Action.CREATE:
            live += size
        elif action == Action.DESTROY:
            live -= size
        peak = max(peak, live)
    return peak
