// Structured output's token mask on the logits, in place, for the CPU. Twin of
// apply_token_bitmask in ferry/kernels/reference.py.
//
// Row r of `logits` (float32, row stride `stride`) takes mask row r of `bitmask` (int32
// words, `words` per row): bit t % 32 of word t / 32 set means token t is allowed. A
// forbidden token's logit becomes -inf. A row left with no finite logit (an earlier
// processor removed every allowed token, e.g. min_tokens banning the EOS the grammar
// needs) gets 0 for its allowed tokens instead, so the grammar always wins. The
// reference builds a (rows, vocab) boolean tensor for this; here it is one pass over
// the row (and a second only for such an empty row).
#include <algorithm>
#include <cstdint>
#include <limits>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "dtype.h"

namespace {

inline bool allowed(const int32_t* mask, int64_t token) {
  return (static_cast<uint32_t>(mask[token >> 5]) >> (token & 31)) & 1u;
}

// Portable: one 32-token word at a time; returns whether an allowed logit is finite.
bool mask_words(const float* src, float* row, const int32_t* mask, int64_t first_word,
                int64_t vocab) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  bool any_finite = false;
  for (int64_t word = first_word; word * 32 < vocab; ++word) {
    const uint32_t bits = static_cast<uint32_t>(mask[word]);
    const int64_t end = std::min<int64_t>(32, vocab - word * 32);
    const float* in = src + word * 32;
    float* chunk = row + word * 32;
    for (int64_t j = 0; j < end; ++j) {
      const bool keep = (bits >> j) & 1u;
      chunk[j] = keep ? in[j] : kNegInf;
      any_finite |= keep && in[j] != kNegInf;
    }
  }
  return any_finite;
}

// src -> row (the same memory or another row): masked values, then the empty-row rule.
void mask_row(const float* src, float* row, const int32_t* mask, int64_t vocab) {
  bool any_finite = false;
  int64_t word = 0;
#if defined(__AVX512F__)
  // 16 tokens per instruction: the mask's 16 bits select logit or -inf directly.
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __mmask16 finite = 0;
  for (; (word + 1) * 32 <= vocab; ++word) {
    const uint32_t bits = static_cast<uint32_t>(mask[word]);
    const float* in = src + word * 32;
    float* chunk = row + word * 32;
    for (int half = 0; half < 2; ++half) {
      const __mmask16 keep = static_cast<__mmask16>(bits >> (16 * half));
      const __m512 v = _mm512_mask_loadu_ps(neg_inf, keep, in + 16 * half);
      _mm512_storeu_ps(chunk + 16 * half, v);
      finite |= _mm512_cmp_ps_mask(v, neg_inf, _CMP_NEQ_UQ);
    }
  }
  any_finite = finite != 0;
#endif
  any_finite |= mask_words(src, row, mask, word, vocab);
  if (!any_finite) {
    for (int64_t t = 0; t < vocab; ++t) {
      if (allowed(mask, t)) row[t] = 0.f;
    }
  }
}

}  // namespace

extern "C" {

// Mask row i goes from src row row_index[i] to the same row of dst (dst may be src:
// in place). Returns 0 on success, 1 for bad sizes.
int ferry_apply_token_bitmask(const float* src, float* dst, int64_t stride, int64_t vocab,
                              const int32_t* bitmask, int64_t words, const int64_t* row_index,
                              int64_t rows, int num_threads) {
  if (vocab < 0 || rows < 0 || words * 32 < vocab || stride < vocab) return 1;
  ferry::parallel_for(rows, rows * vocab >= (1 << 16), num_threads, [&](int64_t i) {
    const int64_t offset = row_index[i] * stride;
    mask_row(src + offset, dst + offset, bitmask + i * words, vocab);
  });
  return 0;
}

}  // extern "C"
