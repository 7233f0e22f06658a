"""dino_cross_entropy (reference and torch paths) against a float64 literal DINO loss written here.

The Triton path runs the same checks under the Triton interpreter in test_kernels_triton_interpret.py, which
imports ``CASES``, ``make_inputs`` and ``check_against_literal`` from this file.
"""

import os
import zlib

import pytest
import torch

from mokd.kernels import DinoCrossEntropyOutput, dino_cross_entropy

TAU_S, TAU_T = 0.1, 0.04


def literal_dino64(student, teacher, centre, batch_size, pairing, tau_s=TAU_S, tau_t=TAU_T):
    """DINO's loss written out in float64: returns (loss, d loss / d student, teacher column sum, entropy)."""
    s = student.detach().double().requires_grad_(True)
    t = teacher.detach().double()
    z = (t - centre.double() if centre is not None else t) / tau_t
    p = torch.softmax(z, dim=-1)
    log_q = torch.log_softmax(s / tau_s, dim=-1)
    n_s, n_t = s.shape[0] // batch_size, t.shape[0] // batch_size
    if pairing == "one_to_one":
        pairs = [(r, r) for r in range(n_s)]
    else:
        pairs = [(v, u) for v in range(n_t) for u in range(n_s) if u != v]
    terms = []
    for v, u in pairs:
        p_v = p[v * batch_size : (v + 1) * batch_size]
        log_q_u = log_q[u * batch_size : (u + 1) * batch_size]
        terms.append((-(p_v * log_q_u).sum(dim=-1)).mean())
    loss = torch.stack(terms).mean()
    (grad,) = torch.autograd.grad(loss, s)
    entropy = (-(p * torch.log(p)).sum(dim=-1)).mean()
    return loss.detach(), grad, t.sum(dim=0), entropy


