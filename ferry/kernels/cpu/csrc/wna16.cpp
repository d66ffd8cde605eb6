// Weight-only integer linears on the CPU: y = x W^T + b with W held as 8- or 4-bit codes
// and dequantized inside the kernel. Twin of ferry.kernels.quant_reference.wna16_linear
// (same canonical layout; checked against it in tests/kernels/test_cpu_quant_linear.py).
//
// A decode step reads every weight once per token batch, so it is bandwidth-bound: the
// point is to stream 1 (int8) or 0.5 (int4) bytes per weight instead of 4 (float32).
// Per output row n and group g the kernel accumulates dot_g = sum_k q[n,k] x[k] over the
// raw codes and finishes with  y[n] = sum_g scale_g * dot_g - sum_g scale_g zero_g xsum_g,
// where xsum_g = sum of x over the group is computed once per call: the inner loop is a
// plain code-times-activation FMA, and the zero point costs one multiply per group.
//
// Paths: AVX-512 (16 codes per instruction, group sizes that are multiples of 32) and a
// portable loop (any group size, any CPU) beside it; `allow_simd` = 0 forces the portable
// one (the tests run both). Work is split over output rows with OpenMP; up to kTokenTile
// tokens share each weight load (a batch of decodes streams the weights once).
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "dtype.h"
#include "int_linear.h"

