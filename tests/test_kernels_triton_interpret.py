"""The Triton kernels on CPU through the Triton interpreter (and, compiled, on a GPU: run this file as
``python tests/test_kernels_triton_interpret.py GROUP cuda``, as benchmarks/device_check.sh does).

TRITON_INTERPRET=1 must be set before Triton kernels are first imported, and other tests in the same pytest
process import mokd.kernels without it, so every group of checks runs this file as a script in a subprocess
with the variable set. The checks themselves are the ones the torch paths pass (imported from
test_kernels_dino_ce.py and test_kernels_ema.py). Shapes stay small: the interpreter runs kernels in numpy.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

# (S, T, B, K, pairing, with centre): K not a multiple of the block (257, 300), B = 1, 2+0 and 2+10 crops,
# T > S, a lone teacher view, both pairings; K spanning several column blocks (4500 = 2048-column blocks with
# 2 views, 2500 = 1024-column blocks with 3 views), so the forward's cross-block combine is exercised.
TRITON_CASES = [
    (4, 2, 2, 4500, "dino", True),
    (2, 3, 1, 2500, "dino", False),
    (4, 2, 2, 300, "dino", True),
    (2, 2, 1, 257, "dino", False),
    (12, 2, 1, 300, "dino", True),
    (3, 1, 2, 300, "dino", True),
    (2, 3, 2, 257, "dino", False),
    (3, 3, 2, 257, "one_to_one", True),
    (1, 1, 2, 300, "one_to_one", False),
]
GROUPS = ["dino_fp32", "dino_bf16", "dino_fp16", "dino_layouts", "ema"]
REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("group", GROUPS)
def test_triton_interpreted(group):
    # The checkout's mokd, not an installed one, whatever the caller's PYTHONPATH.
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, __file__, group], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"{group} failed under the Triton interpreter:\n{proc.stdout}\n{proc.stderr}"


def _check_dino(dtype_name, device):
    import torch
    from test_kernels_dino_ce import case_seed, check_against_literal

    dtype = getattr(torch, dtype_name)
    for case in TRITON_CASES:
        check_against_literal(case, dtype, "triton", seed=case_seed(case, dtype, "triton"), device=device)


def _check_dino_layouts(device):
    """Row-strided views (slices of wider logits), column-strided (transposed) logits, a teacher that requires
    grad, programs looping over several images."""
    import torch
    from test_kernels_dino_ce import TAU_S, TAU_T, literal_dino64

    from mokd.kernels import dino_cross_entropy

    gen = torch.Generator().manual_seed(0)
    wide_student = (torch.randn(4 * 2, 320, generator=gen) * 3.0).to(device).requires_grad_(True)
    wide_teacher = (torch.randn(2 * 2, 330, generator=gen) * 2.0).to(device).requires_grad_(True)
    student, teacher = wide_student[:, :300], wide_teacher[:, 15:315]
    centre = torch.randn(300, generator=gen).to(device)
    out = dino_cross_entropy(student, teacher, centre, TAU_S, TAU_T, 2, impl="triton")
    out.loss.backward()
    loss64, grad64, colsum64, entropy64 = literal_dino64(student, teacher, centre, 2, "dino")
    torch.testing.assert_close(out.loss.double(), loss64, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(wide_student.grad[:, :300].double(), grad64, rtol=1e-4, atol=1e-8)
    assert torch.all(wide_student.grad[:, 300:] == 0)
    assert wide_teacher.grad is None  # the teacher is treated as detached
    torch.testing.assert_close(out.teacher_column_sum.double(), colsum64, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.teacher_entropy.double(), entropy64, rtol=2e-5, atol=2e-5)

    # Programs that loop over several images (one group, then groups of 2 with a remainder): the default
    # program count gives every image its own program at these sizes.
    import mokd.kernels.dino_cross_entropy as dce
    from test_kernels_dino_ce import check_against_literal

    for target_programs in (1, 4):
        dce._TARGET_PROGRAMS = target_programs
        check_against_literal((4, 2, 3, 300, "dino", True), torch.float32, "triton", seed=target_programs,
                              device=device)

    transposed = student.detach().t().contiguous().t().requires_grad_(True)
    assert transposed.stride(1) != 1
    out_t = dino_cross_entropy(transposed, teacher, centre, TAU_S, TAU_T, 2, impl="triton")
    out_t.loss.backward()
    torch.testing.assert_close(out_t.loss, out.loss)
    torch.testing.assert_close(transposed.grad, wide_student.grad[:, :300])


class _CountingLaunches:
    """Stands in for a Triton kernel object: counts the launches ``kernel[grid](...)`` and forwards them."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def _check_ema(device):
    import torch
    from test_kernels_ema import check_ema

    import mokd.kernels.ema as ema_module
    from mokd.kernels import ema_

    counter = _CountingLaunches(ema_module._ema_kernel)
    ema_module._ema_kernel = counter
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    check_ema(0.996, dtypes, seed=1, exact=False, device=device)
    check_ema(0.3, dtypes, seed=2, exact=False, device=device)
    check_ema(torch.tensor(0.9), dtypes, seed=3, exact=False, device=device)
    assert counter.launches == 3 * len(dtypes), counter.launches  # one launch per dtype group, per call
    # A non-contiguous pair in a group with contiguous ones takes the foreach path, the others the kernel.
    gen = torch.Generator().manual_seed(4)
    targets = [torch.randn(6, 9, generator=gen).to(device).t(), torch.randn(5000, generator=gen).to(device)]
    sources = [torch.randn(9, 6, generator=gen).to(device), torch.randn(5000, generator=gen).to(device)]
    expected = [torch.lerp(t, s, 0.004) for t, s in zip(targets, sources)]
    ema_(targets, sources, 0.996)
    assert counter.launches == 3 * len(dtypes) + 1
    for t, e in zip(targets, expected):
        torch.testing.assert_close(t, e, rtol=1e-6, atol=1e-6)


if __name__ == "__main__":
    device = sys.argv[2] if len(sys.argv) > 2 else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run through pytest, or with TRITON_INTERPRET=1 set, or name a GPU device: GROUP cuda")
    checks = {
        "dino_fp32": lambda: _check_dino("float32", device),
        "dino_bf16": lambda: _check_dino("bfloat16", device),
        "dino_fp16": lambda: _check_dino("float16", device),
        "dino_layouts": lambda: _check_dino_layouts(device),
        "ema": lambda: _check_ema(device),
    }
    import mokd

    assert Path(mokd.__file__).resolve().is_relative_to(REPO), f"imported {mokd.__file__}, not {REPO}'s mokd"
    checks[sys.argv[1]]()
    print(f"{sys.argv[1]} on {device}: passed")
