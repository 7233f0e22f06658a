// DINO cross-entropy on CPU: forward (loss, teacher column sums, entropy, per-row log-sum-exps) and backward.
//
// With p_v = softmax((t_v - c) / tau_t), P_b = sum_v p_vb, and lse_u = logsumexp(s_u / tau_s):
//   loss = (sum_{u,b} w_u lse_ub - (1/tau_s) sum_{u,b} <P_b - [u excluded] p_ub, s_ub>) / (n_pairs B)
//   dL/ds_ub = (w_u softmax(s_ub / tau_s) - P_b + [u excluded] p_ub) / (tau_s n_pairs B)
// so one image needs its T teacher rows turned into probabilities (kept in per-thread scratch, L2-sized) and then
// one streaming pass over each of its S student rows; nothing of size pairs x B x K exists.
//
// The exponentials are taken in base 2 (vexp2 of cpu_vec.h): z = x log2(e) is formed in the same fma that scales
// the logits by 1/tau, so the statistics below are base-2 (lse2 = lse log2(e)) and turned into nats only when
// stored (lse_s, lse_t, entropy).
//
// Work is split over images with at::parallel_for into a fixed number of chunks, each with its own scratch slot;
// every per-image result lands in its own place and the final sums run in image order, so the result does not
// depend on the number of threads (bit for bit). Column sums run in a separate pass split over columns, for the
// same reason (a per-thread partial sum would change the summation order with the thread count).
#include "cpu_vec.h"
#include "kernels.h"

#include <ATen/Parallel.h>

#include <cstdint>
#include <vector>

namespace mokd::native::CPU_CAPABILITY {
namespace {

template <typename acc_t>
using Vec = Vectorized<acc_t>;

template <typename acc_t>
constexpr acc_t kLog2eOf = static_cast<acc_t>(1.442695040888963407359924681001892137L);
template <typename acc_t>
constexpr acc_t kLn2Of = static_cast<acc_t>(0.693147180559945309417232121458176568L);

// The exponential pass over a block runs from L1 and leaves the memory bus idle; prefetching the next block's
// cache lines meanwhile lets the two overlap. One line per call.
template <typename scalar_t>
inline void prefetch_line(const scalar_t* block, int64_t line) {
  __builtin_prefetch(reinterpret_cast<const char*>(block) + 64 * line, 0, 3);
}

// Elements of acc_t per 64-byte cache line, a whole number of vectors: the exponential passes step by a line and
// issue one prefetch per step (the next fp32 block is then prefetched exactly once, not once per vector).
template <typename acc_t>
constexpr int64_t kLineElements = std::max<int64_t>(Vec<acc_t>::size(), 64 / sizeof(acc_t));

// The block after [k0, k0 + kBlock) of row, or the start of next_row after the last block (nullptr: none).
template <typename scalar_t>
inline const scalar_t* following_block(const scalar_t* row, int64_t k0, int64_t k, const scalar_t* next_row) {
  return k0 + kBlock < k ? row + k0 + kBlock : next_row;
}

// Softmax statistics of a row seen block by block, in base 2 (z = x log2 e) relative to the running maximum:
// sum = sum 2^{z - max}, shifted = sum 2^{z - max} (z - max) (the latter only for the teacher's entropy).
template <typename acc_t>
struct RunningSoftmax {
  acc_t max = -std::numeric_limits<acc_t>::infinity();
  acc_t sum = 0;
  acc_t shifted = 0;