namespace {

using ferry::store;
using ferry::int_linear::kMinParallelWeights;
using ferry::int_linear::kTokenTile;
using ferry::int_linear::Problem;
using ferry::int_linear::rows_per_item;
using ferry::to_float;

// The activations as float32, prepared once per call: xf (rows, K) in the order the
// inner loop reads them, and xsum (rows, G) the per-group sums (natural order).
struct Activations {
  std::vector<float> xf, xsum;
};

// For the AVX-512 int4 loop: each 32-wide chunk of k holds its 16 even then 16 odd
// entries, so that the low and high nibbles of 16 bytes meet their activations in order.
template <typename T>
Activations prepare(const Problem<T>& p, bool deinterleave) {
  const int64_t groups = p.k / p.group_size;
  Activations a;
  a.xf.resize(p.rows * p.k);
  a.xsum.assign(p.rows * groups, 0.f);
  for (int64_t t = 0; t < p.rows; ++t) {
    const T* x = p.x + t * p.x_stride;
    float* xf = a.xf.data() + t * p.k;
    for (int64_t i = 0; i < p.k; ++i) {
      const float v = to_float(x[i]);
      a.xsum[t * groups + i / p.group_size] += v;
      const int64_t j = i % 32;
      xf[deinterleave ? i - j + (j % 2) * 16 + j / 2 : i] = v;
    }
  }
  return a;
}

// Portable: dot products of one row's codes in [k0, k0 + len) with `tokens` activations.
template <int kBits>
inline void dot_group(const uint8_t* qrow, const float* xf, int64_t k_stride, int64_t k0,
                      int64_t len, int tokens, float* dots) {
  for (int t = 0; t < tokens; ++t) {
    const float* x = xf + t * k_stride + k0;
    float acc = 0.f;
    if constexpr (kBits == 8) {
      const uint8_t* q = qrow + k0;
#pragma omp simd reduction(+ : acc)
      for (int64_t i = 0; i < len; ++i) acc += static_cast<float>(q[i]) * x[i];
    } else {
      const uint8_t* q = qrow + k0 / 2;
#pragma omp simd reduction(+ : acc)
      for (int64_t i = 0; i < len / 2; ++i) {
        acc += static_cast<float>(q[i] & 15) * x[2 * i] + static_cast<float>(q[i] >> 4) * x[2 * i + 1];
      }
    }
    dots[t] = acc;
  }
}

// One output row for `tokens` (<= kTokenTile) tokens, portable path.
template <typename T, int kBits>
void row_portable(const Problem<T>& p, const Activations& a, int64_t n, int64_t t0, int tokens,
                  float* result) {
  const int64_t groups = p.k / p.group_size;
  const uint8_t* qrow = p.qweight + n * (kBits == 8 ? p.k : p.k / 2);
  float dots[kTokenTile];
  for (int t = 0; t < tokens; ++t) result[t] = 0.f;
  for (int64_t g = 0; g < groups; ++g) {
    dot_group<kBits>(qrow, a.xf.data() + t0 * p.k, p.k, g * p.group_size, p.group_size, tokens, dots);
    const float s = to_float(p.scales[n * groups + g]), z = to_float(p.zeros[n * groups + g]);
    for (int t = 0; t < tokens; ++t) result[t] += s * (dots[t] - z * a.xsum[(t0 + t) * groups + g]);
  }
}

#if defined(__AVX512F__)
// AVX-512: group_size % 32 == 0. kTokens accumulators (one per token) of 16 lanes each;
// the scale is applied per group as a vector FMA and the lanes are summed once per row.
template <typename T, int kBits, int kTokens>
void row_avx512(const Problem<T>& p, const Activations& a, int64_t n, int64_t t0, float* result) {
  const int64_t groups = p.k / p.group_size, gs = p.group_size;
  const uint8_t* qrow = p.qweight + n * (kBits == 8 ? p.k : p.k / 2);
  const float* xf = a.xf.data() + t0 * p.k;
  __m512 total[kTokens];
  float zero_part[kTokens];
  for (int t = 0; t < kTokens; ++t) {
    total[t] = _mm512_setzero_ps();
    zero_part[t] = 0.f;
  }
  const __m512i low_mask = _mm512_set1_epi32(15);
  for (int64_t g = 0; g < groups; ++g) {
    __m512 acc0[kTokens], acc1[kTokens];   // two chains per token hide the FMA latency
    for (int t = 0; t < kTokens; ++t) acc0[t] = acc1[t] = _mm512_setzero_ps();
    for (int64_t kk = g * gs; kk < (g + 1) * gs; kk += 32) {
      __m512 w0, w1;
      if constexpr (kBits == 8) {
        const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qrow + kk));
        w0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(bytes)));
        w1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(bytes, 1)));
      } else {   // 16 bytes = 32 codes: low nibbles are the even k, high the odd
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qrow + kk / 2)));
        w0 = _mm512_cvtepi32_ps(_mm512_and_si512(v, low_mask));
        w1 = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
      }
      for (int t = 0; t < kTokens; ++t) {
        const float* x = xf + t * p.k + kk;
        acc0[t] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x), acc0[t]);
        acc1[t] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + 16), acc1[t]);
      }
    }
    const float s = to_float(p.scales[n * groups + g]), z = to_float(p.zeros[n * groups + g]);
    const __m512 scale = _mm512_set1_ps(s);
    for (int t = 0; t < kTokens; ++t) {
      total[t] = _mm512_fmadd_ps(scale, _mm512_add_ps(acc0[t], acc1[t]), total[t]);
      zero_part[t] += s * z * a.xsum[(t0 + t) * groups + g];
    }
  }
  for (int t = 0; t < kTokens; ++t) result[t] = _mm512_reduce_add_ps(total[t]) - zero_part[t];
}

template <typename T, int kBits>
inline void row_simd(const Problem<T>& p, const Activations& a, int64_t n, int64_t t0, int tokens,
                     float* result) {
  switch (tokens) {
    case 1: row_avx512<T, kBits, 1>(p, a, n, t0, result); break;
    case 2: row_avx512<T, kBits, 2>(p, a, n, t0, result); break;
    case 3: row_avx512<T, kBits, 3>(p, a, n, t0, result); break;
    default: row_avx512<T, kBits, 4>(p, a, n, t0, result); break;
  }
}
constexpr bool kHaveSimd = true;
#else
template <typename T, int kBits>
inline void row_simd(const Problem<T>& p, const Activations& a, int64_t n, int64_t t0, int tokens,
                     float* result) {
  row_portable<T, kBits>(p, a, n, t0, tokens, result);
}
constexpr bool kHaveSimd = false;
#endif

