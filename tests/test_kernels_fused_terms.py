"""loss.fused_terms: every DINO term reading one student tensor in one pass, against float64 literals.

The Triton kernels run under the Triton interpreter in a subprocess (TRITON_INTERPRET=1 must be set before the
kernel modules import; see test_kernels_triton_interpret.py); shapes stay small. The reference is DINO's loop in
float64 per term (literal_dino64), the terms' weighted sum, and autograd through it. The same script runs compiled
on a GPU (``python tests/test_kernels_fused_terms.py cuda``, benchmarks/device_check.sh). On both, the Triton
path's forward and backward must dispatch nothing a CUDA graph capture refuses (host data made into a tensor, a
value read back, a copy between devices); on a GPU they are also captured in one graph and replayed.
"""

import os
import subprocess
import sys

import pytest
import torch

from test_kernels_dino_ce import TAU_S, TAU_T, case_seed, literal_dino64

# (S, B, K, [(T, pairing, with centre, sinkhorn, first row, weight), ...]): odd K, B = 1, one to three terms, both
# pairings, centred and Sinkhorn-Knopp targets, a one_to_one term on a row subset (L_ct's local crops).
CASES = [
    (4, 2, 257, [(2, "dino", True, False, 0, 1.0), (2, "dino", True, False, 0, 0.7)]),
    (4, 1, 301, [(2, "dino", False, True, 0, 1.0), (2, "one_to_one", False, False, 2, 0.5)]),
    (3, 2, 129, [(2, "dino", True, False, 0, 1.3)]),
    (2, 1, 37, [(1, "one_to_one", False, False, 0, 1.0), (2, "dino", False, True, 0, 0.25)]),
    (12, 1, 1500, [(2, "dino", True, False, 0, 1.0), (2, "dino", True, False, 0, 0.5)]),
]
# three models: L_sm and an L_cm per other teacher read h_i (Triton: two terms a pass, then one)
THREE_TERMS = (4, 1, 129, [(2, "dino", True, False, 0, 1.0), (2, "dino", True, False, 0, 0.35),
                           (2, "dino", False, True, 0, 0.5)])
CASES.append(THREE_TERMS)