  // Adds a block whose statistics are relative to its own maximum m: both sides are rescaled to the new maximum,
  // 2^{z - M'} = 2^{z - m} 2^{m - M'} and (z - M') = (z - m) + (m - M').
  void add(acc_t m, acc_t block_sum, acc_t block_shifted) {
    if (sum == 0) {  // the first block (the running maximum is still -inf, and -inf * 0 would be NaN)
      max = m, sum = block_sum, shifted = block_shifted;
      return;
    }
    const acc_t top = std::max(max, m);
    const acc_t old_scale = std::exp2(max - top);
    const acc_t new_scale = std::exp2(m - top);
    shifted = old_scale * (shifted + (max - top) * sum) + new_scale * (block_shifted + (m - top) * block_sum);
    sum = old_scale * sum + new_scale * block_sum;
    max = top;
  }
  acc_t lse2() const { return max + std::log2(sum); }
  acc_t lse() const { return lse2() * kLn2Of<acc_t>; }
  // H = lse - <p, x> = ln 2 (lse2 - <p, z>), with <p, z> = max + shifted / sum.
  acc_t entropy() const { return (std::log2(sum) - shifted / sum) * kLn2Of<acc_t>; }
};

// Working memory of one chunk of images, carved out of its scratch slot.
template <typename acc_t>
struct Scratch {
  acc_t* probs;       // [T, K]: p_v of the current image
  acc_t* total;       // [K]: P = sum_v p_v
  acc_t* buffer;      // [kBlock]: one block converted to acc_t
  acc_t* block_max;   // [T, blocks]

