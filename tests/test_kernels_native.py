"""The native CPU kernels (torch.ops.mokd, built from csrc/ by CMakeLists.txt) against the float64 literal DINO
loss of test_kernels_dino_ce.py and against torch.lerp; thread-count independence, torch.compile, the trainer.

Skipped as a whole when the library is not built (no cmake or compiler at install time); the refusal of
loss.kernel=native in that case is checked in a subprocess that points the loader at a missing file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from mokd.kernels import EmaPlan, dino_cross_entropy, native
from test_kernels_dino_ce import (CASES, TAU_S, TAU_T, case_seed, check_against_literal, gradcheck_both_pairings,
                                  literal_dino64, make_inputs)
from test_kernels_ema import make_pairs

if not native.available():
    pytest.skip(f"native kernels not built: {native._load()}", allow_module_level=True)

# The shared cases fit one block of the kernels (2048 columns); these span several blocks with a ragged tail.
MULTI_BLOCK_CASES = [
    (12, 2, 2, 4099, "dino", True),
    (2, 2, 1, 6001, "dino", False),
    (2, 2, 3, 4099, "one_to_one", True),
]


def _supported_capabilities() -> list[str]:
    caps = ["default"]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        caps.append("avx2")
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        caps.append("avx512")
    return caps


@pytest.fixture(params=_supported_capabilities())
def capability(request, monkeypatch):
    """Every instruction-set build of the kernels this CPU can run (MOKD_CPU_CAPABILITY is read on each call)."""
    monkeypatch.setenv("MOKD_CPU_CAPABILITY", request.param)
    assert native.cpu_capability() == request.param
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES + MULTI_BLOCK_CASES,
                         ids=lambda c: "S{}T{}B{}K{}-{}-{}".format(*c[:5], "c" if c[5] else "noc"))
def test_matches_float64_literal(case, dtype, capability):
    check_against_literal(case, dtype, "native", seed=case_seed(case, dtype, "native"))


def test_gradcheck_float64(capability):
    gradcheck_both_pairings("native")


def test_teacher_and_side_outputs_get_no_gradient():
    student, teacher, centre = make_inputs(CASES[0], torch.float32, seed=11)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    out = dino_cross_entropy(student, teacher, centre, TAU_S, TAU_T, 3, impl="native")
    assert not out.teacher_column_sum.requires_grad and not out.teacher_entropy.requires_grad
    out.loss.backward()
    assert student.grad is not None and teacher.grad is None


def _run(case, dtype, seed):
    student, teacher, centre = make_inputs(case, dtype, seed)
    student.requires_grad_(True)
    out = dino_cross_entropy(student, teacher, centre, TAU_S, TAU_T, case[2], pairing=case[4], impl="native")
    out.loss.backward()
    return out.loss, out.teacher_column_sum, out.teacher_entropy, student.grad


def test_one_and_two_threads_agree():
    threads = torch.get_num_threads()
    case = (12, 2, 5, 4099, "dino", True)
    try:
        for dtype in (torch.float32, torch.bfloat16):
            torch.set_num_threads(1)
            one = _run(case, dtype, seed=21)
            torch.set_num_threads(2)
            two = _run(case, dtype, seed=21)
            for a, b in zip(one, two):
                torch.testing.assert_close(a.double(), b.double(), rtol=0, atol=1e-6)
    finally:
        torch.set_num_threads(threads)


def test_torch_compile_traces_through_the_op():
    case = CASES[1]
    student, teacher, centre = make_inputs(case, torch.float32, seed=31)

    def loss_of(s, t, c):
        out = dino_cross_entropy(s * 1.0, t, c, TAU_S, TAU_T, case[2], impl="native")
        return out.loss + 0.0 * out.teacher_entropy, out.teacher_column_sum

    eager_s = student.clone().requires_grad_(True)
    eager_loss, eager_colsum = loss_of(eager_s, teacher, centre)
    eager_loss.backward()
    compiled_s = student.clone().requires_grad_(True)
    compiled_loss, compiled_colsum = torch.compile(loss_of, fullgraph=True, backend="aot_eager")(
        compiled_s, teacher, centre
    )
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(compiled_colsum, eager_colsum)
    torch.testing.assert_close(compiled_s.grad, eager_s.grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("momentum", [0.996, 0.3], ids=["m0.996", "m0.3"])
def test_ema_equals_torch_lerp_bit_for_bit(momentum, capability):
    targets, sources = make_pairs([torch.float32, torch.bfloat16, torch.float16], seed=5)
    expected = [torch.lerp(t, s, 1 - momentum) for t, s in zip(targets, sources)]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        group = [(t, s) for t, s in zip(targets, sources) if t.dtype == dtype]
        torch.ops.mokd.ema_([t for t, _ in group], [s for _, s in group], 1 - momentum)
    for t, e in zip(targets, expected):
        if capability == "default":  # no FMA instruction: two roundings where torch's vector kernel has one
            eps = torch.finfo(t.dtype).eps
            torch.testing.assert_close(t, e, rtol=eps, atol=eps)
        else:
            assert torch.equal(t, e)


def test_ema_plan_uses_the_native_op_on_cpu():
    targets, sources = make_pairs([torch.float32, torch.bfloat16], seed=6)
    plan = EmaPlan(targets, sources)
    assert all(group.native is not None for group in plan.groups)
    expected = [torch.lerp(t, s, 0.25) for t, s in zip(targets, sources)]
    plan.update(0.75)
    assert all(torch.equal(t, e) for t, e in zip(targets, expected))


def test_ema_refuses_mixed_dtypes():
    with pytest.raises(RuntimeError, match="dtype of pair 0"):
        torch.ops.mokd.ema_([torch.zeros(3), torch.zeros(3, dtype=torch.bfloat16)],
                            [torch.ones(3), torch.ones(3, dtype=torch.bfloat16)], 0.5)


def test_trainer_losses_native_equal_torch(tmp_path):
    from helpers import tiny_config
    from mokd.engine.trainer import Trainer

    losses = {}
    for kernel in ("torch", "native"):
        run_dir = tmp_path / kernel
        extra = ["train.max_steps=3", "checkpoint.enabled=false", f"loss.kernel={kernel}"]
        Trainer(tiny_config(run_dir, extra=extra), show_progress=False).train()
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        losses[kernel] = [{k: v for k, v in r.items() if k.startswith("loss/")} for r in records if "step" in r]
    assert len(losses["native"]) == 3 and losses["native"][0]
    for mine, theirs in zip(losses["native"], losses["torch"]):
        assert mine.keys() == theirs.keys()
        for key in mine:
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-5), key


def test_native_is_refused_with_build_instructions_when_not_built(tmp_path):
    script = (
        "from mokd.config import ConfigError, load_config\n"
        "from mokd.kernels import native\n"
        "from mokd.launch import components  # the loss-kernel check load_config runs\n"
        "assert not native.available()\n"
        "try:\n"
        "    load_config(None, ['loss.kernel=native'])\n"
        "except ConfigError as error:\n"
        "    print(error)\n"
    )
    env = {**os.environ, "MOKD_NATIVE_LIBRARY": str(tmp_path / "missing.so")}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "loss.kernel=native" in result.stdout and "cmake -S . -B build" in result.stdout


def test_literal_reference_is_independent_of_the_kernels():
    """The float64 literal the checks above use is plain autograd over the DINO double loop (sanity of the oracle
    on a case the torch path computes too)."""
    student, teacher, centre = make_inputs(CASES[0], torch.float64, seed=41)
    loss64, *_ = literal_dino64(student, teacher, centre, 3, "dino")
    torch_loss = dino_cross_entropy(student, teacher, centre, TAU_S, TAU_T, 3, impl="torch").loss
    torch.testing.assert_close(torch_loss, loss64)
