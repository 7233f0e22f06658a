"""The head's last layer fused with every DINO term that reads its output: the [rows, K] student logits never exist.

The student logits are s = x W^T, x [rows, d] the head's last-layer input, W [K, d] its (weight-normalised)
weight. With the notation of ``fused_terms`` (terms t, pair weights w_u^t, Y_u^t = sum_{v paired with u} p_v^t):

    loss_t = 1 / (n_t B_t) * sum_{u,b} [ w_u^t lse(s_ub / tau_s) - <Y_ub^t W, x_ub> / tau_s ]

The log-sum-exp is taken over tiles of K columns with an online merge (lse <- logaddexp(lse, lse(tile))), and the
cross term needs only PW_v = p_v W ([teacher rows, d]), accumulated tile by tile from the teacher, which exists
(its logits carry no gradient and have 2 views, not 2 + 10 crops). The backward recomputes each tile:

    G = dL/ds = sum_t c_t (w^t softmax(s / tau_s) - Y^t),   c_t = dL/dloss_t / (tau_s n_t B_t)
    dL/dx = (a * softmax) W - sum_t c_t Y^t W          (a_r = sum_t c_t w_r^t; Y^t W from PW, small)
    dL/dW[tile] = (a * softmax[tile])^T x - sum_t c_t p^t[tile]^T X^t      (X_v^t = sum_{u paired with v} x_u)

so memory beyond the inputs is O((rows + teacher rows) * tile) for the tiles and [K, d] for dW. Statistics are
fp32 (fp64 inputs stay fp64); autocast is off inside, so the tiles' matmuls run in that precision.

Two implementations of the student side (the [rows, K] work: the log-sum-exp, and the backward's recomputed
tiles giving (a * softmax) W and (a * softmax)^T x): ``torch`` (tiles of K as torch ops; CPU and any device) and
``triton`` (CUDA, and the Triton interpreter: one program per block of rows for the lse and dx, one per block of
K for dW, each tile's logits made by tl.dot in IEEE fp32 and never written; fp32/bf16/fp16 inputs, the whole
width d in one tile). The teacher side ([2B, K], no gradient: lse, entropy, column sums, p W and p^T X) is torch
tiles in both, with the same definitions as ``dino_cross_entropy``.
"""

from __future__ import annotations

import torch

from mokd.kernels.dino_cross_entropy import _NEG_BIG, _accumulation_dtype, _jit, _triton_usable, tl, triton
from mokd.kernels.fused_terms import DinoTarget, FusedTermsOutput, _Term, resolve_terms

# Columns per tile: about this many elements for the widest tile ([rows, tile] student or teacher block), so the
# fp32 temporaries stay a few MiB whatever K is.
_TILE_ELEMENTS = 1 << 18


