"""loss.fused_head: the weight-normalised last layer fused with the DINO terms, against float64 literals.

The Triton student kernels run under the Triton interpreter in a subprocess (TRITON_INTERPRET=1 must be set before
the kernel modules import), in fp32 against the same literal; compiled on a GPU, the same checks run as
``python tests/test_kernels_fused_head.py cuda`` (benchmarks/device_check.sh). The reference builds the full
[rows, K] logits x W^T in float64, takes DINO's loop over pairs with softmax and log-softmax over all K, and
differentiates it with autograd to x and W.
"""

import os
import subprocess
import sys

import pytest
import torch

from test_kernels_dino_ce import TAU_S, case_seed
from test_kernels_fused_terms import CASES, host_traffic, make_targets


def literal_head64(x, weight, targets):
    """(total, losses, colsums, entropies, dx, dW) of the weighted DINO terms on logits x W^T, in float64."""
    x64 = x.detach().double().requires_grad_(True)
    w64 = weight.detach().double().requires_grad_(True)
    logits = x64 @ w64.T
    losses, colsums, entropies = [], [], []
    for t in targets:
        teacher = t.teacher.double()
        z = (teacher - t.centre.double() if t.centre is not None else teacher) / t.temperature
        p = torch.softmax(z, dim=-1)
        log_q = torch.log_softmax(logits[t.rows] / TAU_S, dim=-1)
        b = t.batch_size
        n_s, n_t = log_q.shape[0] // b, p.shape[0] // b
        if t.pairing == "one_to_one":
            pairs = [(r, r) for r in range(n_s)]
        else:
            pairs = [(v, u) for v in range(n_t) for u in range(n_s) if u != v]
        ces = [(-(p[v * b:(v + 1) * b] * log_q[u * b:(u + 1) * b]).sum(dim=-1)).mean() for v, u in pairs]
        losses.append(torch.stack(ces).mean())
        colsums.append(teacher.sum(dim=0))
        entropies.append((-torch.special.xlogy(p, p)).sum(dim=-1).mean())  # 0 log 0 = 0
    total = sum(t.weight * loss for t, loss in zip(targets, losses))
    dx, dw = torch.autograd.grad(total, (x64, w64))
    return total.detach(), torch.stack(losses).detach(), torch.stack(colsums), torch.stack(entropies), dx, dw


def head_inputs(case, dtype, seed, device="cpu"):
    """The case's last-layer input x (unit rows, as the head's normalised bottleneck), weight and targets."""
    n_crops, batch, k, _ = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n_crops * batch, 24, generator=gen), dim=-1)
    x = x.to(dtype).to(device).requires_grad_(True)
    weight = (torch.randn(k, 24, generator=gen) * 3.0).to(dtype).to(device).requires_grad_(True)
    return x, weight, make_targets(case, gen, dtype, device)


def run_fused_head(case, dtype, seed, tile_elements=None, monkeypatch=None, impl="auto", device="cpu"):
    import importlib

    from mokd.kernels import fused_head

    if tile_elements is not None:
        # (the package exports the function under the module's name: fetch the module itself)
        monkeypatch.setattr(importlib.import_module("mokd.kernels.fused_head"), "_TILE_ELEMENTS", tile_elements)
    x, weight, targets = head_inputs(case, dtype, seed, device)
    out = fused_head(x, weight, TAU_S, targets, impl=impl)
    out.total.backward()
    return out, x, weight, targets


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"S{c[0]}B{c[1]}K{c[2]}x{len(c[3])}")
@pytest.mark.parametrize("tile_elements", [None, 64])
def test_fused_head_matches_literal_float64(case, tile_elements, monkeypatch):
    """Exact in float64, with the default tiles and with tiles of 16 columns (many online merges)."""
    out, x, weight, targets = run_fused_head(case, torch.float64, case_seed(case, "head"), tile_elements,
                                             monkeypatch)
    total, losses, colsums, entropies, dx, dw = literal_head64(x, weight, targets)
    tol = {"rtol": 1e-10, "atol": 1e-12}
    torch.testing.assert_close(out.total, total, **tol)
    torch.testing.assert_close(out.losses, losses, **tol)
    torch.testing.assert_close(out.teacher_column_sums, colsums, **tol)
    torch.testing.assert_close(out.teacher_entropies, entropies, **tol)
    torch.testing.assert_close(x.grad, dx, **tol)
    torch.testing.assert_close(weight.grad, dw, **tol)
    assert all(t.teacher.grad is None for t in targets)


def test_fused_head_float32_close_to_literal():
    case = CASES[1]
    out, x, weight, targets = run_fused_head(case, torch.float32, 3)
    total, _, _, _, dx, dw = literal_head64(x, weight, targets)
    torch.testing.assert_close(out.total.double(), total, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), dx, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(weight.grad.double(), dw, rtol=1e-4, atol=1e-5)


def test_fused_head_rejects_mismatched_shapes():
    from mokd.kernels import fused_head

    with pytest.raises(ValueError, match="must agree"):
        fused_head(torch.randn(4, 8), torch.randn(10, 7), TAU_S, [])


def test_fused_head_triton_interpreted():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(__file__))
    assert proc.returncode == 0, f"fused_head under the Triton interpreter:\n{proc.stdout}\n{proc.stderr}"


def check_fused_head_triton(case, seed, device="cpu"):
    out, x, weight, targets = run_fused_head(case, torch.float32, seed, impl="triton", device=device)
    total, losses, colsums, entropies, dx, dw = literal_head64(x, weight, targets)
    torch.testing.assert_close(out.total.double(), total, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(out.losses.double(), losses, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(out.teacher_entropies.double(), entropies, rtol=2e-5, atol=2e-5)
    # fp32 rounding of gradients built by cancellation (w q - Y, magnitudes ~1 / tau_s): scaled by the largest
    # entry, as the torch path's own fp32 error is (2-3e-6 of it on these cases)
    torch.testing.assert_close(x.grad.double(), dx, rtol=1e-4, atol=2e-5 * dx.abs().max().item())
    torch.testing.assert_close(weight.grad.double(), dw, rtol=1e-4, atol=2e-5 * dw.abs().max().item())


if __name__ == "__main__":
    device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run through pytest, or with TRITON_INTERPRET=1 set, or name a GPU device: cuda")
    for case in CASES:
        check_fused_head_triton(case, case_seed(case, "head-triton"), device)
    # No host data in and no host synchronisation, student (Triton) and teacher (torch) sides alike.
    from mokd.kernels import fused_head

    x, weight, targets = head_inputs(CASES[1], torch.float32, 0, device)
    assert host_traffic(lambda: fused_head(x, weight, TAU_S, targets, impl="triton").total.backward(), device) == []
    print(f"fused_head triton on {device}: passed")
