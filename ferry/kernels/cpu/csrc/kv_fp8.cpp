// The FP8 (e4m3fn) KV cache on the CPU: the KV write, quantizing float32/bfloat16 keys
// and values with a saturating round-to-nearest-even cast (twin of the reference's
// write_kv_cache into a float8 cache). Attention over such a cache is
// ferry_paged_attention_fp8 in paged_attention.cpp, which widens each block on read.
#include <cstdint>

#include "dtype.h"
#include "fp8.h"

namespace {

template <typename T>
void write_rows(const T* src, int64_t src_stride, const int64_t* slots, int64_t tokens,
                int64_t width, ferry::Fp8* cache) {
  for (int64_t t = 0; t < tokens; ++t) {
    if (slots[t] < 0) continue;
    const T* row = src + t * src_stride;
    ferry::Fp8* dst = cache + slots[t] * width;
    for (int64_t i = 0; i < width; ++i) ferry::store(ferry::to_float(row[i]), dst + i);
  }
}

}  // namespace

extern "C" {

// dtype: ferry::DType of key/value; the caches are float8 e4m3fn. 0 on success.
int ferry_write_kv_cache_fp8(int dtype, const void* key, int64_t k_stride, const void* value,
                             int64_t v_stride, const int64_t* slot_mapping, int64_t tokens,
                             int64_t width, void* key_cache, void* value_cache) {
  return ferry::dispatch(dtype, [&](auto zero) {
           using T = decltype(zero);
           write_rows(static_cast<const T*>(key), k_stride, slot_mapping, tokens, width,
                      static_cast<ferry::Fp8*>(key_cache));
           write_rows(static_cast<const T*>(value), v_stride, slot_mapping, tokens, width,
                      static_cast<ferry::Fp8*>(value_cache));
         }) ? 0 : 3;
}

}  // extern "C"