template <typename T, int kBits>
void gemm(const Problem<T>& p, bool simd, int num_threads) {
  const Activations a = prepare(p, simd && kBits == 4);
  const int64_t per_item = rows_per_item(p.n, num_threads);
  const int64_t items = (p.n + per_item - 1) / per_item;
  const bool parallel = p.n * p.k * std::max<int64_t>(p.rows, 1) >= kMinParallelWeights;
  ferry::parallel_for_dynamic(items, parallel, num_threads, [&](int64_t item) {
    float result[kTokenTile];
    const int64_t n_end = std::min(p.n, (item + 1) * per_item);
    for (int64_t t0 = 0; t0 < p.rows; t0 += kTokenTile) {
      const int tokens = static_cast<int>(std::min<int64_t>(kTokenTile, p.rows - t0));
      for (int64_t n = item * per_item; n < n_end; ++n) {
        if (simd) {
          row_simd<T, kBits>(p, a, n, t0, tokens, result);
        } else {
          row_portable<T, kBits>(p, a, n, t0, tokens, result);
        }
        const float b = p.bias ? to_float(p.bias[n]) : 0.f;
        for (int t = 0; t < tokens; ++t) store(result[t] + b, p.out + (t0 + t) * p.n + n);
      }
    }
  });
}

// The (N, K) weight, dequantized into out (for prefills, where a float GEMM is faster).
template <typename T>
void dequantize(const uint8_t* qweight, const T* scales, const T* zeros, int bits, int64_t n,
                int64_t k, int64_t group_size, T* out, int num_threads) {
  const int64_t groups = k / group_size;
  ferry::parallel_for(n, n * k >= kMinParallelWeights, num_threads, [&](int64_t row) {
    const uint8_t* q = qweight + row * (bits == 8 ? k : k / 2);
    for (int64_t i = 0; i < k; ++i) {
      const int code = bits == 8 ? q[i] : (i % 2 ? q[i / 2] >> 4 : q[i / 2] & 15);
      const int64_t g = row * groups + i / group_size;
      // the reference's roundings: (q - zero) then * scale, each in T
      const float shifted = ferry::round_to<T>(static_cast<float>(code) - to_float(zeros[g]));
      store(shifted * to_float(scales[g]), out + row * k + i);
    }
  });
}


}  // namespace

extern "C" {

// dtype: ferry::DType of x, scales, zeros, bias and out. Returns 0 on success.
int ferry_wna16_gemm(int dtype, const void* x, int64_t x_stride, int64_t rows, int64_t k, int64_t n,
                     const uint8_t* qweight, const void* scales, const void* zeros, int bits,
                     int64_t group_size, const void* bias, void* out, int allow_simd,
                     int num_threads) {
  if (!ferry::int_linear::valid_shape(bits, k, group_size) || rows < 0 || n < 0) return 1;
  const bool simd = kHaveSimd && allow_simd && group_size % 32 == 0;
  bool ok = ferry::dispatch(dtype, [&](auto zero) {
    using T = decltype(zero);
    const Problem<T> p{static_cast<const T*>(x), x_stride, rows, k, n, qweight,
                       static_cast<const T*>(scales), static_cast<const T*>(zeros), bits,
                       group_size, static_cast<const T*>(bias), static_cast<T*>(out)};
    if (bits == 8) {
      gemm<T, 8>(p, simd, std::max(1, num_threads));
    } else {
      gemm<T, 4>(p, simd, std::max(1, num_threads));
    }
  });
  return ok ? 0 : 3;
}

int ferry_wna16_dequantize(int dtype, const uint8_t* qweight, const void* scales,
                           const void* zeros, int bits, int64_t n, int64_t k, int64_t group_size,
                           void* out, int num_threads) {
  if (!ferry::int_linear::valid_shape(bits, k, group_size) || n < 0) return 1;
  bool ok = ferry::dispatch(dtype, [&](auto zero) {
    using T = decltype(zero);
    dequantize<T>(qweight, static_cast<const T*>(scales), static_cast<const T*>(zeros), bits, n,
                  k, group_size, static_cast<T*>(out), std::max(1, num_threads));
  });
  return ok ? 0 : 3;
}

int ferry_wna16_has_simd() { return kHaveSimd ? 1 : 0; }

}  // extern "C"
