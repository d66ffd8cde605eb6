// float8 e4m3fn (torch.float8_e4m3fn) on the CPU: 1 sign, 4 exponent (bias 7), 3 mantissa
// bits, no infinities, 0x7F/0xFF NaN, largest finite 448, subnormals k * 2^-9.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace ferry {

struct Fp8 {
  uint8_t bits;
};

// The 256 values, decoded once.
struct Fp8Table {
  float values[256];
  Fp8Table() {
    for (int b = 0; b < 256; ++b) {
      const int e = (b >> 3) & 15, m = b & 7;
      float v;
      if (e == 15 && m == 7) {
        v = NAN;
      } else if (e == 0) {
        v = std::ldexp(static_cast<float>(m), -9);
      } else {
        v = std::ldexp(1.f + m / 8.f, e - 7);
      }
      values[b] = (b & 0x80) ? -v : v;
    }
  }
};

inline const Fp8Table& fp8_table() {
  static const Fp8Table table;
  return table;
}

inline float to_float(Fp8 x) { return fp8_table().values[x.bits]; }

// Round to nearest even, saturating at +-448 (as torch's CPU cast); NaN stays NaN.
inline void store(float f, Fp8* dst) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint8_t sign = static_cast<uint8_t>((u >> 24) & 0x80);
  const uint32_t mag = u & 0x7FFFFFFFu;
  if (mag > 0x7F800000u) {            // NaN
    dst->bits = sign | 0x7F;
    return;
  }
  if (mag >= 0x43E00000u) {           // >= 448 (and inf): saturate
    dst->bits = sign | 0x7E;
    return;
  }
  if (mag < 0x3C800000u) {            // < 2^-6: subnormal steps of 2^-9 (8 = the least normal)
    float a;
    std::memcpy(&a, &mag, sizeof(a));
    dst->bits = sign | static_cast<uint8_t>(std::nearbyint(a * 512.f));
    return;
  }
  // normal: keep 3 of the 23 mantissa bits, rounding to nearest even (may carry into the exponent)
  const uint32_t rounded = (mag + 0x7FFFFu + ((mag >> 20) & 1u)) & 0xFFF00000u;
  const int exponent = static_cast<int>(rounded >> 23) - 127 + 7;
  uint32_t code = (static_cast<uint32_t>(exponent) << 3) | ((rounded >> 20) & 7u);
  if (code > 0x7E) code = 0x7E;       // 448 < x < 464 rounds to 464: not finite in e4m3fn
  dst->bits = sign | static_cast<uint8_t>(code);
}

}  // namespace ferry