  Scratch(const DinoShape& shape, acc_t* slot)
      : probs(slot),
        total(slot + shape.teacher * shape.k),
        buffer(total + shape.k),
        block_max(buffer + kBlock) {}
};

// Forward, teacher side of image b: probs[v] = p_v, total = P_b; returns through lse_t / entropy per view.
template <typename scalar_t, typename acc_t>
void teacher_forward(const DinoShape& shape, const DinoForwardArgs<scalar_t, acc_t>& a, int64_t b,
                     Scratch<acc_t>& w, acc_t* entropy_of_view, acc_t* lse2_of_view) {
  constexpr int64_t V = Vec<acc_t>::size();
  const int64_t K = shape.k, n_blocks = blocks_per_row(K);
  const Vec<acc_t> to_z(a.inv_tau_t * kLog2eOf<acc_t>);
  for (int64_t v = 0; v < shape.teacher; ++v) {
    const scalar_t* row = a.teacher + (v * shape.batch + b) * K;
    acc_t* z = w.probs + v * K;
    RunningSoftmax<acc_t> stats;
    for (int64_t j = 0; j < n_blocks; ++j) {
      const int64_t k0 = j * kBlock, n = std::min(kBlock, K - k0);
      const acc_t* t = as_acc(row + k0, n, w.buffer);
      acc_t* zb = z + k0;
      // Pass 1 (reads the logits from memory): z = (t - c) log2(e) / tau_t into scratch, and the block maximum.
      Vec<acc_t> vmax(-std::numeric_limits<acc_t>::infinity());
      int64_t i = 0;
      for (; i + V <= n; i += V) {
        Vec<acc_t> x = Vec<acc_t>::loadu(t + i);
        if (a.centre) x = x - Vec<acc_t>::loadu(a.centre + k0 + i);
        x = x * to_z;
        x.store(zb + i);
        vmax = max_of(vmax, x);
      }
      if (i < n) {
        Vec<acc_t> x = Vec<acc_t>::loadu(t + i, n - i);
        if (a.centre) x = x - Vec<acc_t>::loadu(a.centre + k0 + i, n - i);
        x = x * to_z;
        x.store(zb + i, n - i);
        vmax = max_of(vmax, load_partial(zb + i, n - i, -std::numeric_limits<acc_t>::infinity()));
      }
      const acc_t m = horizontal_max(vmax);
      // Pass 2 (the block is in L1): e = 2^(z - m) in place, its sum, and sum e (z - m) for the entropy.
      const Vec<acc_t> vm(m);
      Vec<acc_t> vsum(0), vshift(0);
      const scalar_t* ahead = following_block(row, k0, K, (v + 1 < shape.teacher) ? row + shape.batch * K : nullptr);
      auto step = [&](int64_t l) {
        const Vec<acc_t> d = Vec<acc_t>::loadu(zb + l) - vm;
        const Vec<acc_t> e = vexp2(d);
        e.store(zb + l);
        vsum = vsum + e;
        vshift = at::vec::fmadd(e, d, vshift);
      };
      constexpr int64_t L = kLineElements<acc_t>;
      for (i = 0; i + L <= n; i += L) {
        if (ahead) prefetch_line(ahead, i / L);
        for (int64_t l = i; l < i + L; l += V) step(l);
      }
      for (; i + V <= n; i += V) step(i);
      if (i < n) {
        const Vec<acc_t> d = keep_first(Vec<acc_t>::loadu(zb + i, n - i) - vm, n - i);
        const Vec<acc_t> e = keep_first(vexp2(d), n - i);
        e.store(zb + i, n - i);
        vsum = vsum + e;
        vshift = at::vec::fmadd(e, d, vshift);
      }
      w.block_max[v * n_blocks + j] = m;
      stats.add(m, horizontal_sum(vsum), horizontal_sum(vshift));
    }
    lse2_of_view[v] = stats.lse2();
    a.lse_t[v * shape.batch + b] = stats.lse();
    entropy_of_view[v] = stats.entropy();
  }
  // p_v = e * 2^(m_block - lse2_v) (the scratch is still in L2), and P = sum_v p_v.
  for (int64_t j = 0; j < n_blocks; ++j) {
    const int64_t k0 = j * kBlock, n = std::min(kBlock, K - k0);
    for (int64_t v = 0; v < shape.teacher; ++v) {
      const acc_t scale = std::exp2(w.block_max[v * n_blocks + j] - lse2_of_view[v]);
      at::vec::map([scale](Vec<acc_t> e) { return e * Vec<acc_t>(scale); }, w.probs + v * K + k0,
                   w.probs + v * K + k0, n);
      if (v == 0) {
        std::copy(w.probs + k0, w.probs + k0 + n, w.total + k0);
      } else {
        at::vec::map2([](Vec<acc_t> x, Vec<acc_t> y) { return x + y; }, w.total + k0, w.total + k0,
                      w.probs + v * K + k0, n);
      }
    }
  }
}

// Pass 1 of a student block (from memory): the maximum of the raw logits and the dot product with the target
// P_b - p_ub (excluded: p_ub, or nullptr), accumulated into vdot.
template <bool kExcluded, typename acc_t>
acc_t student_block_max_dot(const acc_t* s, const acc_t* total, const acc_t* excluded, int64_t n, Vec<acc_t>& vdot) {
  constexpr int64_t V = Vec<acc_t>::size();
  Vec<acc_t> vmax(-std::numeric_limits<acc_t>::infinity());
  int64_t i = 0;
  for (; i + V <= n; i += V) {
    const Vec<acc_t> x = Vec<acc_t>::loadu(s + i);
    Vec<acc_t> target = Vec<acc_t>::loadu(total + i);
    if constexpr (kExcluded) target = target - Vec<acc_t>::loadu(excluded + i);
    vdot = at::vec::fmadd(target, x, vdot);
    vmax = max_of(vmax, x);
  }
  if (i < n) {
    const Vec<acc_t> x = Vec<acc_t>::loadu(s + i, n - i);  // zero beyond n: adds nothing to the dot product
    Vec<acc_t> target = Vec<acc_t>::loadu(total + i, n - i);
    if constexpr (kExcluded) target = target - Vec<acc_t>::loadu(excluded + i, n - i);
    vdot = at::vec::fmadd(target, x, vdot);
    vmax = max_of(vmax, load_partial(s + i, n - i, -std::numeric_limits<acc_t>::infinity()));
  }
  return horizontal_max(vmax);
}

// Forward, student crop u of image b: returns <target, s_u> and writes lse_u; target = P_b - [excluded] p_ub.
template <typename scalar_t, typename acc_t>
acc_t student_forward(const DinoShape& shape, const DinoForwardArgs<scalar_t, acc_t>& a, int64_t u, int64_t b,
                      Scratch<acc_t>& w, const scalar_t* next_row) {
  constexpr int64_t V = Vec<acc_t>::size();
  const int64_t K = shape.k, n_blocks = blocks_per_row(K);
  const scalar_t* row = a.student + (u * shape.batch + b) * K;
  const acc_t* excluded = (shape.exclude_same && u < shape.teacher) ? w.probs + u * K : nullptr;
  const acc_t to_z = a.inv_tau_s * kLog2eOf<acc_t>;
  const Vec<acc_t> vto_z(to_z);
  RunningSoftmax<acc_t> stats;
  Vec<acc_t> vdot(0);
  for (int64_t j = 0; j < n_blocks; ++j) {
    const int64_t k0 = j * kBlock, n = std::min(kBlock, K - k0);
    const acc_t* s = as_acc(row + k0, n, w.buffer);
    // The block maximum of z = s log2(e) / tau_s is that of s times the (positive) factor: rounding is monotonic.
    const acc_t m = to_z * (excluded ? student_block_max_dot<true>(s, w.total + k0, excluded + k0, n, vdot)
                                     : student_block_max_dot<false>(s, w.total + k0, excluded, n, vdot));
    // Pass 2 (from L1): sum 2^(z - m), while the next block streams in.
    const Vec<acc_t> vm(m);
    Vec<acc_t> vsum(0);
    const scalar_t* ahead = following_block(row, k0, K, next_row);
    auto step = [&](int64_t l) { vsum = vsum + vexp2(at::vec::fmsub(Vec<acc_t>::loadu(s + l), vto_z, vm)); };
    constexpr int64_t L = kLineElements<acc_t>;
    int64_t i = 0;
    for (; i + L <= n; i += L) {
      if (ahead) prefetch_line(ahead, i / L);
      for (int64_t l = i; l < i + L; l += V) step(l);
    }
    for (; i + V <= n; i += V) step(i);
    if (i < n) {
      vsum = vsum + keep_first(vexp2(at::vec::fmsub(Vec<acc_t>::loadu(s + i, n - i), vto_z, vm)), n - i);
    }
    stats.add(m, horizontal_sum(vsum), 0);
  }
  a.lse_s[u * shape.batch + b] = stats.lse();
  return horizontal_sum(vdot);
}

// Column sums of the raw teacher logits, columns split over threads, rows summed in order.
template <typename scalar_t, typename acc_t>
void teacher_column_sums(const DinoShape& shape, const scalar_t* teacher, acc_t* column_sum) {
  const int64_t K = shape.k, rows = shape.teacher * shape.batch;
  at::parallel_for(0, blocks_per_row(K), 1, [&](int64_t j0, int64_t j1) {
    std::vector<acc_t> buffer(kBlock);
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t k0 = j * kBlock, n = std::min(kBlock, K - k0);
      acc_t* out = column_sum + k0;
      std::fill(out, out + n, acc_t(0));
      for (int64_t r = 0; r < rows; ++r) {
        const acc_t* t = as_acc(teacher + r * K + k0, n, buffer.data());
        at::vec::map2([](Vec<acc_t> x, Vec<acc_t> y) { return x + y; }, out, out, t, n);
      }
    }
  });
}

// Images [0, B) in `slots` fixed chunks: chunk c always covers the same images and uses scratch slot c.
template <typename F>
void for_each_image_chunk(int64_t batch, int64_t slots, const F& body) {
  at::parallel_for(0, slots, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) body(c, c * batch / slots, (c + 1) * batch / slots);
  });
}

}  // namespace