def literal_sinkhorn64(teacher, tau, iterations=3):
    """Sinkhorn-Knopp equipartition of the teacher rows (DINOv2's loop, one process), in float64."""
    q = torch.exp(teacher.double() / tau).t()  # [K, rows]
    q /= q.sum()
    k, rows = q.shape
    for _ in range(iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= rows
    return (q * rows).t()


def make_targets(case, gen, dtype=torch.float32, device="cpu"):
    """The case's random targets (teacher logits, or Sinkhorn-Knopp log-targets at temperature 1)."""
    from mokd.kernels.fused_terms import DinoTarget

    n_crops, batch, k, specs = case
    targets = []
    for views, pairing, with_centre, sinkhorn, first, weight in specs:
        if pairing == "one_to_one":
            term_rows, term_batch = slice(first * batch, n_crops * batch), (n_crops - first) * batch
            teacher = torch.randn(term_batch, k, generator=gen) * 2.0
        else:
            term_rows, term_batch = slice(0, n_crops * batch), batch
            teacher = torch.randn(views * batch, k, generator=gen) * 2.0
        centre = torch.randn(k, generator=gen) if with_centre else None
        tau_t = TAU_T
        if sinkhorn:  # the objective passes log-targets at temperature 1, no centre
            teacher, tau_t = literal_sinkhorn64(teacher, TAU_T).clamp(min=1e-30).log().float(), 1.0
        targets.append(DinoTarget(teacher.to(dtype).to(device), None if centre is None else centre.to(device),
                                  tau_t, term_batch, pairing, term_rows, weight))
    return targets


def make_case(case, dtype=torch.float32, device="cpu", seed=0):
    """Random student logits and targets; returns (student, targets, literal (total, losses, grad, colsums, H))."""
    n_crops, batch, k, _ = case
    gen = torch.Generator().manual_seed(seed)
    student = (torch.randn(n_crops * batch, k, generator=gen) * 3.0).to(dtype).to(device).requires_grad_(True)
    targets = make_targets(case, gen, dtype, device)
    literal = []
    for t in targets:
        loss, grad, colsum, entropy = literal_dino64(student[t.rows], t.teacher, t.centre, t.batch_size, t.pairing,
                                                     tau_t=t.temperature)
        full = torch.zeros(student.shape, dtype=torch.float64, device=device)
        full[t.rows] = grad
        literal.append((t.weight, loss, full, colsum, entropy))
    total = sum(w * loss for w, loss, *_ in literal)
    grad = sum(w * g for w, _, g, *_ in literal)
    return student, targets, (total, torch.stack([x[1] for x in literal]), grad,
                              torch.stack([x[3] for x in literal]), torch.stack([x[4] for x in literal]))


def check_fused_terms(case, impl, dtype=torch.float32, device="cpu", seed=0, tol=2e-5):
    from mokd.kernels.fused_terms import fused_terms

    student, targets, (total64, losses64, grad64, colsums64, entropies64) = make_case(case, dtype, device, seed)
    out = fused_terms(student, TAU_S, targets, impl=impl)
    out.total.backward()
    torch.testing.assert_close(out.total.double(), total64, rtol=tol, atol=tol)
    torch.testing.assert_close(out.losses.double(), losses64, rtol=tol, atol=tol)
    torch.testing.assert_close(student.grad.double(), grad64, rtol=10 * tol, atol=1e-7)
    torch.testing.assert_close(out.teacher_column_sums.double(), colsums64, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.teacher_entropies.double(), entropies64, rtol=tol, atol=tol)
    assert not out.losses.requires_grad and all(t.teacher.grad is None for t in targets)


@pytest.mark.parametrize("case", [*CASES[:4], THREE_TERMS], ids=lambda c: f"S{c[0]}B{c[1]}K{c[2]}x{len(c[3])}")
def test_fused_terms_torch_matches_literal(case):
    check_fused_terms(case, "torch", dtype=torch.float64, seed=case_seed(case, "torch"), tol=1e-10)


def test_fused_terms_rejects_bad_targets():
    from mokd.kernels.fused_terms import DinoTarget, fused_terms

    student = torch.randn(4, 10)
    with pytest.raises(ValueError, match="at least one target"):
        fused_terms(student, TAU_S, [])
    with pytest.raises(ValueError, match="contiguous"):
        fused_terms(student, TAU_S, [DinoTarget(torch.randn(4, 10), None, TAU_T, 4, "one_to_one", slice(0, 4, 2))])
    with pytest.raises(ValueError, match="not a positive multiple"):
        fused_terms(student, TAU_S, [DinoTarget(torch.randn(3, 10), None, TAU_T, 2)])


def host_traffic(fn, device) -> list[str]:
    """The ops fn dispatches that a CUDA graph capture refuses: a tensor made from host data (torch.tensor of a
    list, a scalar written by indexing), a value read back to the host (.item()), a copy between devices."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.found = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = str(func)
            outputs = out if isinstance(out, (tuple, list)) else [out]
            elsewhere = any(isinstance(t, torch.Tensor) and t.device.type not in ("meta", torch.device(device).type)
                            for t in outputs)
            if "lift_fresh" in name or "_local_scalar_dense" in name or elsewhere:
                self.found.append(name)
            return out

    with Recorder() as recorder:
        fn()
    return recorder.found


def check_fused_terms_host_free(device):
    """The Triton path, forward and backward, on the largest case: no host data in, no host synchronisation."""
    from mokd.kernels.fused_terms import fused_terms

    student, targets, _ = make_case(CASES[1], device=device)
    assert host_traffic(lambda: fused_terms(student, TAU_S, targets, impl="triton").total.backward(), device) == []


def check_fused_terms_cuda_graph(case, seed):
    """On a GPU: the forward and backward captured in one CUDA graph, replayed, give the literal loss and gradient."""
    from mokd.kernels.fused_terms import fused_terms

    student, targets, (total64, _, grad64, _, _) = make_case(case, device="cuda", seed=seed)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compiled and warmed up outside the capture
        fused_terms(student, TAU_S, targets, impl="triton").total.backward()
    torch.cuda.current_stream().wait_stream(side)
    student.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_terms(student, TAU_S, targets, impl="triton")
        out.total.backward()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out.total.double(), total64, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(student.grad.double(), grad64, rtol=2e-4, atol=1e-7)


def test_fused_terms_triton_interpreted():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(__file__))
    assert proc.returncode == 0, f"fused_terms under the Triton interpreter:\n{proc.stdout}\n{proc.stderr}"


if __name__ == "__main__":
    device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run through pytest, or with TRITON_INTERPRET=1 set, or name a GPU device: cuda")
    for case in CASES:
        check_fused_terms(case, "triton", device=device, seed=case_seed(case, "triton"))
    check_fused_terms_host_free(device)
    if device == "cuda":
        check_fused_terms_cuda_graph(CASES[0], case_seed(CASES[0], "graph"))
    print(f"fused_terms triton on {device}: passed")