def _tiles(k: int, rows: int):
    width = max(16, _TILE_ELEMENTS // max(rows, 1))
    for k0 in range(0, k, width):
        yield slice(k0, min(k0 + width, k))


def _pairing(layout, dtype, device) -> torch.Tensor:
    """M [S, T]: M[u, v] = 1 when student crop u is paired with teacher view v."""
    m = torch.ones(layout.student, layout.teacher, dtype=dtype, device=device)
    if layout.exclude_same:
        m.fill_diagonal_(0)  # crop u = view u for u < min(S, T)
    return m


def _teacher_z(target: DinoTarget, tile: slice, acc: torch.dtype) -> torch.Tensor:
    """(t - c) / tau_t on a tile of columns: a new tensor (the caller may modify it in place)."""
    z = target.teacher[:, tile].to(acc)
    if target.centre is not None:
        z = z - target.centre[tile].to(acc)
    return z * (1.0 / target.temperature)


def _torch_student_lse(xa, wa, tau_s, widest):
    lse_s = torch.full((xa.shape[0],), float("-inf"), dtype=xa.dtype, device=xa.device)
    for tile in _tiles(wa.shape[0], widest):
        lse_s = torch.logaddexp(lse_s, torch.logsumexp(xa @ wa[tile].T * (1.0 / tau_s), dim=1))
    return lse_s


def _torch_student_grads(xa, wa, lse_s, a, tau_s, widest):
    """((a * softmax(x W^T / tau_s)) W, (a * softmax)^T x), one tile of K at a time."""
    grad_x = torch.zeros_like(xa)
    grad_w = torch.empty_like(wa)
    for tile in _tiles(wa.shape[0], widest):
        weighted = (xa @ wa[tile].T).mul_(1.0 / tau_s).sub_(lse_s[:, None]).exp_().mul_(a[:, None])
        grad_x += weighted @ wa[tile]
        grad_w[tile] = weighted.T @ xa
    return grad_x, grad_w


@_jit
def _load_rows(ptr, index, index_mask, dims, dim_mask, D):
    """Rows `index` of a row-major [*, D] matrix, padded to D_PAD columns with zeros, in float32."""
    return tl.load(ptr + index[:, None].to(tl.int64) * D + dims[None, :],
                   mask=index_mask[:, None] & dim_mask[None, :], other=0.0).to(tl.float32)


@_jit
def _head_rows_kernel(x_ptr, w_ptr, lse_ptr, a_ptr, grad_x_ptr, R, K, D, inv_tau_s,
                      BACKWARD: tl.constexpr, NEG_BIG: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                      D_PAD: tl.constexpr):
    """One program per block of rows. Forward: lse of x W^T / tau_s by an online pass over tiles of K.
    Backward: dx = (a * softmax) W over the same tiles, softmax from the saved lse."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    dims = tl.arange(0, D_PAD)
    dim_mask = dims < D
    x = _load_rows(x_ptr, rows, row_mask, dims, dim_mask, D)
    if BACKWARD:
        lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
        a = tl.load(a_ptr + rows, mask=row_mask, other=0.0)
        grad = tl.zeros([BLOCK_R, D_PAD], dtype=tl.float32)
    else:
        m = tl.full([BLOCK_R], NEG_BIG, tl.float32)
        total = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_mask = cols < K
        w = _load_rows(w_ptr, cols, col_mask, dims, dim_mask, D)
        s = tl.dot(x, tl.trans(w), input_precision="ieee") * inv_tau_s
        if BACKWARD:
            q = tl.where(col_mask[None, :], tl.exp(s - lse[:, None]) * a[:, None], 0.0)
            grad += tl.dot(q, w, input_precision="ieee")
        else:
            s = tl.where(col_mask[None, :], s, NEG_BIG)
            m_new = tl.maximum(m, tl.max(s, axis=1))
            total = total * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
            m = m_new
    if BACKWARD:
        tl.store(grad_x_ptr + rows[:, None].to(tl.int64) * D + dims[None, :], grad,
                 mask=row_mask[:, None] & dim_mask[None, :])
    else:
        tl.store(lse_ptr + rows, m + tl.log(total), mask=row_mask)


@_jit
def _head_columns_kernel(x_ptr, w_ptr, lse_ptr, a_ptr, grad_w_ptr, R, K, D, inv_tau_s,
                         BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, D_PAD: tl.constexpr):
    """One program per tile of K: dW[tile] = (a * softmax[:, tile])^T x, looping over blocks of rows."""
    cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    col_mask = cols < K
    dims = tl.arange(0, D_PAD)
    dim_mask = dims < D
    w = _load_rows(w_ptr, cols, col_mask, dims, dim_mask, D)
    grad = tl.zeros([BLOCK_K, D_PAD], dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_mask = rows < R
        x = _load_rows(x_ptr, rows, row_mask, dims, dim_mask, D)
        lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
        a = tl.load(a_ptr + rows, mask=row_mask, other=0.0)  # 0 for padded rows: they add nothing
        s = tl.dot(x, tl.trans(w), input_precision="ieee") * inv_tau_s
        q = tl.exp(s - lse[:, None]) * a[:, None]
        grad += tl.dot(tl.trans(q), x, input_precision="ieee")
    tl.store(grad_w_ptr + cols[:, None].to(tl.int64) * D + dims[None, :], grad,
             mask=col_mask[:, None] & dim_mask[None, :])


# tl.dot needs every dimension >= 16; rows and K come in blocks, d in one padded tile.
_BLOCK_R, _BLOCK_K = 16, 32


def _triton_student_lse(xa, wa, tau_s, widest):
    x, w = xa.float().contiguous(), wa.float().contiguous()
    (rows, d), k = x.shape, w.shape[0]
    lse = torch.empty(rows, dtype=torch.float32, device=x.device)
    _head_rows_kernel[(triton.cdiv(rows, _BLOCK_R),)](
        x, w, lse, lse, x, rows, k, d, 1.0 / tau_s, BACKWARD=False, NEG_BIG=_NEG_BIG, BLOCK_R=_BLOCK_R,
        BLOCK_K=_BLOCK_K, D_PAD=max(16, triton.next_power_of_2(d)))
    return lse


def _triton_student_grads(xa, wa, lse_s, a, tau_s, widest):
    x, w = xa.float().contiguous(), wa.float().contiguous()
    (rows, d), k = x.shape, w.shape[0]
    lse_s, a = lse_s.float().contiguous(), a.float().contiguous()
    grad_x, grad_w = torch.empty_like(x), torch.empty_like(w)
    d_pad = max(16, triton.next_power_of_2(d))
    _head_rows_kernel[(triton.cdiv(rows, _BLOCK_R),)](
        x, w, lse_s, a, grad_x, rows, k, d, 1.0 / tau_s, BACKWARD=True, NEG_BIG=_NEG_BIG, BLOCK_R=_BLOCK_R,
        BLOCK_K=_BLOCK_K, D_PAD=d_pad)
    _head_columns_kernel[(triton.cdiv(k, _BLOCK_K),)](
        x, w, lse_s, a, grad_w, rows, k, d, 1.0 / tau_s, BLOCK_R=_BLOCK_R, BLOCK_K=_BLOCK_K, D_PAD=d_pad)
    return grad_x, grad_w


_STUDENT = {"torch": (_torch_student_lse, _torch_student_grads), "triton": (_triton_student_lse, _triton_student_grads)}


class _FusedHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, tau_s, targets, terms, impl):
        acc = _accumulation_dtype(x)
        xa, wa = x.to(acc), weight.to(acc)
        rows, k = x.shape[0], weight.shape[0]
        widest = max([rows] + [t.teacher.shape[0] for t in targets])
        lse_s = _STUDENT[impl][0](xa, wa, tau_s, widest).to(acc)
        losses, column_sums, entropies, lse_ts, projected, gathered = [], [], [], [], [], []
        for target, term in zip(targets, terms):
            layout = term.layout
            S, T, B = layout.student, layout.teacher, layout.batch
            lse_t = torch.full((T * B,), float("-inf"), dtype=acc, device=x.device)
            column_sum = torch.empty(k, dtype=acc, device=x.device)
            for tile in _tiles(k, widest):
                lse_t = torch.logaddexp(lse_t, torch.logsumexp(_teacher_z(target, tile, acc), dim=1))
                column_sum[tile] = target.teacher[:, tile].to(acc).sum(dim=0)
            entropy = torch.zeros(T * B, dtype=acc, device=x.device)
            pw = torch.zeros(T * B, x.shape[1], dtype=acc, device=x.device)
            for tile in _tiles(k, widest):
                log_p = _teacher_z(target, tile, acc).sub_(lse_t[:, None])
                p = log_p.exp()
                entropy -= (p * log_p).sum(dim=1)
                pw += p @ wa[tile]
            m = _pairing(layout, acc, x.device)
            x_t = xa[term.start:term.stop].view(S, B, -1)
            yw = torch.einsum("uv,vbd->ubd", m, pw.view(T, B, -1))  # Y_u W for every crop u
            lse_term = lse_s[term.start:term.stop].view(S, B)
            loss = (torch.dot(m.sum(dim=1), lse_term.sum(dim=1)) - (yw * x_t).sum() / tau_s) / (layout.n_pairs * B)
            losses.append(loss)
            column_sums.append(column_sum)
            entropies.append(entropy.mean())
            lse_ts.append(lse_t)
            projected.append(yw.reshape(S * B, -1))
            gathered.append(torch.einsum("uv,ubd->vbd", m, x_t).reshape(T * B, -1))  # X_v: sum of paired x_u
        ctx.save_for_backward(x, weight, lse_s, *lse_ts, *projected, *gathered)
        ctx.tau_s, ctx.targets, ctx.terms, ctx.impl = tau_s, targets, terms, impl
        losses, column_sums, entropies = torch.stack(losses), torch.stack(column_sums), torch.stack(entropies)
        ctx.mark_non_differentiable(column_sums, entropies)
        return losses, column_sums, entropies

    @staticmethod
    def backward(ctx, grad_losses, _grad_column_sums, _grad_entropies):
        x, weight, lse_s, *saved = ctx.saved_tensors
        targets, terms, tau_s = ctx.targets, ctx.terms, ctx.tau_s
        n = len(terms)
        lse_ts, projected, gathered = saved[:n], saved[n:2 * n], saved[2 * n:]
        acc = lse_s.dtype
        xa, wa = x.to(acc), weight.to(acc)
        rows, k = x.shape[0], weight.shape[0]
        coefs = [grad_losses[i].to(acc) / (tau_s * term.layout.n_pairs * term.layout.batch)
                 for i, term in enumerate(terms)]
        a = torch.zeros(rows, dtype=acc, device=x.device)  # a_r = sum_t c_t w_r^t
        for term, coef in zip(terms, coefs):  # per crop, the pair weights as scalars (no host-to-device copy)
            crops = a[term.start:term.stop].view(term.layout.student, term.layout.batch)
            for u, pair_weight in enumerate(term.layout.pair_weights()):
                crops[u] += coef * pair_weight
        widest = max([rows] + [t.teacher.shape[0] for t in targets])
        grad_x, grad_w = (g.to(acc) for g in _STUDENT[ctx.impl][1](xa, wa, lse_s, a, tau_s, widest))
        for term, coef, yw in zip(terms, coefs, projected):
            grad_x[term.start:term.stop] -= coef * yw
        for tile in _tiles(k, widest):
            for target, coef, lse_t, x_v in zip(targets, coefs, lse_ts, gathered):
                p = _teacher_z(target, tile, acc).sub_(lse_t[:, None]).exp_()
                grad_w[tile] -= coef * (p.T @ x_v)
        return grad_x.to(x.dtype), grad_w.to(weight.dtype), None, None, None, None


def fused_head(features: torch.Tensor, weight: torch.Tensor, student_temperature: float,
               targets: list[DinoTarget], impl: str = "auto") -> FusedTermsOutput:
    """Every DINO term reading the logits ``features @ weight.T`` ([rows, d] @ [d, K]), without building them.

    Same contract as ``fused_terms`` (targets read row ranges of the logits; weighted total with the gradient,
    detached per-term losses, teacher column sums and mean entropies), with the gradient flowing to ``features``
    and ``weight``. Teachers and centres are treated as detached. ``impl``: ``"auto"`` (Triton for CUDA tensors
    of fp32/bf16/fp16, else torch), ``"triton"`` or ``"torch"``. Raises ValueError as ``dino_cross_entropy``.
    """
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"fused_head: impl must be auto, triton or torch, got {impl!r}")
    if impl == "auto":
        impl = "triton" if features.is_cuda and triton is not None and features.dtype != torch.float64 else "torch"
    if impl == "triton" and not (_triton_usable(features) and features.dtype != torch.float64):
        raise ValueError("fused_head: impl='triton' needs Triton, CUDA tensors (or TRITON_INTERPRET=1 set before "
                         f"import) and fp32/bf16/fp16; got {features.device} {features.dtype}")
    if features.dim() != 2 or weight.dim() != 2 or features.shape[1] != weight.shape[1]:
        raise ValueError(f"fused_head: features [rows, d] and weight [K, d] must agree, got "
                         f"{tuple(features.shape)} and {tuple(weight.shape)}")
    terms: list[_Term] = resolve_terms(features.shape[0], weight.shape[0], features.dtype, student_temperature,
                                       targets)
    targets = [t._replace(teacher=t.teacher.detach(), centre=None if t.centre is None else t.centre.detach())
               for t in targets]
    with torch.autocast(features.device.type, enabled=False):
        losses, column_sums, entropies = _FusedHead.apply(features, weight, float(student_temperature), targets,
                                                          terms, impl)
    total = torch.stack([losses[n] * float(t.weight) for n, t in enumerate(targets)]).sum()
    return FusedTermsOutput(total, losses.detach(), column_sums, entropies)
