// Vector helpers shared by the kernel translation units. Each unit is compiled once per CPU capability with
// CPU_CAPABILITY set (DEFAULT, AVX2, AVX512); these helpers then live in that capability's namespace, and
// at::vec::Vectorized is ATen's implementation for it (the plain-array fallback for DEFAULT).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

namespace mokd::native::CPU_CAPABILITY {

using at::vec::Vectorized;

template <typename T>
inline T horizontal_sum(const Vectorized<T>& v) {
  alignas(64) T lanes[Vectorized<T>::size()];
  v.store(lanes);
  T total = 0;
  for (int i = 0; i < Vectorized<T>::size(); ++i) total += lanes[i];
  return total;
}

template <typename T>
inline T horizontal_max(const Vectorized<T>& v) {
  alignas(64) T lanes[Vectorized<T>::size()];
  v.store(lanes);
  T best = lanes[0];
  for (int i = 1; i < Vectorized<T>::size(); ++i) best = std::max(best, lanes[i]);
  return best;
}

// The first n (< size) lanes loaded from p, the others set to fill.
template <typename T>
inline Vectorized<T> load_partial(const T* p, int64_t n, T fill) {
  return Vectorized<T>::set(Vectorized<T>(fill), Vectorized<T>::loadu(p, n), n);
}

// The first n lanes of v, the others zero.
template <typename T>
inline Vectorized<T> keep_first(const Vectorized<T>& v, int64_t n) {
  return Vectorized<T>::set(Vectorized<T>(T(0)), v, n);
}

// exp in fp32: ATen's polynomial (20 ulp, no Sleef call, vectorised on AVX2/AVX-512), far below the fp32
// rounding the loss sees anyway. fp64 (gradcheck, tests) keeps the accurate one.
inline Vectorized<float> vexp(const Vectorized<float>& x) { return x.exp_u20(); }
inline Vectorized<double> vexp(const Vectorized<double>& x) { return x.exp(); }

// Stores a full vector to a 64-byte-aligned address bypassing the caches (no read-for-ownership of the line),
// for outputs written once and read by someone else much later (the gradient). Call stream_fence() after.
inline void store_streaming(const Vectorized<float>& v, float* p) {
#if defined(CPU_CAPABILITY_AVX512)
  _mm512_stream_ps(p, v);
#elif defined(CPU_CAPABILITY_AVX2)
  _mm256_stream_ps(p, v);
#else
  v.store(p);
#endif
}
inline void store_streaming(const Vectorized<double>& v, double* p) { v.store(p); }

inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// n (<= kBlock) input elements as acc_t: the input itself when it is already acc_t, else converted into buffer.
template <typename scalar_t, typename acc_t>
inline const acc_t* as_acc(const scalar_t* src, int64_t n, acc_t* buffer) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    static_assert(std::is_same_v<acc_t, float>, "reduced-precision inputs accumulate in fp32");
    using RVec = Vectorized<scalar_t>;
    constexpr int64_t step = RVec::size();  // two fp32 vectors
    int64_t i = 0;
    for (; i + step <= n; i += step) {
      auto [lo, hi] = at::vec::convert_to_float<scalar_t>(RVec::loadu(src + i));
      lo.store(buffer + i);
      hi.store(buffer + i + Vectorized<float>::size());
    }
    for (; i < n; ++i) buffer[i] = static_cast<float>(src[i]);
    return buffer;
  }
}

// n acc_t elements into dst (rounded to nearest even for bf16/fp16).
template <typename scalar_t, typename acc_t>
inline void store_from_acc(const acc_t* src, int64_t n, scalar_t* dst) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::copy(src, src + n, dst);
  } else {
    at::vec::convert(src, dst, n);
  }
}

}  // namespace mokd::native::CPU_CAPABILITY
