"""DINO cross-entropy between a student over all crops and a teacher over some crops.

Definitions (every statistic in fp32 for fp32/bf16/fp16 inputs; the torch and reference paths keep fp64 inputs in
fp64, which is what lets gradcheck verify the analytic backward):

    p_v    = softmax((t_v - c) / tau_t)           teacher probabilities, one row per (teacher view v, image b)
    log q_u = log_softmax(s_u / tau_s)             student log-probabilities, one row per (student crop u, image b)
    CE(p, s_u) = -sum_k p_k log q_u,k = lse(s_u / tau_s) - <p, s_u> / tau_s      (because sum_k p_k = 1)
    loss  = 1 / (n_pairs * B) * sum_{pairs (v, u)} sum_b CE(p_vb, s_ub)

so the loss needs only one log-sum-exp per student row and one dot product per (pair, image): nothing of size
pairs x B x K is ever built. Its gradient, with w_u the number of teacher views paired with crop u, is

    dL/ds_u = (w_u * softmax(s_u / tau_s) - sum_{v paired with u} p_v) / (tau_s * n_pairs * B).

Pairings: ``"dino"`` pairs every teacher view v with every student crop u != v (student crops 0..T-1 are the
teacher's views); ``"one_to_one"`` pairs row r with row r, which is the ``"dino"`` layout with S = T = 1, B = rows
and the u == v pair kept; every implementation below works on that canonical form (S, T, B, exclude_same).

Side outputs, computed in the same pass over the teacher: the column sums of the raw teacher logits (the centre
update c <- m c + (1 - m) colsum / rows) and the mean teacher entropy H(p_v) = lse - <p_v, z_v> (a collapse
monitor: ln K for a uniform teacher, 0 for a one-hot one).

Four implementations share this contract:
  * ``reference``: the literal DINO double loop over (v, u) with plain torch ops; the baseline for tests.
  * ``torch``: the identity above in an autograd.Function with the analytic backward; the CPU default when the
    native kernels are not built.
  * ``native``: the same identity as fused C++ CPU operators (``torch.ops.mokd.dino_cross_entropy``, see
    ``mokd/kernels/native.py`` and ``csrc/``): one read of the teacher and student in the forward, one more read
    and one write of the gradient in the backward; the CPU default when built.
  * ``triton``: a fused forward (one read of teacher and student) and a fused backward (one more read of both,
    one write of the gradient); the CUDA default.
The teacher logits and the centre never receive a gradient: every implementation treats them as detached,
so ``teacher_logits.grad`` stays ``None`` even when the caller passes a tensor that requires grad.
"""

from __future__ import annotations

import os
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from mokd.config import register_choices
from mokd.kernels import native
from mokd.registry import Registry

try:
    import triton
    import triton.language as tl

    _jit = triton.jit
except ImportError:  # CPU-only torch wheels (macOS, Windows) ship without Triton; the kernels are then never launched
    triton = None
    tl = None

    def _jit(fn):
        return fn


PAIRINGS = ("dino", "one_to_one")


class DinoCrossEntropyOutput(NamedTuple):
    loss: torch.Tensor  # scalar fp32, differentiable w.r.t. the student logits only
    teacher_column_sum: torch.Tensor  # [K] fp32, detached: sum over all teacher rows of the raw logits
    teacher_entropy: torch.Tensor  # scalar fp32, detached: mean over teacher rows of H(p_v)


class _Layout(NamedTuple):
    """Canonical pair layout: rows are ``crop * batch + image``; pairs (v, u) for v < teacher, u < student."""

    student: int  # S
    teacher: int  # T
    batch: int  # B
    exclude_same: bool  # True for "dino" (u != v), False for "one_to_one" (after reshaping to S = T = 1)

    @property
    def n_pairs(self) -> int:
        return self.student * self.teacher - (min(self.student, self.teacher) if self.exclude_same else 0)

    def pair_weights(self) -> list[int]:
        """w_u: how many teacher views are paired with student crop u."""
        return [self.teacher - int(self.exclude_same and u < self.teacher) for u in range(self.student)]


