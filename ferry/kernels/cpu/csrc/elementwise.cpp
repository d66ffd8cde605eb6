// Row-wise CPU kernels: RMSNorm (with the residual add), rotary embedding, SiLU-and-mul,
// and the KV-cache write. Twins of the functions of the same names in
// ferry/kernels/reference.py. Each is one pass over its rows, where the reference makes
// several PyTorch calls (and temporaries) per op; on the small batches of a decode step
// those calls' fixed costs are most of the time.
//
// Row arguments are (rows, width) with the width contiguous and a row stride in elements,
// so views into a fused projection (q, k, v of qkv) need no copy. Small problems run on
// the calling thread: a parallel region costs more than a few hundred rows of work.
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "dtype.h"

namespace {

using ferry::round_to;
using ferry::store;
using ferry::to_float;

using ferry::parallel_for;

// Below this many elements a parallel region costs more than it saves.
constexpr int64_t kMinParallelElements = 1 << 16;

// out = round(weight * round(x * rsqrt(mean(x^2) + eps))), the reference's roundings.
template <typename T>
void rms_norm_row(const T* x, const T* weight, float eps, int64_t width, T* out) {
  float sum_sq = 0.f;
#pragma omp simd reduction(+ : sum_sq)
  for (int64_t i = 0; i < width; ++i) sum_sq += to_float(x[i]) * to_float(x[i]);
  const float inv_rms = 1.f / std::sqrt(sum_sq / width + eps);
  for (int64_t i = 0; i < width; ++i) {
    store(to_float(weight[i]) * round_to<T>(to_float(x[i]) * inv_rms), out + i);
  }
}

template <typename T>
void rms_norm(const T* x, int64_t x_stride, const T* weight, float eps, int64_t rows,
              int64_t width, T* out, int num_threads) {
  parallel_for(rows, rows * width >= kMinParallelElements, num_threads, [&](int64_t r) {
    rms_norm_row(x + r * x_stride, weight, eps, width, out + r * width);
  });
}

// summed = x + residual; normed = rms_norm(summed). Both outputs are (rows, width).
template <typename T>
void fused_add_rms_norm(const T* x, int64_t x_stride, const T* residual, int64_t residual_stride,
                        const T* weight, float eps, int64_t rows, int64_t width, T* normed,
                        T* summed, int num_threads) {
  parallel_for(rows, rows * width >= kMinParallelElements, num_threads, [&](int64_t r) {
    const T* xr = x + r * x_stride;
    const T* rr = residual + r * residual_stride;
    T* sr = summed + r * width;
    for (int64_t i = 0; i < width; ++i) store(to_float(xr[i]) + to_float(rr[i]), sr + i);
    rms_norm_row(sr, weight, eps, width, normed + r * width);
  });
}

// Neox-style rotation of one head: halves (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin).
template <typename T>
inline void rotate_head(const T* x, const float* cos, const float* sin, int64_t half, T* out) {
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = to_float(x[i]), x2 = to_float(x[i + half]);
    const float c = round_to<T>(cos[i]), s = round_to<T>(sin[i]);
    store(x1 * c - x2 * s, out + i);
    store(x2 * c + x1 * s, out + i + half);
  }
}

// query (T, H, D) rows of stride q_stride, key (T, Hkv, D) rows of stride k_stride;
// outputs are contiguous. cos_sin_cache (max_pos, D) float32 = cat(cos, sin).
template <typename T>
void apply_rotary(const T* query, int64_t q_stride, const T* key, int64_t k_stride,
                  const int64_t* positions, const float* cos_sin_cache, int64_t tokens,
                  int64_t heads, int64_t kv_heads, int64_t dim, T* q_out, T* k_out,
                  int num_threads) {
  const int64_t half = dim / 2;
  const bool parallel = tokens * (heads + kv_heads) * dim >= kMinParallelElements;
  parallel_for(tokens, parallel, num_threads, [&](int64_t t) {
    const float* cos = cos_sin_cache + positions[t] * dim;
    const float* sin = cos + half;
    for (int64_t h = 0; h < heads; ++h) {
      rotate_head(query + t * q_stride + h * dim, cos, sin, half, q_out + (t * heads + h) * dim);
    }
    for (int64_t h = 0; h < kv_heads; ++h) {
      rotate_head(key + t * k_stride + h * dim, cos, sin, half, k_out + (t * kv_heads + h) * dim);
    }
  });
}

