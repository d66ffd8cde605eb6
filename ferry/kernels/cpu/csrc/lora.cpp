// Segmented LoRA shrink and expand (Punica/S-LoRA style) for the CPU. Twins of
// lora_shrink / lora_expand in ferry/kernels/lora_reference.py.
//
// Each token t reads the adapter in slot token_slots[t] (-1: base model, skipped):
//   shrink: v[t, k] = sum_i x[t, i] * A[slot, k, i]        (float32 accumulation)
//   expand: y[t, o] = round(y[t, o] + sum_k v[t, k] * Bt[slot, k, o])
// A (S, r, in) and Bt (S, r, out) are views into the preallocated slot stacks (rank and
// output columns may be sliced), so each comes with a slot stride and a row stride; rows
// are contiguous. Expand is a sum of r scaled rows of Bt: contiguous, vectorised.
#include <omp.h>

#include <cstdint>

#include "dtype.h"

namespace {

using ferry::parallel_for;
using ferry::store;
using ferry::to_float;

// Below this many multiply-adds a parallel region costs more than it saves.
constexpr int64_t kMinParallelWork = 1 << 15;

template <typename T>
void lora_shrink(const T* x, int64_t x_stride, const T* a, int64_t a_slot_stride,
                 int64_t a_row_stride, const int32_t* token_slots, int64_t tokens,
                 int64_t rank, int64_t in, float* v, int num_threads) {
  const bool parallel = tokens * rank * in >= kMinParallelWork;
  parallel_for(tokens * rank, parallel, num_threads, [&](int64_t item) {
    const int64_t t = item / rank, k = item % rank;
    const int32_t slot = token_slots[t];
    if (slot < 0) return;
    const T* xr = x + t * x_stride;
    const T* ar = a + slot * a_slot_stride + k * a_row_stride;
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < in; ++i) acc += to_float(xr[i]) * to_float(ar[i]);
    v[t * rank + k] = acc;
  });
}

template <typename T>
void lora_expand(const float* v, const T* b, int64_t b_slot_stride, int64_t b_row_stride,
                 const int32_t* token_slots, int64_t tokens, int64_t rank, int64_t out,
                 T* y, int64_t y_stride, int num_threads) {
  const bool parallel = tokens * rank * out >= kMinParallelWork;
  // Columns in blocks, so one token's float accumulator stays in cache (and on the stack).
  constexpr int64_t kBlock = 512;
  const int64_t blocks = (out + kBlock - 1) / kBlock;
  parallel_for(tokens * blocks, parallel, num_threads, [&](int64_t item) {
    const int64_t t = item / blocks, o0 = (item % blocks) * kBlock;
    const int64_t width = out - o0 < kBlock ? out - o0 : kBlock;
    const int32_t slot = token_slots[t];
    if (slot < 0) return;
    const float* vr = v + t * rank;
    const T* bs = b + slot * b_slot_stride + o0;
    T* yr = y + t * y_stride + o0;
    float acc[kBlock];
#pragma omp simd
    for (int64_t o = 0; o < width; ++o) acc[o] = to_float(yr[o]);
    for (int64_t k = 0; k < rank; ++k) {
      const float vk = vr[k];
      const T* br = bs + k * b_row_stride;
#pragma omp simd
      for (int64_t o = 0; o < width; ++o) acc[o] += vk * to_float(br[o]);
    }
    for (int64_t o = 0; o < width; ++o) store(acc[o], yr + o);
  });
}

}  // namespace

extern "C" {

int ferry_lora_shrink(int dtype, const void* x, int64_t x_stride, const void* a,
                      int64_t a_slot_stride, int64_t a_row_stride, const int32_t* token_slots,
                      int64_t tokens, int64_t rank, int64_t in, float* v, int num_threads) {
  return ferry::dispatch(dtype, [&](auto zero) {
           using T = decltype(zero);
           lora_shrink(static_cast<const T*>(x), x_stride, static_cast<const T*>(a),
                       a_slot_stride, a_row_stride, token_slots, tokens, rank, in, v,
                       num_threads);
         }) ? 0 : 3;
}

int ferry_lora_expand(int dtype, const float* v, const void* b, int64_t b_slot_stride,
                      int64_t b_row_stride, const int32_t* token_slots, int64_t tokens,
                      int64_t rank, int64_t out, void* y, int64_t y_stride, int num_threads) {
  return ferry::dispatch(dtype, [&](auto zero) {
           using T = decltype(zero);
           lora_expand(v, static_cast<const T*>(b), b_slot_stride, b_row_stride, token_slots,
                       tokens, rank, out, static_cast<T*>(y), y_stride, num_threads);
         }) ? 0 : 3;
}

}  // extern "C"
