"""Every DINO term that reads one student tensor, computed in one pass over it.

Several terms of a MOKD step read the same student logits: L_sm and L_cm read h_i(all crops), L_st and L_ct read
g_i(all crops) (L_ct a subset of its rows, paired one to one with the searched teacher logits). Each term is a
``DinoTarget`` (its teacher tensor, centre, temperature, pairing, the student rows it reads, its weight lambda in
the model's total). With s the student logits, tau_s the student temperature shared by the terms, and per term t
(n_t pairs over B_t images, pair weight w_u^t of crop u, Y_u^t = sum_{v paired with u} p_v^t):

    loss_t   = 1 / (n_t B_t) * sum_u sum_b [ w_u^t lse(s_ub / tau_s) - <Y_ub^t, s_ub> / tau_s ]
    total    = sum_t lambda_t loss_t
    dtotal/ds_u = sum_t lambda_t (w_u^t softmax(s_u / tau_s) - Y_u^t) / (tau_s n_t B_t)

so the student's log-sum-exp is computed once for all terms, and the combined gradient is one write.

Implementations:
  * ``triton`` (CUDA; the Triton interpreter on CPU): two launches per student tensor, whatever the number of terms
    (at most two read one tensor in MOKD): one over every term's teacher rows (log-sum-exp, entropy) and column
    blocks (the raw column sums, summed in a fixed order: no atomics), then one program per student row that
    computes the row's log-sum-exp, every term's loss contribution and the combined gradient, written in the
    forward and scaled by the incoming gradient in the backward. No host synchronisation: losses and monitors
    stay on the device, so the block can be captured in a CUDA graph.
  * ``torch`` / ``native`` / ``reference``: one ``dino_cross_entropy`` per term (on a CPU there are no launches to
    save, and those paths already read each tensor once per term).
Outputs are the same contract as ``dino_cross_entropy`` per term (losses, teacher column sums and mean entropies,
fp32), plus the weighted total that carries the gradient.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from mokd.kernels.dino_cross_entropy import (IMPLS, _NEG_BIG, _Layout, _jit, _row_contiguous, _triton_usable, _validate,
                                             dino_cross_entropy, tl, triton)


class DinoTarget(NamedTuple):
    """One DINO term reading a student tensor: see ``dino_cross_entropy`` for teacher, centre and pairing."""

    teacher: torch.Tensor  # [T*B, K] logits; Sinkhorn-Knopp targets as log-targets with temperature 1, no centre
    centre: Optional[torch.Tensor]
    temperature: float
    batch_size: int
    pairing: str = "dino"
    rows: slice = slice(None)  # the student rows the term reads (contiguous)
    weight: float = 1.0  # lambda: the term's multiplier in the total


class FusedTermsOutput(NamedTuple):
    total: torch.Tensor  # scalar: sum_t weight_t loss_t, differentiable w.r.t. the student tensor
    losses: torch.Tensor  # [n_terms], detached
    teacher_column_sums: torch.Tensor  # [n_terms, K], detached
    teacher_entropies: torch.Tensor  # [n_terms], detached


class _Term(NamedTuple):
    layout: _Layout
    start: int  # first student row read
    stop: int


def resolve_terms(rows: int, k: int, dtype: torch.dtype, student_temperature: float,
                  targets: list[DinoTarget], impl: str = "torch") -> list[_Term]:
    """Each target's canonical layout and student row range, validated as ``dino_cross_entropy`` validates."""
    if not targets:
        raise ValueError("fused DINO terms: at least one target is needed")
    terms = []
    for target in targets:
        start, stop, step = target.rows.indices(rows)
        if step != 1 or stop <= start:
            raise ValueError(f"fused DINO terms: target rows must be a non-empty contiguous slice, got {target.rows}")
        # A shape-only stand-in for the student rows: the checks need shapes, never values.
        student = torch.empty(stop - start, k, dtype=dtype, device="meta")
        layout = _validate(student, target.teacher, target.centre, student_temperature, target.temperature,
                           target.batch_size, target.pairing, impl)
        terms.append(_Term(layout, start, stop))
    return terms


# ----------------------------------------------------------------------------------------------------------------
# triton
# ----------------------------------------------------------------------------------------------------------------


