// Integer linears with int8 activations (W8A8-dynamic / W4A8): y = x W^T + b with W held
// as 8- or 4-bit codes (the canonical layout of wna16.cpp) and x quantized to int8 per
// token per weight group, the way llama.cpp's Q8_0/Q4_0 dot products work. Twin of
// ferry.kernels.quant_reference.wna16_linear_a8 (tests/kernels/test_cpu_quant_a8.py).
//
// Why: the float path (wna16.cpp) widens every code u8 -> i32 -> f32 before its FMA, and
// that widening, not the memory, bounds it at decode sizes. With int8 activations one
// VNNI instruction (vpdpbusd: unsigned codes x signed activations, 4 products summed into
// each int32 lane) takes 64 codes as loaded.
//
// Per token t and group g: sx = max|x_g| / 127, xq = round(x * (127 / max|x_g|)) in
// [-127, 127], xsum_g = sum xq (all computed once per call), and per output row n
//   y[n] = sum_g s_g * sx_g * (idot_g - z_g * xsum_g),   idot_g = sum_k q[n,k] xq[k]
// where the integer dot is exact. Paths: AVX512-VNNI (group sizes that are multiples of
// 64) and a portable loop (any group size) with the same integer math; `allow_simd` = 0
// forces the portable one. ferry_wna8_fits says when the VNNI path runs; callers that
// want speed use the float kernel otherwise. Up to kTokenTile tokens share each weight
// load, work is split over output rows with ferry's pool.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define FERRY_HAVE_VNNI 1
#endif

#include "dtype.h"
#include "int_linear.h"

namespace {

using ferry::store;
using ferry::int_linear::kMaxRowsPerItem;
using ferry::int_linear::kMinParallelWeights;
using ferry::int_linear::kTokenTile;
using ferry::int_linear::Problem;
using ferry::int_linear::rows_per_item;
using ferry::to_float;

constexpr int64_t kChunk = 64;   // codes per vpdpbusd
// Reading kRows rows chunk by chunk hops between rows, which the hardware prefetchers do
// not follow: from DRAM (a 32000x512 int8 head) that halved the speed. Each load asks for
// the line this far ahead, which is how far the DRAM latency needs (measured 4-16 KiB).
constexpr int64_t kPrefetchBytes = 8192;


// The activations quantized once per call: xq (rows, K) in the order the loop reads
// them, sx (rows, G) their scales and xsum (rows, G) the sums of the codes.
struct QuantizedActivations {
  std::vector<int8_t> xq;
  std::vector<float> sx;
  std::vector<int32_t> xsum;
};

// Where input i of a group lands. The VNNI int4 loop splits 32 bytes into their low
// nibbles (even k) then high nibbles (odd k): each 64-wide chunk holds its 32 even then
// its 32 odd activations.
inline int64_t position(int64_t i, bool deinterleave) {
  if (!deinterleave) return i;
  const int64_t j = i % kChunk;
  return i - j + (j % 2) * (kChunk / 2) + j / 2;
}

template <typename T>
QuantizedActivations quantize(const Problem<T>& p, bool deinterleave) {
  const int64_t groups = p.k / p.group_size, gs = p.group_size;
  QuantizedActivations a;
  a.xq.resize(p.rows * p.k);
  a.sx.resize(p.rows * groups);
  a.xsum.resize(p.rows * groups);
  std::vector<float> xf(gs);
  for (int64_t t = 0; t < p.rows; ++t) {
    for (int64_t g = 0; g < groups; ++g) {
      const T* x = p.x + t * p.x_stride + g * gs;
      float amax = 0.f;
      for (int64_t i = 0; i < gs; ++i) {
        xf[i] = to_float(x[i]);
        amax = std::max(amax, std::fabs(xf[i]));
      }
      // Scalar divisions (exact): the reference computes the same two numbers.
      const float inv = amax > 0.f ? 127.f / amax : 0.f;
      int8_t* xq = a.xq.data() + t * p.k + g * gs;
      int32_t sum = 0;
      for (int64_t i = 0; i < gs; ++i) {
        const float r = std::min(127.f, std::max(-127.f, std::nearbyint(xf[i] * inv)));
        const int code = static_cast<int>(r);
        xq[position(i, deinterleave)] = static_cast<int8_t>(code);
        sum += code;
      }
      a.sx[t * groups + g] = amax / 127.f;
      a.xsum[t * groups + g] = sum;
    }
  }
  return a;
}

// Portable: one output row for `tokens` (<= kTokenTile) tokens, natural activation order.
template <typename T, int kBits>
void row_portable(const Problem<T>& p, const QuantizedActivations& a, int64_t n, int64_t t0,
                  int tokens, float* result) {
  const int64_t groups = p.k / p.group_size, gs = p.group_size;
  const uint8_t* qrow = p.qweight + n * (kBits == 8 ? p.k : p.k / 2);
  for (int t = 0; t < tokens; ++t) result[t] = 0.f;
  for (int64_t g = 0; g < groups; ++g) {
    const float s = to_float(p.scales[n * groups + g]), z = to_float(p.zeros[n * groups + g]);
    for (int t = 0; t < tokens; ++t) {
      const int8_t* xq = a.xq.data() + (t0 + t) * p.k + g * gs;
      int32_t idot = 0;
      if constexpr (kBits == 8) {
        const uint8_t* q = qrow + g * gs;
#pragma omp simd reduction(+ : idot)
        for (int64_t i = 0; i < gs; ++i) idot += static_cast<int32_t>(q[i]) * xq[i];
      } else {
        const uint8_t* q = qrow + g * gs / 2;
#pragma omp simd reduction(+ : idot)
        for (int64_t i = 0; i < gs / 2; ++i) {
          idot += static_cast<int32_t>(q[i] & 15) * xq[2 * i] +
                  static_cast<int32_t>(q[i] >> 4) * xq[2 * i + 1];
        }
      }
      const int64_t tg = (t0 + t) * groups + g;
      result[t] += s * a.sx[tg] * (static_cast<float>(idot) - z * static_cast<float>(a.xsum[tg]));
    }
  }
}

#if defined(FERRY_HAVE_VNNI)
// 64 codes of a row at k = kk as bytes in the order the activations were laid out.
template <int kBits>
inline __m512i load_codes(const uint8_t* qrow, int64_t kk) {
  if constexpr (kBits == 8) {
    return _mm512_loadu_si512(qrow + kk);
  } else {   // 32 bytes = 64 codes: low nibbles (even k), then high nibbles (odd k)
    const __m256i low_mask = _mm256_set1_epi8(15);
    const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qrow + kk / 2));
    const __m256i low = _mm256_and_si256(bytes, low_mask);
    const __m256i high = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low_mask);
    return _mm512_inserti64x4(_mm512_castsi256_si512(low), high, 1);
  }
}