def _accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _validate(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    centre: torch.Tensor | None,
    student_temperature: float,
    teacher_temperature: float,
    batch_size: int,
    pairing: str,
    impl: str,
) -> _Layout:
    if impl not in IMPLS:
        raise ValueError(f"dino_cross_entropy: impl must be one of {', '.join(IMPLS.names())}, got {impl!r}")
    if pairing not in PAIRINGS:
        raise ValueError(f"dino_cross_entropy: pairing must be one of {PAIRINGS}, got {pairing!r}")
    if student_logits.dim() != 2 or teacher_logits.dim() != 2:
        raise ValueError(
            "dino_cross_entropy: student_logits and teacher_logits must be 2-D [crops*batch, K], got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    if not (student_logits.is_floating_point() and teacher_logits.is_floating_point()):
        raise ValueError("dino_cross_entropy: logits must be floating point")
    k = student_logits.shape[1]
    if teacher_logits.shape[1] != k:
        raise ValueError(f"dino_cross_entropy: K differs: student {k}, teacher {teacher_logits.shape[1]}")
    if k == 0:
        raise ValueError("dino_cross_entropy: K must be at least 1")
    if centre is not None and tuple(centre.shape) != (k,):
        raise ValueError(f"dino_cross_entropy: centre must have shape [{k}], got {tuple(centre.shape)}")
    if student_temperature <= 0 or teacher_temperature <= 0:
        raise ValueError(
            f"dino_cross_entropy: temperatures must be positive, got student {student_temperature}, "
            f"teacher {teacher_temperature}"
        )
    if batch_size < 1:
        raise ValueError(f"dino_cross_entropy: batch_size must be >= 1, got {batch_size}")
    rows_s, rows_t = student_logits.shape[0], teacher_logits.shape[0]
    for name, rows in (("student_logits", rows_s), ("teacher_logits", rows_t)):
        if rows == 0 or rows % batch_size:
            raise ValueError(
                f"dino_cross_entropy: {name} has {rows} rows, not a positive multiple of batch_size={batch_size}"
            )
    if pairing == "one_to_one":
        if rows_s != rows_t:
            raise ValueError(
                f"dino_cross_entropy: pairing='one_to_one' needs as many student as teacher rows, "
                f"got {rows_s} and {rows_t}"
            )
        return _Layout(1, 1, rows_s, exclude_same=False)
    layout = _Layout(rows_s // batch_size, rows_t // batch_size, batch_size, exclude_same=True)
    if layout.n_pairs == 0:
        raise ValueError(
            "dino_cross_entropy: pairing='dino' with 1 student crop and 1 teacher view has no pair (u != v); "
            "use pairing='one_to_one' or give more crops"
        )
    return layout


# ----------------------------------------------------------------------------------------------------------------
# reference: the literal DINO loop
# ----------------------------------------------------------------------------------------------------------------


def _reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    centre: torch.Tensor | None,
    student_temperature: float,
    teacher_temperature: float,
    batch_size: int,
    pairing: str,
) -> DinoCrossEntropyOutput:
    """DINO's loop: for each teacher view v and student crop u (u != v), mean_b sum_k -p_v log q_u."""
    acc = _accumulation_dtype(student_logits)
    teacher = teacher_logits.detach().to(acc)
    centred = teacher if centre is None else teacher - centre.detach().to(acc)
    log_p = F.log_softmax(centred / teacher_temperature, dim=-1)
    p = log_p.exp()
    log_q = F.log_softmax(student_logits.to(acc) / student_temperature, dim=-1)
    p_views, log_q_crops = p.split(batch_size), log_q.split(batch_size)
    total, n_terms = torch.zeros((), dtype=acc, device=student_logits.device), 0
    if pairing == "one_to_one":
        pairs = [(r, r) for r in range(len(log_q_crops))]
    else:
        pairs = [(v, u) for v in range(len(p_views)) for u in range(len(log_q_crops)) if u != v]
    for v, u in pairs:
        total = total + torch.sum(-p_views[v] * log_q_crops[u], dim=-1).mean()
        n_terms += 1
    entropy = -(p * log_p).sum(dim=-1).mean()
    return DinoCrossEntropyOutput(total / n_terms, teacher.sum(dim=0), entropy)


# ----------------------------------------------------------------------------------------------------------------
# torch: the log-sum-exp / dot-product identity with an analytic backward
# ----------------------------------------------------------------------------------------------------------------

# On CPU, work proceeds in blocks of about this many elements: the fp32 temporaries (512 KiB) stay in L2 and below
# the allocator's mmap threshold. Whole-tensor temporaries of S*B*K would be fresh pages on every call, and page
# faults, not arithmetic, then dominate on CPU (measured 3x slower at B=32, K=65536, 12 crops). Small problems
# take several whole crops per block, so that the number of ops (the cost there) stays low. On a GPU the cost is
# the number of launches (small blocks made this path 100x slower than the reference on an H200), so blocks
# there are as large as memory comfortably allows.
_CHUNK_ELEMENTS = {"cpu": 1 << 17, "gpu": 1 << 28}


def _chunks(crops: int, batch: int, k: int, device: torch.device):
    """(crops slice, images slice) blocks of the [crops, batch, k] view, about _CHUNK_ELEMENTS elements each:
    several whole crops, or part of the batch of one crop."""
    chunk_elements = _CHUNK_ELEMENTS["cpu" if device.type == "cpu" else "gpu"]
    if batch * k <= chunk_elements:
        step = chunk_elements // (batch * k)
        for u0 in range(0, crops, step):
            yield slice(u0, min(u0 + step, crops)), slice(0, batch)
    else:
        step = max(1, chunk_elements // k)
        for u in range(crops):
            for b0 in range(0, batch, step):
                yield slice(u, u + 1), slice(b0, min(b0 + step, batch))


def _same_views(crops: slice, views: int) -> slice:
    """The crops of a block that are teacher views too (u < T): their pair with view u is excluded."""
    return slice(crops.start, max(crops.start, min(crops.stop, views)))


def _teacher_log_probs(teacher_block, centre, inv_tau_t, lse=None):
    """log p = (t - c) / tau_t - lse over the last dim; lse is computed when not given."""
    z = teacher_block if centre is None else teacher_block - centre
    z = z * inv_tau_t
    if lse is None:
        lse = torch.logsumexp(z, dim=-1)
    return z.sub_(lse.unsqueeze(-1)), lse


class _TorchDinoCE(torch.autograd.Function):
    """Forward: per-row lse's, P = sum_v p_v per image, and the pair sum of <p_v, s_u> as
    sum_u <P, s_u> - sum_{u < T} <p_u, s_u> (the excluded same-view pairs): only [B, K] is ever stored.
    Backward: ds_u = (w_u softmax(s_u / tau_s) - P + [u excluded] p_u) * g / (tau_s n_pairs B).
    Rows are viewed as [crops, B, K]."""

    @staticmethod
    def forward(ctx, student, teacher, centre, tau_s, tau_t, layout):
        S, T, B = layout.student, layout.teacher, layout.batch
        K = student.shape[1]
        students, teachers = student.view(S, B, K), teacher.view(T, B, K)
        acc = _accumulation_dtype(student)
        centre = None if centre is None else centre.to(acc)
        new = {"dtype": acc, "device": student.device}
        column_sum, p_all = torch.zeros(K, **new), torch.zeros(B, K, **new)
        lse_t, entropy, lse_s = torch.empty(T, B, **new), torch.empty(T, B, **new), torch.empty(S, B, **new)
        cross = torch.zeros((), **new)
        for views, images in _chunks(T, B, K, student.device):
            t = teachers[views, images].to(acc)
            column_sum += t.sum(dim=(0, 1))
            log_p, lse_t[views, images] = _teacher_log_probs(t, centre, 1.0 / tau_t)
            p = log_p.exp()
            entropy[views, images] = -(p * log_p).sum(dim=-1)
            p_all[images] += p.sum(dim=0)
            same = _same_views(views, S) if layout.exclude_same else slice(0, 0)
            if same.stop > same.start:
                n = same.stop - same.start
                cross -= torch.dot(p[:n].flatten(), students[same, images].to(acc).flatten())
        for crops, images in _chunks(S, B, K, student.device):
            s = students[crops, images].to(acc)
            lse_s[crops, images] = torch.logsumexp(s * (1.0 / tau_s), dim=-1)
            cross += torch.dot(p_all[images].flatten(), s.sum(dim=0).flatten())
        weights = torch.tensor(layout.pair_weights(), **new)
        loss = (torch.dot(weights, lse_s.sum(dim=1)) - cross / tau_s) / (layout.n_pairs * B)
        ctx.save_for_backward(student, teacher, centre, lse_s, lse_t, p_all, weights)
        ctx.tau_s, ctx.tau_t, ctx.layout = tau_s, tau_t, layout
        entropy = entropy.mean()
        ctx.mark_non_differentiable(column_sum, entropy)
        return loss, column_sum, entropy

    @staticmethod
    def backward(ctx, grad_loss, _grad_column_sum, _grad_entropy):
        student, teacher, centre, lse_s, lse_t, p_all, weights = ctx.saved_tensors
        layout, tau_s = ctx.layout, ctx.tau_s
        S, T, B = layout.student, layout.teacher, layout.batch
        K = student.shape[1]
        students, teachers = student.view(S, B, K), teacher.view(T, B, K)
        acc = lse_s.dtype
        scale = grad_loss.to(acc) / (tau_s * layout.n_pairs * B)
        # w_u softmax(s_u/tau_s) = exp(s_u/tau_s - lse_u + log w_u): the weight folded into the exponent (a crop
        # without pairs, w_u = 0, gets exp(-inf) = 0); then only in-place ops on the block.
        log_w = torch.log(weights)
        grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
        grads = grad.view(S, B, K)
        for crops, images in _chunks(S, B, K, student.device):
            bias = (log_w[crops, None] - lse_s[crops, images]).unsqueeze(-1)
            g = torch.add(bias, students[crops, images].to(acc), alpha=1.0 / tau_s).exp_()
            g.sub_(p_all[images])
            same = _same_views(crops, T) if layout.exclude_same else slice(0, 0)
            if same.stop > same.start:  # these crops are not paired with their own view: give p_u back
                t = teachers[same, images].to(acc)
                log_p, _ = _teacher_log_probs(t, centre, 1.0 / ctx.tau_t, lse_t[same, images])
                g[: same.stop - same.start].add_(log_p.exp_())
            grads[crops, images] = g.mul_(scale)
        return grad, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------------------
# triton: fused forward (partials over K blocks + a combine) and fused backward
# ----------------------------------------------------------------------------------------------------------------

# Stand-in for -inf in the combine step: finite, so that (m - M) * 0 stays 0 for padded and masked entries.
_NEG_BIG = -1.0e30


@_jit
def _dino_ce_fwd_partials_kernel(
    s_ptr, t_ptr, c_ptr, column_sum_ptr,
    t_max_ptr, t_sum_ptr, t_shift_ptr, s_max_ptr, s_sum_ptr, dot_ptr,
    K, B, n_blocks, images_per_program, stride_s, stride_t, inv_tau_s, inv_tau_t,
    S: tl.constexpr, T: tl.constexpr, T_PAD: tl.constexpr, HAS_CENTRE: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One program per (block of BLOCK_K columns, group of images), looping over the images b of its group.

    For each (b, block) it writes block-local softmax statistics relative to the block maximum m:
      teacher v: m_v, sum e^{z-m_v}, sum e^{z-m_v} (z-m_v)       (z = (t - c) / tau_t)
      student u: m_u, sum e^{x-m_u}                              (x = s / tau_s)
      pair (v, u): sum_k e^{z_vk - m_v} s_uk                     (un-normalised <p_v, s_u>)
    and, summed over its images and all v, the raw teacher column sums of its block, one row per image group
    (summed afterwards: deterministic, no atomics).
    """
    blk = tl.program_id(0)
    group = tl.program_id(1)
    offs = blk * BLOCK_K + tl.arange(0, BLOCK_K)
    col_mask = offs < K
    views = tl.arange(0, T_PAD)
    view_mask = views < T
    tile_mask = view_mask[:, None] & col_mask[None, :]
    if HAS_CENTRE:
        centre = tl.load(c_ptr + offs, mask=col_mask, other=0.0).to(tl.float32)
    column_sum = tl.zeros([BLOCK_K], dtype=tl.float32)
    for b in range(group * images_per_program, tl.minimum((group + 1) * images_per_program, B)):
        t_rows = (views * B + b).to(tl.int64)
        t = tl.load(t_ptr + t_rows[:, None] * stride_t + offs[None, :], mask=tile_mask, other=0.0).to(tl.float32)
        column_sum += tl.sum(t, axis=0)
        if HAS_CENTRE:
            t = t - centre[None, :]
        z = t * inv_tau_t
        # Masked entries are zeroed rather than set to -inf so that no inf * 0 appears; padded views get max 0.
        m_t = tl.where(view_mask, tl.max(tl.where(tile_mask, z, float("-inf")), axis=1), 0.0)
        shifted = tl.where(tile_mask, z - m_t[:, None], 0.0)
        e = tl.where(tile_mask, tl.exp(shifted), 0.0)
        part = (b * n_blocks + blk) * T + views
        tl.store(t_max_ptr + part, m_t, mask=view_mask)
        tl.store(t_sum_ptr + part, tl.sum(e, axis=1), mask=view_mask)
        tl.store(t_shift_ptr + part, tl.sum(e * shifted, axis=1), mask=view_mask)
        for u in tl.static_range(S):
            s_row = (u * B + b).to(tl.int64)
            s = tl.load(s_ptr + s_row * stride_s + offs, mask=col_mask, other=0.0).to(tl.float32)
            x = tl.where(col_mask, s * inv_tau_s, float("-inf"))
            m_s = tl.max(x, axis=0)
            s_part = (b * n_blocks + blk) * S + u
            tl.store(s_max_ptr + s_part, m_s)
            tl.store(s_sum_ptr + s_part, tl.sum(tl.exp(x - m_s), axis=0))
            tl.store(dot_ptr + s_part * T + views, tl.sum(e * s[None, :], axis=1), mask=view_mask)
    tl.store(column_sum_ptr + group.to(tl.int64) * K + offs, column_sum, mask=col_mask)


@_jit
def _dino_ce_fwd_combine_kernel(
    t_max_ptr, t_sum_ptr, t_shift_ptr, s_max_ptr, s_sum_ptr, dot_ptr,
    lse_t_ptr, lse_s_ptr, loss_ptr, entropy_ptr,
    B, n_blocks, inv_tau_s,
    S: tl.constexpr, T: tl.constexpr, T_PAD: tl.constexpr, S_PAD: tl.constexpr, Q_PAD: tl.constexpr,
    EXCLUDE_SAME: tl.constexpr, NEG_BIG: tl.constexpr, TILE: tl.constexpr,
):
    """One program per image b: merges the per-block statistics into row lse's, the entropy and the loss.

    Merging blocks with global maximum M: L = sum_blk e^{m-M} l,  A = sum_blk e^{m-M} (a + (m-M) l),
    lse = M + log L, H = log L - A / L, <p_v, s_u> = sum_blk e^{m_v-M_v} d_vu / L_v.
    Pass 1 finds the maxima, pass 2 sums; pair quantities (index q = u*T + v) recompute their view's maximum
    in the pair layout, which gives the same numbers without a gather.
    """
    b = tl.program_id(0)
    views = tl.arange(0, T_PAD)
    crops = tl.arange(0, S_PAD)
    pairs = tl.arange(0, Q_PAD)
    pair_view = pairs % T
    pair_crop = pairs // T
    view_mask, crop_mask, pair_mask = views < T, crops < S, pairs < S * T
    max_t = tl.full([T_PAD], NEG_BIG, tl.float32)
    max_s = tl.full([S_PAD], NEG_BIG, tl.float32)
    max_q = tl.full([Q_PAD], NEG_BIG, tl.float32)
    for j0 in range(0, n_blocks, TILE):
        blocks = j0 + tl.arange(0, TILE)
        row = (b * n_blocks + blocks)[:, None]
        bm = (blocks < n_blocks)[:, None]
        tm = tl.load(t_max_ptr + row * T + views[None, :], mask=bm & view_mask[None, :], other=NEG_BIG)
        sm = tl.load(s_max_ptr + row * S + crops[None, :], mask=bm & crop_mask[None, :], other=NEG_BIG)
        qm = tl.load(t_max_ptr + row * T + pair_view[None, :], mask=bm & pair_mask[None, :], other=NEG_BIG)
        max_t = tl.maximum(max_t, tl.max(tm, axis=0))
        max_s = tl.maximum(max_s, tl.max(sm, axis=0))
        max_q = tl.maximum(max_q, tl.max(qm, axis=0))
    sum_t = tl.zeros([T_PAD], dtype=tl.float32)
    shift_t = tl.zeros([T_PAD], dtype=tl.float32)
    sum_s = tl.zeros([S_PAD], dtype=tl.float32)
    sum_q = tl.zeros([Q_PAD], dtype=tl.float32)
    dot_q = tl.zeros([Q_PAD], dtype=tl.float32)
    for j0 in range(0, n_blocks, TILE):
        blocks = j0 + tl.arange(0, TILE)
        row = (b * n_blocks + blocks)[:, None]
        bm = (blocks < n_blocks)[:, None]
        tmask, smask, qmask = bm & view_mask[None, :], bm & crop_mask[None, :], bm & pair_mask[None, :]
        tm = tl.load(t_max_ptr + row * T + views[None, :], mask=tmask, other=NEG_BIG) - max_t[None, :]
        tsum = tl.load(t_sum_ptr + row * T + views[None, :], mask=tmask, other=0.0)
        ta = tl.load(t_shift_ptr + row * T + views[None, :], mask=tmask, other=0.0)
        rescale = tl.exp(tm)
        sum_t += tl.sum(rescale * tsum, axis=0)
        shift_t += tl.sum(rescale * (ta + tm * tsum), axis=0)
        sm = tl.load(s_max_ptr + row * S + crops[None, :], mask=smask, other=NEG_BIG) - max_s[None, :]
        sl = tl.load(s_sum_ptr + row * S + crops[None, :], mask=smask, other=0.0)
        sum_s += tl.sum(tl.exp(sm) * sl, axis=0)
        qm = tl.exp(tl.load(t_max_ptr + row * T + pair_view[None, :], mask=qmask, other=NEG_BIG) - max_q[None, :])
        ql = tl.load(t_sum_ptr + row * T + pair_view[None, :], mask=qmask, other=0.0)
        qd = tl.load(dot_ptr + row * (S * T) + pairs[None, :], mask=qmask, other=0.0)
        sum_q += tl.sum(qm * ql, axis=0)
        dot_q += tl.sum(qm * qd, axis=0)
    # Padded views, crops and pairs have zero sums: replace them by 1 so that log and division stay finite.
    sum_t = tl.where(view_mask, sum_t, 1.0)
    sum_s = tl.where(crop_mask, sum_s, 1.0)
    sum_q = tl.where(pair_mask, sum_q, 1.0)
    tl.store(lse_t_ptr + views * B + b, max_t + tl.log(sum_t), mask=view_mask)
    lse_s = max_s + tl.log(sum_s)
    tl.store(lse_s_ptr + crops * B + b, lse_s, mask=crop_mask)
    entropy = tl.where(view_mask, tl.log(sum_t) - shift_t / sum_t, 0.0)
    tl.store(entropy_ptr + b, tl.sum(entropy, axis=0))
    if EXCLUDE_SAME:
        weights = tl.where(crops < T, T - 1.0, T * 1.0)
        valid_pair = pair_mask & (pair_crop != pair_view)
    else:
        weights = tl.full([S_PAD], T * 1.0, tl.float32)
        valid_pair = pair_mask
    cross = tl.sum(tl.where(valid_pair, dot_q / sum_q, 0.0), axis=0)
    tl.store(loss_ptr + b, tl.sum(tl.where(crop_mask, weights * lse_s, 0.0), axis=0) - cross * inv_tau_s)


@_jit
def _dino_ce_bwd_kernel(
    s_ptr, t_ptr, c_ptr, lse_s_ptr, lse_t_ptr, grad_loss_ptr, ds_ptr,
    K, B, stride_s, stride_t, stride_ds, inv_tau_s, inv_tau_t, grad_scale,
    S: tl.constexpr, T: tl.constexpr, T_PAD: tl.constexpr, HAS_CENTRE: tl.constexpr, EXCLUDE_SAME: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One program per (image b, block of columns): ds_u = (w_u q_u - sum_{v paired u} p_v) * g / (tau_s n B).

    p_v is recomputed from the teacher logits and the saved lse_t; q_u from the student logits and lse_s.
    """
    b = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    col_mask = offs < K
    views = tl.arange(0, T_PAD)
    view_mask = views < T
    tile_mask = view_mask[:, None] & col_mask[None, :]
    t_rows = (views * B + b).to(tl.int64)
    t = tl.load(t_ptr + t_rows[:, None] * stride_t + offs[None, :], mask=tile_mask, other=0.0).to(tl.float32)
    if HAS_CENTRE:
        t = t - tl.load(c_ptr + offs, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    lse_t = tl.load(lse_t_ptr + views * B + b, mask=view_mask, other=0.0)
    p = tl.where(tile_mask, tl.exp(t * inv_tau_t - lse_t[:, None]), 0.0)
    p_all = tl.sum(p, axis=0)
    scale = tl.load(grad_loss_ptr).to(tl.float32) * grad_scale
    for u in tl.static_range(S):
        row = (u * B + b).to(tl.int64)
        s = tl.load(s_ptr + row * stride_s + offs, mask=col_mask, other=0.0).to(tl.float32)
        q = tl.exp(s * inv_tau_s - tl.load(lse_s_ptr + u * B + b))
        if EXCLUDE_SAME and u < T:
            target = p_all - tl.sum(tl.where(views[:, None] == u, p, 0.0), axis=0)
            ds = ((T - 1) * q - target) * scale
        else:
            ds = (T * q - p_all) * scale
        tl.store(ds_ptr + row * stride_ds + offs, ds.to(ds_ptr.dtype.element_ty), mask=col_mask)


def _block_k(K: int, t_pad: int) -> int:
    # Wide blocks: at 2048 columns and 8 warps every thread loads 8 consecutive elements (16-byte bf16 loads),
    # and a row costs few reductions. (256 columns gave 2 elements per thread and 8 % of the bandwidth floor on
    # an H200.) The teacher tile [T_PAD, BLOCK_K] in fp32 bounds it; small K gets a smaller block, little masked.
    return max(16, min(triton.next_power_of_2(K), 4096 // t_pad))


def _num_warps(block_k: int) -> int:
    return 8 if block_k >= 2048 else 4


# Forward programs wanted: blocks of K times groups of images. The loop over images inside a program keeps
# the column sums in registers; groups add parallelism when K has few blocks (a few waves of SMs at 1024).
_TARGET_PROGRAMS = 1024


def _row_contiguous(x: torch.Tensor) -> torch.Tensor:
    # The kernels index columns with stride 1 and rows with an arbitrary stride.
    return x if x.stride(1) == 1 else x.contiguous()


class _TritonDinoCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, centre, tau_s, tau_t, layout):
        S, T, B = layout.student, layout.teacher, layout.batch
        student, teacher = _row_contiguous(student), _row_contiguous(teacher)
        centre = None if centre is None else centre.float().contiguous()
        K, device = student.shape[1], student.device
        t_pad = triton.next_power_of_2(T)
        block_k = _block_k(K, t_pad)
        n_blocks = triton.cdiv(K, block_k)
        f32 = {"device": device, "dtype": torch.float32}
        images_per_program = triton.cdiv(B, max(1, min(B, _TARGET_PROGRAMS // n_blocks)))
        n_groups = triton.cdiv(B, images_per_program)
        column_sums = torch.empty(n_groups, K, **f32)
        t_max, t_sum, t_shift = (torch.empty(B, n_blocks, T, **f32) for _ in range(3))
        s_max, s_sum = (torch.empty(B, n_blocks, S, **f32) for _ in range(2))
        dots = torch.empty(B, n_blocks, S, T, **f32)
        _dino_ce_fwd_partials_kernel[(n_blocks, n_groups)](
            student, teacher, centre, column_sums,
            t_max, t_sum, t_shift, s_max, s_sum, dots,
            K, B, n_blocks, images_per_program, student.stride(0), teacher.stride(0), 1.0 / tau_s, 1.0 / tau_t,
            S=S, T=T, T_PAD=t_pad, HAS_CENTRE=centre is not None, BLOCK_K=block_k, num_warps=_num_warps(block_k),
        )
        lse_t, lse_s = torch.empty(T * B, **f32), torch.empty(S * B, **f32)
        loss_per_image, entropy_per_image = torch.empty(B, **f32), torch.empty(B, **f32)
        _dino_ce_fwd_combine_kernel[(B,)](
            t_max, t_sum, t_shift, s_max, s_sum, dots,
            lse_t, lse_s, loss_per_image, entropy_per_image,
            B, n_blocks, 1.0 / tau_s,
            S=S, T=T, T_PAD=t_pad, S_PAD=triton.next_power_of_2(S), Q_PAD=triton.next_power_of_2(S * T),
            EXCLUDE_SAME=layout.exclude_same, NEG_BIG=_NEG_BIG, TILE=64,
        )
        column_sum = column_sums[0] if n_groups == 1 else column_sums.sum(dim=0)
        loss = loss_per_image.sum() / (layout.n_pairs * B)
        entropy = entropy_per_image.sum() / (T * B)
        ctx.save_for_backward(student, teacher, centre, lse_s, lse_t)
        ctx.tau_s, ctx.tau_t, ctx.layout, ctx.block_k = tau_s, tau_t, layout, block_k
        ctx.mark_non_differentiable(column_sum, entropy)
        return loss, column_sum, entropy

    @staticmethod
    def backward(ctx, grad_loss, _grad_column_sum, _grad_entropy):
        student, teacher, centre, lse_s, lse_t = ctx.saved_tensors
        layout, block_k = ctx.layout, ctx.block_k
        K = student.shape[1]
        grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
        _dino_ce_bwd_kernel[(layout.batch, triton.cdiv(K, block_k))](
            student, teacher, centre, lse_s, lse_t, grad_loss.float().contiguous(), grad,
            K, layout.batch, student.stride(0), teacher.stride(0), grad.stride(0),
            1.0 / ctx.tau_s, 1.0 / ctx.tau_t, 1.0 / (ctx.tau_s * layout.n_pairs * layout.batch),
            S=layout.student, T=layout.teacher, T_PAD=triton.next_power_of_2(layout.teacher),
            HAS_CENTRE=centre is not None, EXCLUDE_SAME=layout.exclude_same, BLOCK_K=block_k,
            num_warps=_num_warps(block_k),
        )
        return grad, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------------------
# native: the fused C++ operators (autograd and fake kernels registered in mokd/kernels/native.py)
# ----------------------------------------------------------------------------------------------------------------


def _native(student, teacher, centre, tau_s, tau_t, layout) -> DinoCrossEntropyOutput:
    native.require("dino_cross_entropy(impl='native')")
    if student.device.type != "cpu":
        raise ValueError(f"dino_cross_entropy: impl='native' runs on CPU tensors, got {student.device}")
    loss, column_sum, entropy, _, _ = torch.ops.mokd.dino_cross_entropy(
        student, teacher, centre, float(tau_s), float(tau_t), layout.batch, layout.exclude_same
    )
    return DinoCrossEntropyOutput(loss, column_sum, entropy)


# ----------------------------------------------------------------------------------------------------------------
# public entry point
# ----------------------------------------------------------------------------------------------------------------


def _triton_usable(x: torch.Tensor) -> bool:
    # The Triton interpreter (TRITON_INTERPRET=1) runs the kernels on CPU tensors; it is how they are tested.
    return triton is not None and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


# The implementations by name (loss.kernel, the `impl` argument): each takes (student logits, teacher logits,
# centre or None, tau_s, tau_t, layout) after validation, the teacher logits and the centre detached.
Implementation = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None", float, float, _Layout],
                          DinoCrossEntropyOutput]
IMPLS: Registry[Implementation] = Registry("loss.kernel")
register_choices(IMPLS.key, IMPLS.helps)


@IMPLS.register("auto", "triton on CUDA, native on CPU when built, else torch")
def _auto(student, teacher, centre, tau_s, tau_t, layout) -> DinoCrossEntropyOutput:
    if student.is_cuda:
        impl = "triton" if triton is not None else "torch"
    else:
        impl = "native" if student.device.type == "cpu" and native.available() else "torch"
    return IMPLS.get(impl)(student, teacher, centre, tau_s, tau_t, layout)


@IMPLS.register("triton", "fused Triton kernels, one read of the logits forward and one backward (CUDA)")
def _triton(student, teacher, centre, tau_s, tau_t, layout) -> DinoCrossEntropyOutput:
    if not _triton_usable(student):
        raise ValueError(
            "dino_cross_entropy: impl='triton' needs Triton and CUDA tensors (or TRITON_INTERPRET=1 set before "
            f"import); got {student.device} tensors, triton {'present' if triton else 'missing'}"
        )
    return DinoCrossEntropyOutput(*_TritonDinoCE.apply(student, teacher, centre, tau_s, tau_t, layout))


@IMPLS.register("native", "fused C++ CPU operators (built by the install when a compiler is present)")
def _native_impl(student, teacher, centre, tau_s, tau_t, layout) -> DinoCrossEntropyOutput:
    return _native(student, teacher, centre, tau_s, tau_t, layout)


@IMPLS.register("torch", "the log-sum-exp identity with an analytic backward in plain PyTorch")
def _torch(student, teacher, centre, tau_s, tau_t, layout) -> DinoCrossEntropyOutput:
    return DinoCrossEntropyOutput(*_TorchDinoCE.apply(student, teacher, centre, tau_s, tau_t, layout))


@IMPLS.register("reference", "DINO's literal loop over (teacher view, student crop) pairs, for tests")
def _reference_impl(student, teacher, centre, tau_s, tau_t, layout) -> DinoCrossEntropyOutput:
    pairing = "dino" if layout.exclude_same else "one_to_one"
    return _reference(student, teacher, centre, tau_s, tau_t, layout.batch, pairing)


def dino_cross_entropy(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    centre: torch.Tensor | None,
    student_temperature: float,
    teacher_temperature: float,
    batch_size: int,
    pairing: str = "dino",
    impl: str = "auto",
) -> DinoCrossEntropyOutput:
    """DINO loss of student logits [S*B, K] against teacher logits [T*B, K] (crop-major rows), see module doc.

    ``impl``: ``"auto"`` (Triton on CUDA tensors; on CPU native when built, else torch), ``"triton"``,
    ``"native"``, ``"torch"`` or ``"reference"``.
    Outputs are fp32 (fp64 for fp64 inputs on the torch and reference paths). The gradient reaches
    ``student_logits`` only, in its dtype; teacher logits and centre are treated as detached (their ``.grad``
    stays ``None``). Raises ValueError for shapes that do not divide by ``batch_size`` and for a "dino" pairing
    without pairs (one student crop, one teacher view), NativeKernelsUnavailable for ``"native"`` when the
    library is not built.
    """
    layout = _validate(
        student_logits, teacher_logits, centre, student_temperature, teacher_temperature, batch_size, pairing, impl
    )
    centre = None if centre is None else centre.detach()
    return IMPLS.get(impl)(
        student_logits, teacher_logits.detach(), centre, float(student_temperature), float(teacher_temperature), layout
    )