template <typename scalar_t, typename acc_t>
void dino_forward(const DinoShape& shape, const DinoForwardArgs<scalar_t, acc_t>& a) {
  const int64_t B = shape.batch, T = shape.teacher, S = shape.student;
  std::vector<acc_t> loss_of_image(B), entropy_of_image(B);
  const int64_t slot_size = dino_scratch_elements(shape);
  for_each_image_chunk(B, a.scratch_slots, [&](int64_t c, int64_t b0, int64_t b1) {
    Scratch<acc_t> w(shape, a.scratch + c * slot_size);
    std::vector<acc_t> entropy_of_view(T), lse2_of_view(T);
    for (int64_t b = b0; b < b1; ++b) {
      teacher_forward(shape, a, b, w, entropy_of_view.data(), lse2_of_view.data());
      acc_t weighted_lse = 0, cross = 0;
      for (int64_t u = 0; u < S; ++u) {
        const scalar_t* next_row = u + 1 < S ? a.student + ((u + 1) * B + b) * shape.k : nullptr;
        cross += student_forward(shape, a, u, b, w, next_row);
        weighted_lse += static_cast<acc_t>(shape.weight(u)) * a.lse_s[u * B + b];
      }
      loss_of_image[b] = weighted_lse - cross * a.inv_tau_s;
      acc_t entropy = 0;
      for (int64_t v = 0; v < T; ++v) entropy += entropy_of_view[v];
      entropy_of_image[b] = entropy;
    }
  });
  teacher_column_sums(shape, a.teacher, a.column_sum);
  acc_t loss = 0, entropy = 0;
  for (int64_t b = 0; b < B; ++b) {
    loss += loss_of_image[b];
    entropy += entropy_of_image[b];
  }
  a.loss[0] = loss / static_cast<acc_t>(shape.n_pairs() * B);
  a.entropy[0] = entropy / static_cast<acc_t>(T * B);
}

