// What the CPU int linears share: the problem both the float-activation (wna16.cpp) and
// the int8-activation (wna8.cpp) kernels solve, its shape rule and how their output
// rows are split into work items.
#pragma once

#include <algorithm>
#include <cstdint>

namespace ferry::int_linear {

// Up to this many tokens share each weight load (a batch of decodes streams the weights once).
constexpr int kTokenTile = 4;
// Below this many weights x rows a parallel region costs more than it saves.
constexpr int64_t kMinParallelWeights = 1 << 15;
// Output rows per work item: long contiguous runs for the hardware prefetchers (16-row
// items cost the int8 LM head, read from main memory, a third to a half of its speed),
// yet at least 4 items per thread for the dynamic split on shared cores.
constexpr int64_t kMinRowsPerItem = 16, kMaxRowsPerItem = 256;

inline int64_t rows_per_item(int64_t n, int num_threads) {
  const int64_t rows = n / (4 * static_cast<int64_t>(num_threads));
  return std::max(kMinRowsPerItem, std::min(kMaxRowsPerItem, rows / 4 * 4));
}

template <typename T>
struct Problem {
  const T* x;              // (rows, K), row stride x_stride
  int64_t x_stride, rows, k, n;
  const uint8_t* qweight;  // bits=8: (N, K); bits=4: (N, K/2), low nibble = even k
  const T* scales;         // (N, G)
  const T* zeros;          // (N, G)
  int bits;
  int64_t group_size;
  const T* bias;           // (N,) or null
  T* out;                  // (rows, N)
};

// Bits and group size the canonical layout allows for K inputs.
inline bool valid_shape(int bits, int64_t k, int64_t group_size) {
  return (bits == 4 || bits == 8) && group_size > 0 && k % group_size == 0 &&
         (bits == 8 || group_size % 2 == 0);
}

}  // namespace ferry::int_linear
