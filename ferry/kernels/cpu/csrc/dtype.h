// Element types of the CPU kernels: float32, and bfloat16 held as its raw bits.
// Kernels compute in float32 and round once when they store.
#pragma once

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
