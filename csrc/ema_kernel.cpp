// In-place EMA over many tensors: target <- lerp(target, source, weight), in one parallel loop over all of them.
//
// The formula is torch.lerp's (exact at weight 0 and 1): weight < 0.5: target + weight (source - target), else
// source - (1 - weight) (source - target), one fused multiply-add, fp32 arithmetic for bf16/fp16 (rounded to
// nearest even on the store). That is what torch's vectorised CPU lerp computes, so both agree bit for bit.
#include "cpu_vec.h"
#include "kernels.h"

#include <ATen/Parallel.h>

#include <vector>

namespace mokd::native::CPU_CAPABILITY {
namespace {

// Elements per work item: 256 KiB of fp32 per tensor side, large enough that the per-item overhead vanishes and
// small enough that the ~470 tensors of a large pair split evenly over threads.
constexpr int64_t kChunk = 1 << 16;

struct WorkItem {
  int64_t pair;
  int64_t begin;
  int64_t end;
};

// fp32 lerp of n elements, in place on target.
inline void lerp_float(float* target, const float* source, int64_t n, float weight) {
  using V = Vectorized<float>;
  const bool small = std::abs(weight) < 0.5f;
  const V coeff(small ? weight : weight - 1.0f);
  auto step = [&](const V& t, const V& s) { return at::vec::fmadd(coeff, s - t, small ? t : s); };
  int64_t i = 0;
  for (; i + V::size() <= n; i += V::size()) step(V::loadu(target + i), V::loadu(source + i)).store(target + i);
  if (i < n) step(V::loadu(target + i, n - i), V::loadu(source + i, n - i)).store(target + i, n - i);
}

template <typename scalar_t>
void lerp_range(scalar_t* target, const scalar_t* source, int64_t n, float weight) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    lerp_float(target, source, n, weight);
  } else {
    // Reduced precision: convert a block to fp32, lerp, round back; the blocks stay in L1.
    constexpr int64_t block = 1024;
    alignas(64) float t[block];
    alignas(64) float s[block];
    for (int64_t k0 = 0; k0 < n; k0 += block) {
      const int64_t m = std::min(block, n - k0);
      as_acc<scalar_t, float>(target + k0, m, t);  // converts into t (the input is not fp32)
      as_acc<scalar_t, float>(source + k0, m, s);
      lerp_float(t, s, m, weight);
      store_from_acc<scalar_t, float>(t, m, target + k0);
    }
  }
}

}  // namespace

template <typename scalar_t>
void ema(const EmaPair<scalar_t>* pairs, int64_t n_pairs, float weight) {
  std::vector<WorkItem> items;
  for (int64_t p = 0; p < n_pairs; ++p) {
    for (int64_t begin = 0; begin < pairs[p].n; begin += kChunk) {
      items.push_back({p, begin, std::min(pairs[p].n, begin + kChunk)});
    }
  }
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const WorkItem& item = items[i];
      const EmaPair<scalar_t>& pair = pairs[item.pair];
      lerp_range(pair.target + item.begin, pair.source + item.begin, item.end - item.begin, weight);
    }
  });
}

template void ema<float>(const EmaPair<float>*, int64_t, float);
template void ema<c10::BFloat16>(const EmaPair<c10::BFloat16>*, int64_t, float);
template void ema<c10::Half>(const EmaPair<c10::Half>*, int64_t, float);

}  // namespace mokd::native::CPU_CAPABILITY
