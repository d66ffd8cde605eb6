// Element types of the CPU kernels: float32, and bfloat16 held as its raw bits.
// Kernels compute in float32 and round once when they store.
#pragma once


#include <cstdint>
#include <cstring>

#include "thread_pool.h"

namespace ferry {

// The upper half of a float32.
struct Bf16 {
  uint16_t bits;
};

inline float to_float(float x) { return x; }
inline float to_float(Bf16 x) {
  uint32_t u = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline void store(float x, float* dst) { *dst = x; }
inline void store(float x, Bf16* dst) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  u += 0x7FFF + ((u >> 16) & 1);  // round to nearest even (finite inputs)
  dst->bits = static_cast<uint16_t>(u >> 16);
}

// x rounded to T's precision and back: reproduces the reference's intermediate roundings.
template <typename T>
inline float round_to(float x) {
  T t;
  store(x, &t);
  return to_float(t);
}

// Runs fn(i) for i in [0, n): on ferry's worker pool (thread_pool.h) with up to
// num_threads threads when `parallel`, else on the calling thread. Small work should not
// go to the pool: handing items over costs a few microseconds.
template <typename Fn>
inline void parallel_for(int64_t n, bool parallel, int num_threads, Fn&& fn) {
  if (!parallel || num_threads <= 1 || n <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  pool_for(n, num_threads, [&](int64_t i, int) { fn(i); });
}

// fn(i, worker) for i in [0, n), worker in [0, num_threads): for per-thread scratch.
// Goes to the pool whenever there are two items or more.
template <typename Fn>
inline void parallel_for_worker(int64_t n, int num_threads, Fn&& fn) {
  if (num_threads <= 1 || n <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(i, 0);
    return;
  }
  pool_for(n, num_threads, fn);
}

// The pool hands out items one at a time, so a split never waits for a slow thread's
// whole share: the same as parallel_for (kept for the callers that ask for it by name).
template <typename Fn>
inline void parallel_for_dynamic(int64_t n, bool parallel, int num_threads, Fn&& fn) {
  parallel_for(n, parallel, num_threads, static_cast<Fn&&>(fn));
}

// dtype codes shared with ferry/kernels/cpu/_lib.py
enum DType : int { kFloat32 = 0, kBFloat16 = 1 };

// Calls fn.template operator()<T>() for the dtype code; returns false for an unknown code.
template <typename Fn>
inline bool dispatch(int dtype, Fn&& fn) {
  if (dtype == kFloat32) {
    fn(float{});
    return true;
  }
  if (dtype == kBFloat16) {
    fn(Bf16{});
    return true;
  }
  return false;
}

}  // namespace ferry