# (S, T, B, K, pairing, with centre): K not a multiple of any block size, B = 1, 2+0 and 2+10 crops, T > S,
# a lone teacher view (student crop 0 then has no pair), both pairings.
CASES = [
    (2, 2, 3, 1000, "dino", True),
    (12, 2, 2, 257, "dino", True),
    (12, 2, 1, 1000, "dino", False),
    (2, 2, 1, 257, "dino", False),
    (3, 1, 2, 300, "dino", True),
    (2, 3, 2, 300, "dino", True),
    (3, 3, 2, 257, "one_to_one", True),
    (1, 1, 4, 300, "one_to_one", False),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def case_seed(*parts) -> int:
    """A distinct, reproducible seed per test case (Python's hash() of strings changes between runs)."""
    return zlib.crc32(repr(parts).encode())


def make_inputs(case, dtype, seed, device="cpu"):
    """Random logits of realistic spread (never zeros), quantised to ``dtype``; the centre stays fp32. Drawn on
    the CPU (the same values on any device), then moved to ``device``."""
    n_s, n_t, batch, k, _, with_centre = case
    gen = torch.Generator().manual_seed(seed)
    student = (torch.randn(n_s * batch, k, generator=gen) * 3.0).to(dtype)
    teacher = (torch.randn(n_t * batch, k, generator=gen) * 2.0 + 0.5).to(dtype)
    centre = torch.randn(k, generator=gen) * 0.5 if with_centre else None
    return student.to(device), teacher.to(device), None if centre is None else centre.to(device)


def check_against_literal(case, dtype, impl, seed, device="cpu"):
    n_s, n_t, batch, k, pairing, _ = case
    student, teacher, centre = make_inputs(case, dtype, seed, device)
    student.requires_grad_(True)
    out = dino_cross_entropy(student, teacher, centre, TAU_S, TAU_T, batch, pairing=pairing, impl=impl)
    out.loss.backward()
    loss64, grad64, colsum64, entropy64 = literal_dino64(student, teacher, centre, batch, pairing)

    assert isinstance(out, DinoCrossEntropyOutput)
    assert out.loss.dtype == torch.float32 and out.loss.dim() == 0
    assert out.teacher_column_sum.dtype == torch.float32 and out.teacher_column_sum.shape == (k,)
    assert not out.teacher_column_sum.requires_grad and not out.teacher_entropy.requires_grad
    assert student.grad.dtype == dtype
    # Inputs are the same quantised values in both, so the loss and statistics only see fp32 rounding; the
    # gradient additionally is rounded to the input dtype.
    torch.testing.assert_close(out.loss.double(), loss64, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(out.teacher_entropy.double(), entropy64, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(out.teacher_column_sum.double(), colsum64, rtol=1e-5, atol=1e-4)
    grad_scale = grad64.abs().max().item()
    grad_rtol = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(
        student.grad.double(), grad64, rtol=grad_rtol, atol=grad_rtol * grad_scale * 1e-2 + 1e-9
    )


@pytest.mark.parametrize("impl", ["reference", "torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "S{}T{}B{}K{}-{}-{}".format(*c[:5], "c" if c[5] else "noc"))
def test_matches_float64_literal(case, dtype, impl):
    check_against_literal(case, dtype, impl, seed=case_seed(case, dtype, impl))


def gradcheck_both_pairings(impl: str) -> None:
    """torch.autograd.gradcheck of the loss in float64 on a tiny shape (odd K), for both pairings."""
    gen = torch.Generator().manual_seed(7)
    student = torch.randn(3 * 2, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2 * 2, 7, generator=gen, dtype=torch.float64)
    centre = torch.randn(7, generator=gen, dtype=torch.float64)
    for pairing, t in (("dino", teacher), ("one_to_one", torch.randn(6, 7, generator=gen, dtype=torch.float64))):
        assert torch.autograd.gradcheck(
            lambda s: dino_cross_entropy(s, t, centre, 0.3, 0.5, 2, pairing=pairing, impl=impl).loss, (student,)
        )


def test_torch_backward_gradcheck_float64():
    gradcheck_both_pairings("torch")


@pytest.mark.parametrize("impl", ["reference", "torch"])
def test_teacher_and_centre_receive_no_gradient(impl):
    """Decision: the teacher is treated as detached, so its .grad stays None even if it requires grad."""
    student, teacher, centre = make_inputs(CASES[0], torch.float32, seed=11)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    centre.requires_grad_(True)
    out = dino_cross_entropy(student, teacher, centre, TAU_S, TAU_T, 3, impl=impl)
    out.loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None and centre.grad is None


def test_auto_on_cpu_is_native_when_built_else_torch():
    from mokd.kernels import native

    student, teacher, centre = make_inputs(CASES[1], torch.float32, seed=3)
    auto = dino_cross_entropy(student, teacher, centre, TAU_S, TAU_T, 2)
    fast = dino_cross_entropy(student, teacher, centre, TAU_S, TAU_T, 2, impl="native" if native.available() else "torch")
    assert torch.equal(auto.loss, fast.loss)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter runs Triton on CPU")
def test_triton_on_cpu_tensors_is_a_clear_error():
    student, teacher, centre = make_inputs(CASES[0], torch.float32, seed=5)
    with pytest.raises(ValueError, match="CUDA"):
        dino_cross_entropy(student, teacher, centre, TAU_S, TAU_T, 3, impl="triton")


@pytest.mark.parametrize(
    "rows_s, rows_t, batch, pairing, message",
    [
        (4, 4, 4, "dino", "no pair"),
        (7, 4, 2, "dino", "multiple of batch_size"),
        (6, 4, 2, "one_to_one", "as many student as teacher rows"),
        (4, 4, 0, "dino", "batch_size"),
        (4, 4, 2, "pairs", "pairing must be"),
    ],
)
def test_invalid_layouts_raise(rows_s, rows_t, batch, pairing, message):
    student, teacher = torch.randn(rows_s, 10), torch.randn(rows_t, 10)
    with pytest.raises(ValueError, match=message):
        dino_cross_entropy(student, teacher, None, TAU_S, TAU_T, batch, pairing=pairing)


def test_invalid_arguments_raise():
    student, teacher = torch.randn(4, 10), torch.randn(4, 10)
    with pytest.raises(ValueError, match="impl must be"):
        dino_cross_entropy(student, teacher, None, TAU_S, TAU_T, 2, impl="cuda")
    with pytest.raises(ValueError, match="centre must have shape"):
        dino_cross_entropy(student, teacher, torch.randn(9), TAU_S, TAU_T, 2)
    with pytest.raises(ValueError, match="K differs"):
        dino_cross_entropy(student, torch.randn(4, 11), None, TAU_S, TAU_T, 2)
    with pytest.raises(ValueError, match="temperatures"):
        dino_cross_entropy(student, teacher, None, 0.0, TAU_T, 2)