// One block of a student row's gradient: out = q w_u scale - target scale with q = 2^(s to_z - lse2_u), where
// total and excluded already hold P_b scale and p_ub scale. An fp32 gradient goes straight to memory with
// streaming stores when its rows are 64-byte aligned (K a multiple of 16): it is written once, and this skips
// reading each line before writing it.
template <bool kExcluded, bool kStreaming, typename acc_t>
void student_block_grad(const acc_t* s, const acc_t* total, const acc_t* excluded, int64_t n, const Vec<acc_t>& to_z,
                        const Vec<acc_t>& lse2, const Vec<acc_t>& weight, acc_t* out) {
  constexpr int64_t V = Vec<acc_t>::size();
  auto grad_of = [&](const Vec<acc_t>& x, Vec<acc_t> target) {
    return at::vec::fmsub(vexp2(at::vec::fmsub(x, to_z, lse2)), weight, target);
  };
  int64_t i = 0;
  for (; i + V <= n; i += V) {
    Vec<acc_t> target = Vec<acc_t>::loadu(total + i);
    if constexpr (kExcluded) target = target - Vec<acc_t>::loadu(excluded + i);
    const Vec<acc_t> g = grad_of(Vec<acc_t>::loadu(s + i), target);
    if constexpr (kStreaming) {
      store_streaming(g, out + i);
    } else {
      g.store(out + i);
    }
  }
  if (i < n) {
    Vec<acc_t> target = Vec<acc_t>::loadu(total + i, n - i);
    if constexpr (kExcluded) target = target - Vec<acc_t>::loadu(excluded + i, n - i);
    grad_of(Vec<acc_t>::loadu(s + i, n - i), target).store(out + i, n - i);
  }
}

