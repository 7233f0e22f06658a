// Entry points of the CPU kernels, one copy per CPU capability (see CMakeLists.txt). Raw pointers only, so that
// the kernel translation units, compiled three times, need none of the heavy tensor headers.
#pragma once

#include <cstdint>

namespace mokd::native {

// Rows are crop-major: row (crop * batch + image). Pairs (teacher view v, student crop u) for every v < teacher,
// u < student, without u == v when exclude_same ("dino"); "one_to_one" arrives here as student = teacher = 1.
struct DinoShape {
  int64_t student;  // S
  int64_t teacher;  // T
  int64_t batch;    // B
  int64_t k;        // K
  bool exclude_same;

  int64_t n_pairs() const {
    return student * teacher - (exclude_same ? (student < teacher ? student : teacher) : 0);
  }
  // w_u: how many teacher views are paired with student crop u.
  int64_t weight(int64_t u) const { return teacher - (exclude_same && u < teacher ? 1 : 0); }
};

// Rows are processed in blocks of this many elements: a block (8 KiB in fp32) stays in L1 between the passes
// that need it (maximum, then exponentials), so each element comes from memory once per pass over its row.
constexpr int64_t kBlock = 2048;

inline int64_t blocks_per_row(int64_t k) { return (k + kBlock - 1) / kBlock; }

// Per-thread working memory of the DINO kernels, in acc_t elements (the caller allocates it, so that it is
// visible to torch's memory accounting): T + 1 rows of K probabilities (each view's p_v and their sum), one
// block for dtype conversion, and the per-block maxima of every teacher view.
inline int64_t dino_scratch_elements(const DinoShape& shape) {
  return (shape.teacher + 1) * shape.k + kBlock + shape.teacher * blocks_per_row(shape.k);
}

template <typename scalar_t, typename acc_t>
struct DinoForwardArgs {
  const scalar_t* student;  // [S*B, K], rows contiguous
  const scalar_t* teacher;  // [T*B, K]
  const acc_t* centre;      // [K] or nullptr
  acc_t inv_tau_s, inv_tau_t;
  acc_t* loss;           // [1]
  acc_t* column_sum;     // [K]: sum over all teacher rows of the raw logits
  acc_t* entropy;        // [1]: mean over teacher rows of H(p_v)
  acc_t* lse_s;          // [S*B]: logsumexp(s / tau_s) per student row
  acc_t* lse_t;          // [T*B]: logsumexp((t - c) / tau_t) per teacher row
  acc_t* scratch;        // [slots, dino_scratch_elements]
  int64_t scratch_slots;
};

template <typename scalar_t, typename acc_t>
struct DinoBackwardArgs {
  const scalar_t* student;
  const scalar_t* teacher;
  const acc_t* centre;
  const acc_t* lse_s;
  const acc_t* lse_t;
  acc_t inv_tau_s, inv_tau_t;
  acc_t grad_scale;  // dL_total/dL / (tau_s * n_pairs * B)
  scalar_t* grad;    // [S*B, K]
  acc_t* scratch;
  int64_t scratch_slots;
};

// One (target, source) pair of the EMA: n elements each, contiguous.
template <typename scalar_t>
struct EmaPair {
  scalar_t* target;
  const scalar_t* source;
  int64_t n;
};

#define MOKD_NATIVE_DECLARE(CAP)                                                            \
  namespace CAP {                                                                          \
  template <typename scalar_t, typename acc_t>                                             \
  void dino_forward(const DinoShape& shape, const DinoForwardArgs<scalar_t, acc_t>& args);   \
  template <typename scalar_t, typename acc_t>                                             \
  void dino_backward(const DinoShape& shape, const DinoBackwardArgs<scalar_t, acc_t>& args); \
  template <typename scalar_t>                                                             \
  void ema(const EmaPair<scalar_t>* pairs, int64_t n_pairs, float weight);                 \
  }

MOKD_NATIVE_DECLARE(DEFAULT)
MOKD_NATIVE_DECLARE(AVX2)
MOKD_NATIVE_DECLARE(AVX512)

}  // namespace mokd::native
