// y = x W^T + b with W stored in bfloat16 and x in float32 or bfloat16: half the weight
// bytes of a float32 matmul at float32 accuracy of the products (each bf16 weight widens
// exactly to float32; accumulation in float32). Used for a 16-bit LM head beside
// quantized linears, where the head is most of a decode step's weight reads. Twin of
// F.linear(x.float(), W.float()) (checked in tests/kernels/test_cpu_quant_linear.py).
//
// AVX-512 path for K % 32 == 0, portable loop otherwise (or with allow_simd = 0); OpenMP
// over output rows, up to kTokenTile tokens per weight load.
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "dtype.h"

namespace {

using ferry::Bf16;
using ferry::to_float;

constexpr int kTokenTile = 4;
constexpr int64_t kRowsPerItem = 32;

struct Problem {
  const float* x;   // (rows, K) float32 (converted once)
  int64_t rows, k, n;
  const Bf16* w;    // (N, K)
};

template <int kTokens>
void row_portable(const Problem& p, int64_t n, int64_t t0, float* result) {
  const Bf16* w = p.w + n * p.k;
  for (int t = 0; t < kTokens; ++t) {
    const float* x = p.x + (t0 + t) * p.k;
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < p.k; ++i) acc += to_float(w[i]) * x[i];
    result[t] = acc;
  }
}

#if defined(__AVX512F__)
inline __m512 widen(const Bf16* w) {   // 16 bf16 -> 16 float32 (exact)
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

template <int kTokens>
void row_avx512(const Problem& p, int64_t n, int64_t t0, float* result) {
  const Bf16* w = p.w + n * p.k;
  __m512 acc0[kTokens], acc1[kTokens];
  for (int t = 0; t < kTokens; ++t) acc0[t] = acc1[t] = _mm512_setzero_ps();
  for (int64_t i = 0; i < p.k; i += 32) {
    const __m512 w0 = widen(w + i), w1 = widen(w + i + 16);
    for (int t = 0; t < kTokens; ++t) {
      const float* x = p.x + (t0 + t) * p.k + i;
      acc0[t] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x), acc0[t]);
      acc1[t] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + 16), acc1[t]);
    }
  }
  for (int t = 0; t < kTokens; ++t) result[t] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[t], acc1[t]));
}
constexpr bool kHaveSimd = true;
#else
template <int kTokens>
void row_avx512(const Problem& p, int64_t n, int64_t t0, float* result) {
  row_portable<kTokens>(p, n, t0, result);
}
constexpr bool kHaveSimd = false;
#endif

template <int kTokens>
inline void row(const Problem& p, bool simd, int64_t n, int64_t t0, float* result) {
  if (simd) {
    row_avx512<kTokens>(p, n, t0, result);
  } else {
    row_portable<kTokens>(p, n, t0, result);
  }
}

template <typename T>
void gemm(const T* x_in, int64_t x_stride, const Problem& shape, const Bf16* bias, bool simd,
          T* out, int num_threads) {
  std::vector<float> xf(shape.rows * shape.k);
  for (int64_t t = 0; t < shape.rows; ++t) {
    for (int64_t i = 0; i < shape.k; ++i) xf[t * shape.k + i] = to_float(x_in[t * x_stride + i]);
  }
  Problem p = shape;
  p.x = xf.data();
  const int64_t items = (p.n + kRowsPerItem - 1) / kRowsPerItem;
  ferry::parallel_for_dynamic(items, p.n * p.k >= (1 << 15), num_threads, [&](int64_t item) {
    float result[kTokenTile];
    const int64_t n_end = std::min(p.n, (item + 1) * kRowsPerItem);
    for (int64_t t0 = 0; t0 < p.rows; t0 += kTokenTile) {
      const int tokens = static_cast<int>(std::min<int64_t>(kTokenTile, p.rows - t0));
      for (int64_t n = item * kRowsPerItem; n < n_end; ++n) {
        switch (tokens) {
          case 1: row<1>(p, simd, n, t0, result); break;
          case 2: row<2>(p, simd, n, t0, result); break;
          case 3: row<3>(p, simd, n, t0, result); break;
          default: row<4>(p, simd, n, t0, result); break;
        }
        const float b = bias ? to_float(bias[n]) : 0.f;
        for (int t = 0; t < tokens; ++t) ferry::store(result[t] + b, out + (t0 + t) * p.n + n);
      }
    }
  });
}

}  // namespace

extern "C" {

// x and out: ferry::DType `dtype`; w and bias: bfloat16. Returns 0 on success.
int ferry_bf16_gemm(int dtype, const void* x, int64_t x_stride, int64_t rows, int64_t k, int64_t n,
                    const void* w, const void* bias, void* out, int allow_simd, int num_threads) {
  if (rows < 0 || k <= 0 || n < 0) return 1;
  const bool simd = kHaveSimd && allow_simd && k % 32 == 0;
  const Problem shape{nullptr, rows, k, n, static_cast<const Bf16*>(w)};
  const Bf16* b = static_cast<const Bf16*>(bias);
  bool ok = ferry::dispatch(dtype, [&](auto zero) {
    using T = decltype(zero);
    gemm<T>(static_cast<const T*>(x), x_stride, shape, b, simd, static_cast<T*>(out),
            std::max(1, num_threads));
  });
  return ok ? 0 : 3;
}

}  // extern "C"