@_jit
def _teacher_stats_kernel(
    t_ptr, c_ptr, lse_ptr, entropy_ptr, column_sum_ptr,
    rows, K, stride_t, inv_tau_t,
    HAS_CENTRE: tl.constexpr, NEG_BIG: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Programs 0..rows-1: one teacher row each, lse(z) and H(p) = lse - sum_k p_k z_k with z = (t - c) / tau_t,
    by an online pass (running maximum m, L = sum e^{z-m}, A = sum e^{z-m} z). Programs rows..: one column block
    each, the raw column sums over all rows in row order."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_K)
    if pid < rows:
        row = pid.to(tl.int64)
        m = tl.full([BLOCK_K], NEG_BIG, tl.float32)
        big_l = tl.zeros([BLOCK_K], dtype=tl.float32)
        big_a = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs = k0 + cols
            mask = offs < K
            z = tl.load(t_ptr + row * stride_t + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_CENTRE:
                z = z - tl.load(c_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            # Masked columns read NEG_BIG (finite, so no inf - inf) and add nothing; a lane that saw only masked
            # columns keeps m = NEG_BIG and gets weight e^{NEG_BIG - m_row} = 0 in the final merge.
            z = tl.where(mask, z * inv_tau_t, NEG_BIG)
            m_new = tl.maximum(m, z)
            rescale = tl.exp(m - m_new)
            e = tl.where(mask, tl.exp(z - m_new), 0.0)
            big_l = big_l * rescale + e
            big_a = big_a * rescale + e * z
            m = m_new
        m_row = tl.max(m, axis=0)
        lane = tl.exp(m - m_row)
        total_l = tl.sum(big_l * lane, axis=0)
        total_a = tl.sum(big_a * lane, axis=0)
        lse = m_row + tl.log(total_l)
        tl.store(lse_ptr + pid, lse)
        tl.store(entropy_ptr + pid, lse - total_a / total_l)
    else:
        offs = (pid - rows) * BLOCK_K + cols
        mask = offs < K
        acc = tl.zeros([BLOCK_K], dtype=tl.float32)
        ptrs = t_ptr + offs
        for _ in range(0, rows):
            acc += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
            ptrs += stride_t
        tl.store(column_sum_ptr + offs, acc, mask=mask)


@_jit
def _paired_targets(t_ptr, c_ptr, lse_t_ptr, offs, mask, u, b, active, B, stride_t, inv_tau_t,
                    T: tl.constexpr, HAS_CENTRE: tl.constexpr, EXCLUDE_SAME: tl.constexpr, NEG_BIG: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    """Y = sum of p_v over the views v paired with crop u, for image b, on one column block (0 when inactive)."""
    y = tl.zeros([BLOCK_K], dtype=tl.float32)
    if HAS_CENTRE:
        centre = tl.load(c_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    for v in tl.static_range(T):
        paired = active
        if EXCLUDE_SAME:
            paired = paired & (u != v)
        row = (v * B + b).to(tl.int64)
        t = tl.load(t_ptr + row * stride_t + offs, mask=mask & paired, other=0.0).to(tl.float32)
        if HAS_CENTRE:
            t = t - centre
        lse_t = tl.load(lse_t_ptr + row, mask=paired, other=0.0)
        # (masked before the exp: an unpaired view reads zeros, whose -c / tau_t could overflow it)
        y += tl.exp(tl.where(mask & paired, t * inv_tau_t - lse_t, NEG_BIG))
    return y


@_jit
def _pair_weight(u, active, T: tl.constexpr, EXCLUDE_SAME: tl.constexpr):
    """w_u: how many views are paired with crop u (0 for a row the term does not read)."""
    if EXCLUDE_SAME:
        w = tl.where(u < T, T - 1.0, T * 1.0)
    else:
        w = (u * 0).to(tl.float32) + T
    return tl.where(active, w, 0.0)


@_jit
def _fused_terms_kernel(
    s_ptr, grad_ptr, row_loss_ptr, K, stride_s, stride_g, inv_tau_s,
    t0_ptr, c0_ptr, lse0_ptr, start0, rows0, B0, stride_t0, inv_tau_t0, coef0, norm0,
    t1_ptr, c1_ptr, lse1_ptr, start1, rows1, B1, stride_t1, inv_tau_t1, coef1, norm1,
    N_TERMS: tl.constexpr, T0: tl.constexpr, HAS_CENTRE0: tl.constexpr, EXCLUDE0: tl.constexpr,
    T1: tl.constexpr, HAS_CENTRE1: tl.constexpr, EXCLUDE1: tl.constexpr, NEG_BIG: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One program per student row r: its lse (online, first pass), then per column block q = softmax(s_r / tau_s)
    and each term's Y, giving the row's loss contribution per term and grad_r = sum_t coef_t (w_r^t q - Y^t) with
    coef_t = lambda_t / (tau_s n_t B_t). Term t reads rows [start_t, start_t + rows_t): row r there is crop u, image
    b of its layout; norm_t = 1 / (n_t B_t)."""
    r = tl.program_id(0)
    row = r.to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    m = tl.full([BLOCK_K], NEG_BIG, tl.float32)
    big_l = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + cols
        mask = offs < K
        x = tl.load(s_ptr + row * stride_s + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.where(mask, x * inv_tau_s, NEG_BIG)
        m_new = tl.maximum(m, x)
        big_l = big_l * tl.exp(m - m_new) + tl.where(mask, tl.exp(x - m_new), 0.0)
        m = m_new
    m_row = tl.max(m, axis=0)
    lse = m_row + tl.log(tl.sum(big_l * tl.exp(m - m_row), axis=0))

    local0 = r - start0
    active0 = (local0 >= 0) & (local0 < rows0)
    u0, b0 = local0 // B0, local0 % B0
    w0 = _pair_weight(u0, active0, T0, EXCLUDE0)
    cross0 = tl.zeros([BLOCK_K], dtype=tl.float32)
    if N_TERMS > 1:
        local1 = r - start1
        active1 = (local1 >= 0) & (local1 < rows1)
        u1, b1 = local1 // B1, local1 % B1
        w1 = _pair_weight(u1, active1, T1, EXCLUDE1)
        cross1 = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + cols
        mask = offs < K
        s = tl.load(s_ptr + row * stride_s + offs, mask=mask, other=0.0).to(tl.float32)
        q = tl.exp(tl.where(mask, s * inv_tau_s - lse, NEG_BIG))
        y0 = _paired_targets(t0_ptr, c0_ptr, lse0_ptr, offs, mask, u0, b0, active0, B0, stride_t0, inv_tau_t0,
                             T0, HAS_CENTRE0, EXCLUDE0, NEG_BIG, BLOCK_K)
        cross0 += y0 * s
        g = coef0 * (w0 * q - y0)
        if N_TERMS > 1:
            y1 = _paired_targets(t1_ptr, c1_ptr, lse1_ptr, offs, mask, u1, b1, active1, B1, stride_t1, inv_tau_t1,
                                 T1, HAS_CENTRE1, EXCLUDE1, NEG_BIG, BLOCK_K)
            cross1 += y1 * s
            g += coef1 * (w1 * q - y1)
        tl.store(grad_ptr + row * stride_g + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)
    tl.store(row_loss_ptr + r * N_TERMS, norm0 * (w0 * lse - tl.sum(cross0, axis=0) * inv_tau_s))
    if N_TERMS > 1:
        tl.store(row_loss_ptr + r * N_TERMS + 1, norm1 * (w1 * lse - tl.sum(cross1, axis=0) * inv_tau_s))


_BLOCK_K = 1024
TARGETS_PER_PASS = 2  # the kernel's term slots: the two terms a pair of models has per student tensor


def _block_k(k: int) -> int:
    return max(16, min(triton.next_power_of_2(k), _BLOCK_K))


class _TritonFusedTerms(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, weights, tau_s, targets, terms):
        student = _row_contiguous(student)
        rows, k = student.shape
        device = student.device
        f32 = {"device": device, "dtype": torch.float32}
        block_k = _block_k(k)
        args, flags, lse_ts, entropies, column_sums = [], [], [], [], []
        for target, term in zip(targets, terms):
            teacher = _row_contiguous(target.teacher.detach())
            centre = None if target.centre is None else target.centre.detach().float().contiguous()
            t_rows = teacher.shape[0]
            lse_t, entropy, column_sum = torch.empty(t_rows, **f32), torch.empty(t_rows, **f32), torch.empty(k, **f32)
            _teacher_stats_kernel[(t_rows + triton.cdiv(k, block_k),)](
                teacher, centre, lse_t, entropy, column_sum, t_rows, k, teacher.stride(0),
                1.0 / target.temperature, HAS_CENTRE=centre is not None, NEG_BIG=_NEG_BIG, BLOCK_K=block_k,
            )
            layout = term.layout
            norm = 1.0 / (layout.n_pairs * layout.batch)
            args.append((teacher, centre, lse_t, term.start, term.stop - term.start, layout.batch,
                         teacher.stride(0), 1.0 / target.temperature, norm / tau_s, norm))
            flags.append((layout.teacher, centre is not None, layout.exclude_same))
            lse_ts.append(lse_t)
            entropies.append(entropy.mean())
            column_sums.append(column_sum)
        n_terms = len(terms)
        if n_terms == 1:  # the second term's slots are unused (N_TERMS = 1 compiles them out)
            args.append(args[0])
            flags.append(flags[0])
        # The combined gradient is scaled by each weight here; the backward multiplies by d(total).
        args = [(*a[:8], a[8] * float(w), a[9]) for a, w in zip(args, [*weights, 0.0][:2])]
        grad = torch.empty_like(student)
        row_loss = torch.empty(rows, n_terms, **f32)
        _fused_terms_kernel[(rows,)](
            student, grad, row_loss, k, student.stride(0), grad.stride(0), 1.0 / tau_s, *args[0], *args[1],
            N_TERMS=n_terms, T0=flags[0][0], HAS_CENTRE0=flags[0][1], EXCLUDE0=flags[0][2],
            T1=flags[1][0], HAS_CENTRE1=flags[1][1], EXCLUDE1=flags[1][2], NEG_BIG=_NEG_BIG,
            BLOCK_K=block_k,
        )
        losses = row_loss.sum(dim=0)
        # (the weights enter as kernel scalars: a tensor made from them would copy host memory, which a CUDA graph
        # capture refuses)
        total = torch.stack([losses[n] * weight for n, weight in enumerate(weights)]).sum()
        ctx.save_for_backward(grad)
        entropies, column_sums = torch.stack(entropies), torch.stack(column_sums)
        ctx.mark_non_differentiable(losses, column_sums, entropies)
        return total, losses, column_sums, entropies

    @staticmethod
    def backward(ctx, grad_total, _grad_losses, _grad_column_sums, _grad_entropies):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None, None


# ----------------------------------------------------------------------------------------------------------------
# public entry point
# ----------------------------------------------------------------------------------------------------------------


def fused_terms(student_logits: torch.Tensor, student_temperature: float, targets: list[DinoTarget],
                impl: str = "auto") -> FusedTermsOutput:
    """Every DINO term reading ``student_logits`` [rows, K] (see the module doc), in one pass on ``triton``.

    ``impl``: ``"auto"`` (Triton on CUDA tensors, else one ``dino_cross_entropy(impl="auto")`` per term),
    ``"triton"`` (two targets per pass, as a pair of models has per student tensor; more take one pass per two), or
    any ``dino_cross_entropy`` impl, used per term. Raises ValueError as ``dino_cross_entropy`` does.
    """
    if impl not in IMPLS:
        raise ValueError(f"fused_terms: impl must be one of {', '.join(IMPLS.names())}, got {impl!r}")
    if student_logits.dim() != 2:
        raise ValueError(f"fused_terms: student_logits must be 2-D, got {tuple(student_logits.shape)}")
    rows, k = student_logits.shape
    terms = resolve_terms(rows, k, student_logits.dtype, student_temperature, targets, impl)
    if impl == "auto":
        impl = "triton" if student_logits.is_cuda and triton is not None else "auto"
    if impl != "triton":
        outs = [dino_cross_entropy(student_logits[t.rows], t.teacher, t.centre, student_temperature, t.temperature,
                                   t.batch_size, t.pairing, impl) for t in targets]
        total = sum(t.weight * out.loss for t, out in zip(targets, outs))
        return FusedTermsOutput(total, torch.stack([out.loss.detach() for out in outs]),
                                torch.stack([out.teacher_column_sum for out in outs]),
                                torch.stack([out.teacher_entropy for out in outs]))
    if not _triton_usable(student_logits):
        raise ValueError("fused_terms: impl='triton' needs Triton and CUDA tensors (or TRITON_INTERPRET=1 set "
                         f"before import); got {student_logits.device} tensors")
    if len(targets) > TARGETS_PER_PASS:  # more than two models: L_sm and an L_cm per other teacher read h_i
        parts = [fused_terms(student_logits, student_temperature, targets[start:start + TARGETS_PER_PASS], impl)
                 for start in range(0, len(targets), TARGETS_PER_PASS)]
        return FusedTermsOutput(sum(part.total for part in parts), *(torch.cat(columns) for columns in
                                                                     list(zip(*parts))[1:]))
    total, losses, column_sums, entropies = _TritonFusedTerms.apply(
        student_logits, [float(t.weight) for t in targets], float(student_temperature), targets, terms)
    return FusedTermsOutput(total, losses, column_sums, entropies)
