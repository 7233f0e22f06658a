"""The native CPU kernels (C++ torch custom operators built from csrc/ by CMakeLists.txt): loading and binding.

The shared library ``libmokd_native.so`` registers ``torch.ops.mokd.dino_cross_entropy`` (forward: loss, teacher
column sums, entropy and the per-row log-sum-exps its backward needs), ``dino_cross_entropy_backward`` and
``ema_``. This module finds and loads it (the installed copy next to this file, written by ``pip install -e .``,
else ``build/`` of a checkout built by hand with ``cmake -S . -B build && cmake --build build``, or the path in
``MOKD_NATIVE_LIBRARY``), and registers what the C++ side leaves to Python: the autograd formula and the fake
(meta) kernels that let ``torch.compile`` trace through the ops.

Without the library everything else keeps working: ``loss.kernel=auto`` stays on the torch path, and asking for
``native`` raises ``NativeKernelsUnavailable`` with the command that builds it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

LIBRARY_NAME = "libmokd_native.so"
_PACKAGE_DIR = Path(__file__).resolve().parent
BUILD_HINT = (
    "build them with `pip install --no-build-isolation -e .` (needs cmake >= 3.18 and a C++20 compiler; "
    "`make setup` installs both) or by hand with `cmake -S . -B build && cmake --build build`"
)


class NativeKernelsUnavailable(RuntimeError):
    """The native CPU kernels were asked for but the library is not built (or failed to load)."""


def _candidates() -> list[Path]:
    explicit = os.environ.get("MOKD_NATIVE_LIBRARY")
    if explicit:
        return [Path(explicit)]
    return [_PACKAGE_DIR / LIBRARY_NAME, _PACKAGE_DIR.parent.parent / "build" / LIBRARY_NAME]


_NOT_TRIED = "not tried"
_problem: str | None = _NOT_TRIED  # None once loaded, else why it could not be


def _load() -> str | None:
    """Loads the library once and registers the Python halves of its ops; returns why it failed, or None.
    (A module global rather than functools.cache: torch.compile traces through a global read, not the cache.)"""
    global _problem
    if _problem is _NOT_TRIED:
        _problem = _try_load()
    return _problem


def _try_load() -> str | None:
    found = [path for path in _candidates() if path.is_file()]
    if not found:
        return f"{LIBRARY_NAME} not found (looked in {', '.join(str(p) for p in _candidates())})"
    try:
        torch.ops.load_library(str(found[0]))
    except OSError as error:
        return f"{found[0]} failed to load: {error}"
    _register_python_side()
    return None


def available() -> bool:
    """Whether the native CPU kernels are built and loaded."""
    return _load() is None


def require(what: str) -> None:
    """Raises NativeKernelsUnavailable, saying why and how to build, unless the library is loaded."""
    problem = _load()
    if problem is not None:
        raise NativeKernelsUnavailable(f"{what} needs the native CPU kernels: {problem}; {BUILD_HINT}")


def cpu_capability() -> str:
    """The instruction set the kernels run with here: avx512, avx2 or default (``MOKD_CPU_CAPABILITY`` lowers it)."""
    require("cpu_capability")
    return torch.ops.mokd.cpu_capability()


def _accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _register_python_side() -> None:
    @torch.library.register_fake("mokd::dino_cross_entropy")
    def _(student, teacher, centre, tau_s, tau_t, batch, exclude_same):
        acc = _accumulation_dtype(student)
        new = {"dtype": acc, "device": student.device}
        return (student.new_empty((), **new), student.new_empty((student.shape[1],), **new),
                student.new_empty((), **new), student.new_empty((student.shape[0],), **new),
                student.new_empty((teacher.shape[0],), **new))

    @torch.library.register_fake("mokd::dino_cross_entropy_backward")
    def _(grad_loss, student, teacher, centre, lse_s, lse_t, tau_s, tau_t, batch, exclude_same):
        return torch.empty_like(student)

    @torch.library.register_fake("mokd::ema_")
    def _(targets, sources, weight):
        return None

    def setup_context(ctx, inputs, output):
        student, teacher, centre, tau_s, tau_t, batch, exclude_same = inputs
        _, column_sum, entropy, lse_s, lse_t = output
        ctx.save_for_backward(student, teacher, centre, lse_s, lse_t)
        ctx.args = (tau_s, tau_t, batch, exclude_same)
        ctx.mark_non_differentiable(column_sum, entropy, lse_s, lse_t)

    def backward(ctx, grad_loss, _column_sum, _entropy, _lse_s, _lse_t):
        student, teacher, centre, lse_s, lse_t = ctx.saved_tensors
        grad = torch.ops.mokd.dino_cross_entropy_backward(grad_loss, student, teacher, centre, lse_s, lse_t,
                                                         *ctx.args)
        return grad, None, None, None, None, None, None

    torch.library.register_autograd("mokd::dino_cross_entropy", backward, setup_context=setup_context)
