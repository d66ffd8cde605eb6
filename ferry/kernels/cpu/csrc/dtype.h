// Element types of the CPU kernels: float32, and bfloat16 held as its raw bits.
// Kernels compute in float32 and round once when they store.
#pragma once

#include <omp.h>

#include <cstdint>
#include <cstring>

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

// Runs fn(i) for i in [0, n): on an OpenMP team of num_threads when `parallel`, else on the
// calling thread. NOTE: small work must not open a region at all, not even a one-thread
// one: a team of another size than PyTorch's makes libgomp rebuild its team, and the next
// PyTorch (MKL) call pays tens of microseconds to wake its threads again.
template <typename Fn>
inline void parallel_for(int64_t n, bool parallel, int num_threads, Fn&& fn) {
  if (!parallel || num_threads <= 1 || n <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t i = 0; i < n; ++i) fn(i);
}

// parallel_for with dynamic scheduling: for many equal items on cores shared with other
// processes, where a static split waits for the slowest (descheduled) thread's whole share.
template <typename Fn>
inline void parallel_for_dynamic(int64_t n, bool parallel, int num_threads, Fn&& fn) {
  if (!parallel || num_threads <= 1 || n <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
#pragma omp parallel for num_threads(num_threads) schedule(dynamic, 1)
  for (int64_t i = 0; i < n; ++i) fn(i);
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
