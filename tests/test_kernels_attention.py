"""attention dispatch: sdpa against the explicit math reference; flash_attn is optional and absent on CPU CI."""

import importlib.util

import pytest
import torch

from mokd.kernels import attention


@pytest.mark.parametrize("shape", [(2, 6, 17, 64), (1, 1, 5, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_sdpa_matches_math(shape, dtype):
    gen = torch.Generator().manual_seed(sum(shape))
    q, k, v = (torch.randn(shape, generator=gen, dtype=dtype, requires_grad=True) for _ in range(3))
    out = attention(q, k, v)
    ref = attention(q, k, v, backend="math")
    torch.testing.assert_close(out, ref)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.sum(), (q, k, v))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


def test_math_is_the_formula():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64) for _ in range(3))
    weights = torch.exp(torch.einsum("bhnd,bhmd->bhnm", q, k) / 5**0.5)
    expected = torch.einsum("bhnm,bhmd->bhnd", weights / weights.sum(-1, keepdim=True), v)
    torch.testing.assert_close(attention(q, k, v, backend="math"), expected)


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash_attn is installed")
def test_flash_without_flash_attn_is_a_clear_error():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ImportError, match="flash_attn"):
        attention(q, q, q, backend="flash")


def test_bad_arguments_raise():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="backend must be"):
        attention(q, q, q, backend="xformers")
    with pytest.raises(ValueError, match=r"\[B, heads, N, head_dim\]"):
        attention(q[0], q[0], q[0])