// x (T, 2I) = [gate | up] -> out (T, I) = round(silu(gate)) * up.
template <typename T>
void silu_and_mul(const T* x, int64_t x_stride, int64_t rows, int64_t inter, T* out,
                  int num_threads) {
  parallel_for(rows, rows * inter >= kMinParallelElements, num_threads, [&](int64_t r) {
    const T* gate = x + r * x_stride;
    const T* up = gate + inter;
    T* o = out + r * inter;
#pragma omp simd
    for (int64_t i = 0; i < inter; ++i) {
      const float g = to_float(gate[i]);
      store(round_to<T>(g / (1.f + std::exp(-g))) * to_float(up[i]), o + i);
    }
  });
}

// Copies token t's key and value rows (width = Hkv * D) into slot slot_mapping[t] of the
// caches (num_slots, width); negative slots are padding and skipped.
template <typename T>
void write_kv_cache(const T* key, int64_t k_stride, const T* value, int64_t v_stride,
                    const int64_t* slot_mapping, int64_t tokens, int64_t width, T* key_cache,
                    T* value_cache) {
  for (int64_t t = 0; t < tokens; ++t) {
    const int64_t slot = slot_mapping[t];
    if (slot < 0) continue;
    std::memcpy(key_cache + slot * width, key + t * k_stride, width * sizeof(T));
    std::memcpy(value_cache + slot * width, value + t * v_stride, width * sizeof(T));
  }
}

}  // namespace

// The C ABI. dtype is a ferry::DType; each returns 0, or 3 for an unknown dtype.
extern "C" {

int ferry_rms_norm(int dtype, const void* x, int64_t x_stride, const void* weight, float eps,
                   int64_t rows, int64_t width, void* out, int num_threads) {
  return ferry::dispatch(dtype, [&](auto zero) {
           using T = decltype(zero);
           rms_norm(static_cast<const T*>(x), x_stride, static_cast<const T*>(weight), eps, rows,
                    width, static_cast<T*>(out), num_threads);
         }) ? 0 : 3;
}

int ferry_fused_add_rms_norm(int dtype, const void* x, int64_t x_stride, const void* residual,
                             int64_t residual_stride, const void* weight, float eps,
                             int64_t rows, int64_t width, void* normed, void* summed,
                             int num_threads) {
  return ferry::dispatch(dtype, [&](auto zero) {
           using T = decltype(zero);
           fused_add_rms_norm(static_cast<const T*>(x), x_stride, static_cast<const T*>(residual),
                              residual_stride, static_cast<const T*>(weight), eps, rows, width,
                              static_cast<T*>(normed), static_cast<T*>(summed), num_threads);
         }) ? 0 : 3;
}

int ferry_apply_rotary(int dtype, const void* query, int64_t q_stride, const void* key,
                       int64_t k_stride, const int64_t* positions, const float* cos_sin_cache,
                       int64_t tokens, int64_t heads, int64_t kv_heads, int64_t dim,
                       void* q_out, void* k_out, int num_threads) {
  return ferry::dispatch(dtype, [&](auto zero) {
           using T = decltype(zero);
           apply_rotary(static_cast<const T*>(query), q_stride, static_cast<const T*>(key),
                        k_stride, positions, cos_sin_cache, tokens, heads, kv_heads, dim,
                        static_cast<T*>(q_out), static_cast<T*>(k_out), num_threads);
         }) ? 0 : 3;
}

int ferry_silu_and_mul(int dtype, const void* x, int64_t x_stride, int64_t rows, int64_t inter,
                       void* out, int num_threads) {
  return ferry::dispatch(dtype, [&](auto zero) {
           using T = decltype(zero);
           silu_and_mul(static_cast<const T*>(x), x_stride, rows, inter, static_cast<T*>(out),
                        num_threads);
         }) ? 0 : 3;
}

int ferry_write_kv_cache(int dtype, const void* key, int64_t k_stride, const void* value,
                         int64_t v_stride, const int64_t* slot_mapping, int64_t tokens,
                         int64_t width, void* key_cache, void* value_cache) {
  return ferry::dispatch(dtype, [&](auto zero) {
           using T = decltype(zero);
           write_kv_cache(static_cast<const T*>(key), k_stride, static_cast<const T*>(value),
                          v_stride, slot_mapping, tokens, width, static_cast<T*>(key_cache),
                          static_cast<T*>(value_cache));
         }) ? 0 : 3;
}

}  // extern "C"
