// y = x W^T + b for the rows (up to 128) of a decode step or a short prefill, float32, with W stored column-major
// (the (K, N) contiguous transpose ferry keeps for every CPU matmul weight). Twin of
// F.linear(x, W, b) (checked in tests/kernels/test_cpu_gemv.py).
//
// At a few rows the multiply is free and the weight read is the cost: a decode step of a
// float32 model reads every weight once, so its floor is weight bytes / read bandwidth.
// From ~16 rows the multiply counts too; groups of 4 rows reuse each weight tile from L2
// and keep the FMA units busy. Against MKL on 2 shared cores (benchmarks/cpu_kernels.py
// --gemv): 1.4x at 1 row, 2-2.5x at 2-64 rows, 1.1x at 128, equal at 256-512 (where
// MKL stays in charge).
// MKL's sgemv reached ~20 GB/s here where a plain read of the same bytes runs at ~60, and
// it opens an OpenMP region (with its barrier) per call. This kernel streams each column
// tile of W once with software prefetch, keeps the tile's accumulators for every row in
// registers, and splits the tiles over ferry's pool (thread_pool.h), which never waits for
// a thread that the scheduler has not run.
//
// A row-major weight (the LM head) has its own entry point, ferry_f32_gemv_row_major.
//
// AVX-512 only; both return 4 (and the caller uses F.linear) without it.
#include <algorithm>
#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "dtype.h"

namespace {

// Rows in registers at once; more rows run as groups of 4 over the same column tile,
// whose weights the first group brought into L2.
constexpr int kRowGroup = 4;
constexpr int kMaxRows = 128;

struct Problem {
  const float* x;     // (rows, k), row stride x_stride
  int64_t x_stride, rows, k, n;
  const float* w;     // (k, n) contiguous: w[i * n + j] is W[j, i]
  const float* bias;  // (n) or null
  float* out;         // (rows, n) contiguous
};

#if defined(__AVX512F__)
// Rows prefetched ahead of the one being read: enough to cover DRAM latency at the speed
// one row of a tile is consumed (a few nanoseconds).
constexpr int64_t kPrefetchRows = 24;

// Columns [c0, c0 + 16 * kVecs) of rows [r0, r0 + kRows) of the output. kMasked: the
// last tile, whose columns past n are masked off (a separate instantiation, so the full
// tiles keep every accumulator in a register).
template <int kRows, int kVecs, bool kMasked>
void tile(const Problem& p, int64_t c0, int64_t r0) {
  __mmask16 mask[kVecs];
  for (int v = 0; v < kVecs; ++v) {
    const int64_t left = kMasked ? std::clamp<int64_t>(p.n - c0 - 16 * v, 0, 16) : 16;
    mask[v] = static_cast<__mmask16>((1u << left) - 1u);
  }
  __m512 acc[kRows][kVecs];
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 8
    for (int v = 0; v < kVecs; ++v) acc[r][v] = _mm512_setzero_ps();
  }
  const float* x = p.x + r0 * p.x_stride;
  const float* row = p.w + c0;
  for (int64_t i = 0; i < p.k; ++i, row += p.n) {
    if (i + kPrefetchRows < p.k) {
      const char* ahead = reinterpret_cast<const char*>(row + kPrefetchRows * p.n);
#pragma GCC unroll 8
      for (int v = 0; v < kVecs; ++v) _mm_prefetch(ahead + 64 * v, _MM_HINT_T0);
    }
    __m512 w[kVecs];
#pragma GCC unroll 8
    for (int v = 0; v < kVecs; ++v) {
      w[v] = kMasked ? _mm512_maskz_loadu_ps(mask[v], row + 16 * v) : _mm512_loadu_ps(row + 16 * v);
    }
#pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r) {
      const __m512 xr = _mm512_set1_ps(x[r * p.x_stride + i]);
#pragma GCC unroll 8
      for (int v = 0; v < kVecs; ++v) acc[r][v] = _mm512_fmadd_ps(w[v], xr, acc[r][v]);
    }
  }
  for (int v = 0; v < kVecs; ++v) {
    const __m512 b = p.bias ? _mm512_maskz_loadu_ps(mask[v], p.bias + c0 + 16 * v)
                            : _mm512_setzero_ps();
    for (int r = 0; r < kRows; ++r) {
      _mm512_mask_storeu_ps(p.out + (r0 + r) * p.n + c0 + 16 * v, mask[v],
                            _mm512_add_ps(acc[r][v], b));
    }
  }
}

template <int kRows, int kVecs>
void tile(const Problem& p, int64_t c0, int64_t r0) {
  if (c0 + 16 * kVecs <= p.n) {
    tile<kRows, kVecs, false>(p, c0, r0);
  } else {
    tile<kRows, kVecs, true>(p, c0, r0);
  }
}