template <typename scalar_t, typename acc_t>
void dino_backward(const DinoShape& shape, const DinoBackwardArgs<scalar_t, acc_t>& a) {
  const int64_t B = shape.batch, T = shape.teacher, S = shape.student, K = shape.k;
  const int64_t n_blocks = blocks_per_row(K), slot_size = dino_scratch_elements(shape);
  const acc_t scale = a.grad_scale;
  const Vec<acc_t> to_z_s(a.inv_tau_s * kLog2eOf<acc_t>);
  for_each_image_chunk(B, a.scratch_slots, [&](int64_t c, int64_t b0, int64_t b1) {
    Scratch<acc_t> w(shape, a.scratch + c * slot_size);
    for (int64_t b = b0; b < b1; ++b) {
      // p_v scale = 2^((t - c) log2(e) / tau_t - lse2_v) scale from the saved lse, and P scale = sum_v p_v scale:
      // the gradient's scale is applied here once per image instead of once per student element.
      for (int64_t v = 0; v < T; ++v) {
        const scalar_t* row = a.teacher + (v * B + b) * K;
        const Vec<acc_t> lse2(a.lse_t[v * B + b] * kLog2eOf<acc_t>), to_z(a.inv_tau_t * kLog2eOf<acc_t>), vscale(scale);
        acc_t* p = w.probs + v * K;
        for (int64_t j = 0; j < n_blocks; ++j) {
          const int64_t k0 = j * kBlock, n = std::min(kBlock, K - k0);
          const acc_t* t = as_acc(row + k0, n, w.buffer);
          if (a.centre) {
            at::vec::map2([=](Vec<acc_t> x, Vec<acc_t> cc) { return vexp2(at::vec::fmsub(x - cc, to_z, lse2)) * vscale; },
                          p + k0, t, a.centre + k0, n);
          } else {
            at::vec::map([=](Vec<acc_t> x) { return vexp2(at::vec::fmsub(x, to_z, lse2)) * vscale; }, p + k0, t, n);
          }
          if (v == 0) {
            std::copy(p + k0, p + k0 + n, w.total + k0);
          } else {
            at::vec::map2([](Vec<acc_t> x, Vec<acc_t> y) { return x + y; }, w.total + k0, w.total + k0, p + k0, n);
          }
        }
      }
      // ds_u = w_u scale softmax(s_u / tau_s) - target scale, written once.
      for (int64_t u = 0; u < S; ++u) {
        const scalar_t* row = a.student + (u * B + b) * K;
        scalar_t* grad_row = a.grad + (u * B + b) * K;
        const acc_t* excluded = (shape.exclude_same && u < T) ? w.probs + u * K : nullptr;
        const Vec<acc_t> lse2(a.lse_s[u * B + b] * kLog2eOf<acc_t>);
        const Vec<acc_t> weight(static_cast<acc_t>(shape.weight(u)) * scale);
        for (int64_t j = 0; j < n_blocks; ++j) {
          const int64_t k0 = j * kBlock, n = std::min(kBlock, K - k0);
          const acc_t* s = as_acc(row + k0, n, w.buffer);
          const acc_t* total = w.total + k0;
          const acc_t* own = excluded ? excluded + k0 : nullptr;
          if constexpr (std::is_same_v<scalar_t, acc_t>) {
            acc_t* out = grad_row + k0;
            if (reinterpret_cast<uintptr_t>(out) % 64 == 0) {
              own ? student_block_grad<true, true>(s, total, own, n, to_z_s, lse2, weight, out)
                  : student_block_grad<false, true>(s, total, own, n, to_z_s, lse2, weight, out);
            } else {
              own ? student_block_grad<true, false>(s, total, own, n, to_z_s, lse2, weight, out)
                  : student_block_grad<false, false>(s, total, own, n, to_z_s, lse2, weight, out);
            }
          } else {
            // Into the conversion buffer (each element is overwritten after it is read), then rounded to scalar_t.
            own ? student_block_grad<true, false>(s, total, own, n, to_z_s, lse2, weight, w.buffer)
                : student_block_grad<false, false>(s, total, own, n, to_z_s, lse2, weight, w.buffer);
            store_from_acc(w.buffer, n, grad_row + k0);
          }
        }
      }
    }
    stream_fence();  // the streamed gradient is visible to other threads once this chunk returns
  });
}

#define MOKD_INSTANTIATE(scalar_t, acc_t)                                                           \
  template void dino_forward<scalar_t, acc_t>(const DinoShape&, const DinoForwardArgs<scalar_t, acc_t>&); \
  template void dino_backward<scalar_t, acc_t>(const DinoShape&, const DinoBackwardArgs<scalar_t, acc_t>&);
MOKD_INSTANTIATE(float, float)
MOKD_INSTANTIATE(double, double)
MOKD_INSTANTIATE(c10::BFloat16, float)
MOKD_INSTANTIATE(c10::Half, float)
#undef MOKD_INSTANTIATE

}  // namespace mokd::native::CPU_CAPABILITY
