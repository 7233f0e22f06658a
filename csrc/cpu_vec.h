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

// 2^z for the kernels' exponentials, all of which are taken relative to a maximum or a log-sum-exp (z <= 0 up to
// rounding), with the base-2 scale folded into the affine step that forms z. Why not ATen's exp_u20: it is about
// 20 instructions (clamps, two range-reduction steps, a degree-5 polynomial, three exponent fix-ups) and at
// 20 ulp the less accurate; this one is about half of that, and the kernels run at a fraction of the memory
// bandwidth, so the instructions count (see the README for the measured effect).
// Range reduction: z = n + r, n = round(z), r in [-1/2, 1/2]; 2^r is a degree-5 polynomial with constant term 1
// fitted for relative error on that interval (weighted least squares reweighted towards minimax; 1.9e-7 relative,
// about 3 ulp, evaluated in fp32), and 2^n is applied to its exponent. Inputs below -127 give 0 (the true value
// is under 2^-126.5), NaN stays NaN; inputs above 128 are outside the contract (AVX-512 gives +inf, AVX2 not). fp64 (gradcheck, tests) keeps the accurate exp2.
inline constexpr float kExp2Poly[5] = {6.931470037e-01f, 2.402224243e-01f, 5.550733581e-02f, 9.671512991e-03f,
                                       1.326472731e-03f};
inline constexpr float kLog2e = 1.44269504088896341f;
inline constexpr float kLn2 = 0.693147180559945309f;

// 2^r for r in [-1/2, 1/2], Horner in fma.
template <typename V>
inline V exp2_poly(const V& r) {
  V p = at::vec::fmadd(r, V(kExp2Poly[4]), V(kExp2Poly[3]));
  p = at::vec::fmadd(r, p, V(kExp2Poly[2]));
  p = at::vec::fmadd(r, p, V(kExp2Poly[1]));
  p = at::vec::fmadd(r, p, V(kExp2Poly[0]));
  return at::vec::fmadd(r, p, V(1.0f));
}

inline Vectorized<float> vexp2(const Vectorized<float>& z) {
#if defined(CPU_CAPABILITY_AVX512)
  // max(-160, z) first: -inf would make r = -inf - (-inf) = NaN. scalef(p, n) = p * 2^n with IEEE under- and
  // overflow, so no exponent clamps are needed beyond that.
  const __m512 x = _mm512_max_ps(_mm512_set1_ps(-160.0f), z);  // second operand NaN: NaN is kept
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 p = exp2_poly(Vectorized<float>(_mm512_sub_ps(x, n)));
  return _mm512_scalef_ps(p, n);
#elif defined(CPU_CAPABILITY_AVX2)
  // 2^n built in the exponent field: n >= -127 after the clamp, and n = -127 gives the bit pattern of 0. No upper
  // clamp: every caller passes z <= 0 up to rounding (z above 128 would give garbage here, not +inf).
  const __m256 x = _mm256_max_ps(_mm256_set1_ps(-127.0f), z);  // second operand NaN: NaN is kept
  const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 p = exp2_poly(Vectorized<float>(_mm256_sub_ps(x, n)));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
#else
  return z.exp2();
#endif
}
inline Vectorized<double> vexp2(const Vectorized<double>& z) { return z.exp2(); }

// Lane-wise maximum without ATen's NaN propagation (which costs a compare and a blend per call): the kernels' maxima
// only pick a shift for the exponentials, and a NaN logit reaches the results through the sums anyway.
template <typename T>
inline Vectorized<T> max_of(const Vectorized<T>& a, const Vectorized<T>& b) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) return _mm512_max_ps(a, b);
  if constexpr (std::is_same_v<T, double>) return _mm512_max_pd(a, b);
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) return _mm256_max_ps(a, b);
  if constexpr (std::is_same_v<T, double>) return _mm256_max_pd(a, b);
#endif
  return at::vec::maximum(a, b);
}

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