template <int kVecs>
void row_group(const Problem& p, int64_t c0, int64_t r0) {
  switch (std::min<int64_t>(kRowGroup, p.rows - r0)) {
    case 1: tile<1, kVecs>(p, c0, r0); break;
    case 2: tile<2, kVecs>(p, c0, r0); break;
    case 3: tile<3, kVecs>(p, c0, r0); break;
    default: tile<4, kVecs>(p, c0, r0); break;
  }
}

// Tiles of 128 columns for one or two rows (512 contiguous bytes a weight row), of 64
// from three rows up (the accumulators of four rows fill the registers).
template <int kVecs>
void gemv(const Problem& p, int num_threads) {
  constexpr int64_t kWidth = 16 * kVecs;
  const int64_t tiles = (p.n + kWidth - 1) / kWidth;
  ferry::parallel_for(tiles, p.n * p.k >= (1 << 14), num_threads, [&](int64_t t) {
    for (int64_t r0 = 0; r0 < p.rows; r0 += kRowGroup) row_group<kVecs>(p, t * kWidth, r0);
  });
}

// Row-major W (n, k), as the LM head keeps it (it shares the embedding's row order): each
// output is a dot product over a contiguous weight row, for up to kRowGroup input rows per
// weight load. Blocks of kOutputsPerItem outputs are the pool's items.
constexpr int64_t kOutputsPerItem = 32;

template <int kRows>
void dot_rows(const Problem& p, int64_t j, int64_t r0) {
  const float* w = p.w + j * p.k;
  __m512 acc[kRows];
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r) acc[r] = _mm512_setzero_ps();
  const float* x = p.x + r0 * p.x_stride;
  int64_t i = 0;
  for (; i + 16 <= p.k; i += 16) {
    const __m512 wv = _mm512_loadu_ps(w + i);
#pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r) {
      acc[r] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + r * p.x_stride + i), acc[r]);
    }
  }
  const __mmask16 tail = static_cast<__mmask16>((1u << (p.k - i)) - 1u);
  const __m512 wv = _mm512_maskz_loadu_ps(tail, w + i);
  const float b = p.bias ? p.bias[j] : 0.f;
  for (int r = 0; r < kRows; ++r) {
    acc[r] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(tail, x + r * p.x_stride + i), acc[r]);
    p.out[(r0 + r) * p.n + j] = _mm512_reduce_add_ps(acc[r]) + b;
  }
}

void gemv_row_major(const Problem& p, int num_threads) {
  const int64_t items = (p.n + kOutputsPerItem - 1) / kOutputsPerItem;
  ferry::parallel_for(items, p.n * p.k >= (1 << 14), num_threads, [&](int64_t item) {
    const int64_t end = std::min(p.n, (item + 1) * kOutputsPerItem);
    for (int64_t r0 = 0; r0 < p.rows; r0 += kRowGroup) {
      const int64_t group = std::min<int64_t>(kRowGroup, p.rows - r0);
      for (int64_t j = item * kOutputsPerItem; j < end; ++j) {
        switch (group) {
          case 1: dot_rows<1>(p, j, r0); break;
          case 2: dot_rows<2>(p, j, r0); break;
          case 3: dot_rows<3>(p, j, r0); break;
          default: dot_rows<4>(p, j, r0); break;
        }
      }
    }
  });
}
constexpr bool kHaveSimd = true;
#else
void gemv_row_major(const Problem&, int) {}
template <int kVecs>
void gemv(const Problem&, int) {}
constexpr bool kHaveSimd = false;
#endif

}  // namespace

extern "C" {

// x (rows, k) float32 with row stride x_stride; w (k, n) contiguous float32; bias (n) or
// null; out (rows, n). Returns 0 on success, 1 on bad sizes, 4 without AVX-512.
int ferry_f32_gemv(const float* x, int64_t x_stride, int64_t rows, int64_t k, int64_t n,
                   const float* w, const float* bias, float* out, int num_threads) {
  if (!kHaveSimd) return 4;
  if (rows < 1 || rows > kMaxRows || k <= 0 || n <= 0) return 1;
  const Problem p{x, x_stride, rows, k, n, w, bias, out};
  const int threads = std::max(1, num_threads);
  if (rows <= 2) {
    gemv<8>(p, threads);
  } else {
    gemv<4>(p, threads);
  }
  return 0;
}

// The same with w (n, k) contiguous (a row-major weight).
int ferry_f32_gemv_row_major(const float* x, int64_t x_stride, int64_t rows, int64_t k,
                             int64_t n, const float* w, const float* bias, float* out,
                             int num_threads) {
  if (!kHaveSimd) return 4;
  if (rows < 1 || rows > kMaxRows || k <= 0 || n <= 0) return 1;
  gemv_row_major(Problem{x, x_stride, rows, k, n, w, bias, out}, std::max(1, num_threads));
  return 0;
}

int ferry_f32_gemv_max_rows() { return kHaveSimd ? kMaxRows : 0; }

}  // extern "C"