// VNNI: group_size % 64 == 0. kRows output rows x kTokens tokens at once (independent
// chains; each activation load serves kRows rows, each code load kTokens tokens; 10-20%
// faster than one row at a time on cache-resident weights). One
// int32 accumulator per (row, token) per group (exact), turned to float and scaled once
// per group; the lanes are summed once per row.
template <typename T, int kBits, int kTokens, int kRows>
void rows_vnni(const Problem<T>& p, const QuantizedActivations& a, int64_t n, int64_t t0,
               float (*result)[kTokenTile]) {
  const int64_t groups = p.k / p.group_size, gs = p.group_size;
  const int64_t row_bytes = kBits == 8 ? p.k : p.k / 2;
  const uint8_t* qrow = p.qweight + n * row_bytes;
  const int8_t* xq = a.xq.data() + t0 * p.k;
  __m512 total[kRows][kTokens];
  float zero_part[kRows][kTokens];
  for (int r = 0; r < kRows; ++r) {
    for (int t = 0; t < kTokens; ++t) {
      total[r][t] = _mm512_setzero_ps();
      zero_part[r][t] = 0.f;
    }
  }
  for (int64_t g = 0; g < groups; ++g) {
    __m512i acc[kRows][kTokens];
    for (int r = 0; r < kRows; ++r) {
      for (int t = 0; t < kTokens; ++t) acc[r][t] = _mm512_setzero_si512();
    }
    for (int64_t kk = g * gs; kk < (g + 1) * gs; kk += kChunk) {
      __m512i x[kTokens];
      for (int t = 0; t < kTokens; ++t) x[t] = _mm512_loadu_si512(xq + t * p.k + kk);
      for (int r = 0; r < kRows; ++r) {
        const uint8_t* codes = qrow + r * row_bytes + (kBits == 8 ? kk : kk / 2);
        _mm_prefetch(reinterpret_cast<const char*>(codes + kPrefetchBytes), _MM_HINT_T0);
        const __m512i w = load_codes<kBits>(qrow + r * row_bytes, kk);
        for (int t = 0; t < kTokens; ++t) acc[r][t] = _mm512_dpbusd_epi32(acc[r][t], w, x[t]);
      }
    }
    for (int r = 0; r < kRows; ++r) {
      const int64_t ng = (n + r) * groups + g;
      const float s = to_float(p.scales[ng]), z = to_float(p.zeros[ng]);
      for (int t = 0; t < kTokens; ++t) {
        const int64_t tg = (t0 + t) * groups + g;
        const float scale = s * a.sx[tg];
        total[r][t] = _mm512_fmadd_ps(_mm512_set1_ps(scale), _mm512_cvtepi32_ps(acc[r][t]),
                                      total[r][t]);
        zero_part[r][t] += scale * z * static_cast<float>(a.xsum[tg]);
      }
    }
  }
  for (int r = 0; r < kRows; ++r) {
    for (int t = 0; t < kTokens; ++t) {
      result[r][t] = _mm512_reduce_add_ps(total[r][t]) - zero_part[r][t];
    }
  }
}

// Rows taken at once per token count: accumulators and chains enough to hide vpdpbusd's
// latency within the 32 vector registers.
template <int kTokens>
constexpr int kRowsFor = kTokens == 1 ? 4 : (kTokens == 2 ? 2 : 1);

// `rows` (<= kRowsFor<tokens>) output rows from n for `tokens` tokens.
template <typename T, int kBits, int kTokens>
inline void rows_simd_tokens(const Problem<T>& p, const QuantizedActivations& a, int64_t n,
                             int64_t t0, int rows, float (*result)[kTokenTile]) {
  constexpr int kRows = kRowsFor<kTokens>;
  if (rows == kRows) {
    rows_vnni<T, kBits, kTokens, kRows>(p, a, n, t0, result);
    return;
  }
  for (int r = 0; r < rows; ++r) rows_vnni<T, kBits, kTokens, 1>(p, a, n + r, t0, result + r);
}

template <typename T, int kBits>
inline int rows_at_once(int tokens) {
  return tokens == 1 ? kRowsFor<1> : (tokens == 2 ? kRowsFor<2> : 1);
}

template <typename T, int kBits>
inline void rows_simd(const Problem<T>& p, const QuantizedActivations& a, int64_t n, int64_t t0,
                      int tokens, int rows, float (*result)[kTokenTile]) {
  switch (tokens) {
    case 1: rows_simd_tokens<T, kBits, 1>(p, a, n, t0, rows, result); break;
    case 2: rows_simd_tokens<T, kBits, 2>(p, a, n, t0, rows, result); break;
    case 3: rows_simd_tokens<T, kBits, 3>(p, a, n, t0, rows, result); break;
    default: rows_simd_tokens<T, kBits, 4>(p, a, n, t0, rows, result); break;
  }
}
constexpr bool kHaveVnni = true;
#else
template <typename T, int kBits>
inline int rows_at_once(int) { return 1; }

template <typename T, int kBits>
inline void rows_simd(const Problem<T>& p, const QuantizedActivations& a, int64_t n, int64_t t0,
                      int tokens, int rows, float (*result)[kTokenTile]) {
  for (int r = 0; r < rows; ++r) row_portable<T, kBits>(p, a, n + r, t0, tokens, result[r]);
}
constexpr bool kHaveVnni = false;
#endif

template <typename T, int kBits>
void gemm(const Problem<T>& p, bool simd, int num_threads) {
  const QuantizedActivations a = quantize(p, simd && kBits == 4);
  const int64_t per_item = rows_per_item(p.n, num_threads);
  const int64_t items = (p.n + per_item - 1) / per_item;
  const bool parallel = p.n * p.k * std::max<int64_t>(p.rows, 1) >= kMinParallelWeights;
  ferry::parallel_for_dynamic(items, parallel, num_threads, [&](int64_t item) {
    float result[kMaxRowsPerItem][kTokenTile];
    const int64_t n_begin = item * per_item, n_end = std::min(p.n, n_begin + per_item);
    for (int64_t t0 = 0; t0 < p.rows; t0 += kTokenTile) {
      const int tokens = static_cast<int>(std::min<int64_t>(kTokenTile, p.rows - t0));
      const int step = simd ? rows_at_once<T, kBits>(tokens) : 1;
      for (int64_t n = n_begin; n < n_end; n += step) {
        const int rows = static_cast<int>(std::min<int64_t>(step, n_end - n));
        if (simd) {
          rows_simd<T, kBits>(p, a, n, t0, tokens, rows, result + (n - n_begin));
        } else {
          row_portable<T, kBits>(p, a, n, t0, tokens, result[n - n_begin]);
        }
      }
      for (int64_t n = n_begin; n < n_end; ++n) {
        const float b = p.bias ? to_float(p.bias[n]) : 0.f;
        for (int t = 0; t < tokens; ++t) {
          store(result[n - n_begin][t] + b, p.out + (t0 + t) * p.n + n);
        }
      }
    }
  });
}

bool fits_vnni(int64_t group_size) { return kHaveVnni && group_size > 0 && group_size % kChunk == 0; }

}  // namespace

extern "C" {

// Same arguments as ferry_wna16_gemm. Returns 0 on success, 1 for a bad shape.
int ferry_wna8_gemm(int dtype, const void* x, int64_t x_stride, int64_t rows, int64_t k, int64_t n,
                    const uint8_t* qweight, const void* scales, const void* zeros, int bits,
                    int64_t group_size, const void* bias, void* out, int allow_simd,
                    int num_threads) {
  if (!ferry::int_linear::valid_shape(bits, k, group_size) || rows < 0 || n < 0) return 1;
  const bool simd = allow_simd && fits_vnni(group_size);
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

// 1 when ferry_wna8_gemm runs its VNNI path for this group size (else it is the portable
// loop, slower than the float kernel: the callers pick wna16 then).
int ferry_wna8_fits(int64_t group_size) { return fits_vnni(group_size) ? 1 : 0; }

}  // extern "C"
