// Attention debug trace on the CPU: for chosen query rows, each head's softmax entropy and
// its top-k attended positions, read from q and the paged K cache in place.
//
// Twin of ferry.kernels.attention_trace.attention_trace (the PyTorch reference op; checked
// against it in tests/kernels/test_attention_trace.py). Same visibility (causal, sliding
// window), same arithmetic order: score = (q . k) * scale in float32, softmax, entropy
// -sum p * log(max(p, 1e-30)). Top-k is by weight descending; of equal weights the lower
// position comes first (torch.topk leaves the order of ties unspecified).
//
// A work item is one (traced row, KV head): it walks the row's visible blocks once and
// scores every query head of that KV head's group against each key, so GQA reads a key
// once per group, not once per head. Items run on ferry's pool (thread_pool.h).
//
// Over an FP8 (e4m3fn) cache (ferry_attention_trace_fp8) each key is widened to float32 as
// it is read, as ferry_paged_attention_fp8 does; the layer folds k_scale into `scale`, so
// the scores are those of the dequantized keys, the ones the attention's output used.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "dtype.h"
#include "fp8.h"

namespace {

using ferry::to_float;

// T: the query's type; C: the cache's (T itself, or ferry::Fp8 for an FP8 cache).
template <typename T, typename C = T>
struct Problem {
  const T* query;               // row r, head h at query + rows[r] * query_token_stride + h * D
  int64_t query_token_stride;
  const C* key_cache;           // (num_blocks, block_size, Hkv, D)
  int64_t num_blocks;
  const int32_t* block_tables;  // (B, block_table_stride)
  int64_t block_table_stride;
  const int64_t* rows;          // (R,) query rows of the flattened batch
  const int64_t* seqs;          // (R,) their sequences (block table rows)
  const int64_t* positions;     // (R,) their positions in the sequence
  int64_t num_heads, num_kv_heads, head_dim, block_size;
  float scale;
  int64_t sliding_window;       // 0: none
  int64_t top_k;
  float* entropy;               // (R, H)
  int64_t* top_positions;       // (R, H, k), -1 where fewer than k keys are visible
  float* top_weights;           // (R, H, k), 0 there
};

struct Scratch {
  std::vector<float> scores, query;
};

// The k largest of weights[0, count) (positions first + j), by weight descending, ties by
// lower position: an insertion into a sorted list of k, as k is small (<= 64).
void select_top(const float* weights, int64_t count, int64_t first, int64_t k,
                int64_t* out_positions, float* out_weights) {
  int64_t kept = 0;
  for (int64_t j = 0; j < count; ++j) {
    const float w = weights[j];
    if (kept == k && !(w > out_weights[k - 1])) continue;   // equal: the earlier one stays
    int64_t at = kept < k ? kept++ : k - 1;
    while (at > 0 && w > out_weights[at - 1]) {
      out_weights[at] = out_weights[at - 1];
      out_positions[at] = out_positions[at - 1];
      --at;
    }
    out_weights[at] = w;
    out_positions[at] = first + j;
  }
  for (int64_t i = kept; i < k; ++i) {
    out_positions[i] = -1;
    out_weights[i] = 0.f;
  }
}

// scores[j] = exp(scores[j] - shift), every element through the same vector code: a
// plain loop would run its tail through scalar exp, which rounds differently from the
// vector one (libmvec), and two equal scores could then get unequal weights, breaking the
// tie order. So a chunk at a time in an aligned buffer of fixed length, the last one padded.
void exp_shifted(float* scores, int64_t count, float shift) {
  constexpr int kChunk = 16;
  alignas(64) float chunk[kChunk];
  for (int64_t j = 0; j < count; j += kChunk) {
    const int n = static_cast<int>(std::min<int64_t>(kChunk, count - j));
    for (int i = 0; i < kChunk; ++i) chunk[i] = i < n ? scores[j + i] - shift : -100.f;
#pragma omp simd aligned(chunk : 64)
    for (int i = 0; i < kChunk; ++i) chunk[i] = std::exp(chunk[i]);
    for (int i = 0; i < n; ++i) scores[j + i] = chunk[i];
  }
}

// Softmax of scores[0, count) in place; returns its entropy.
float softmax_entropy(float* scores, int64_t count) {
  float max_score = scores[0];
  for (int64_t j = 1; j < count; ++j) max_score = std::max(max_score, scores[j]);
  exp_shifted(scores, count, max_score);
  float sum = 0.f;
  for (int64_t j = 0; j < count; ++j) sum += scores[j];
  const float inv_sum = 1.f / sum;
  float entropy = 0.f;
  for (int64_t j = 0; j < count; ++j) {
    const float p = scores[j] * inv_sum;
    scores[j] = p;
    entropy -= p * std::log(std::max(p, 1e-30f));
  }
  return entropy;
}

template <typename T, typename C>
void trace_item(const Problem<T, C>& p, int64_t item, Scratch& s) {
  const int64_t r = item / p.num_kv_heads, kv_head = item % p.num_kv_heads;
  const int64_t dim = p.head_dim, group = p.num_heads / p.num_kv_heads;
  const int64_t position = p.positions[r];
  const int64_t lo = p.sliding_window > 0 ? std::max<int64_t>(0, position - p.sliding_window + 1) : 0;
  const int64_t count = position - lo + 1;
  s.scores.resize(static_cast<size_t>(group * count));
  s.query.resize(static_cast<size_t>(group * dim));
  const T* q = p.query + p.rows[r] * p.query_token_stride + kv_head * group * dim;
  for (int64_t n = 0; n < group * dim; ++n) s.query[n] = to_float(q[n]);

  const int32_t* table = p.block_tables + p.seqs[r] * p.block_table_stride;
  const int64_t token_stride = p.num_kv_heads * dim;
  for (int64_t pos = lo; pos <= position; ++pos) {
    const int64_t block = table[pos / p.block_size];
    const C* key = p.key_cache + (block * p.block_size + pos % p.block_size) * token_stride +
                   kv_head * dim;
    for (int64_t g = 0; g < group; ++g) {
      const float* qg = s.query.data() + g * dim;
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t d = 0; d < dim; ++d) acc += qg[d] * to_float(key[d]);
      s.scores[g * count + (pos - lo)] = acc * p.scale;
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    const int64_t head = kv_head * group + g;
    float* weights = s.scores.data() + g * count;
    p.entropy[r * p.num_heads + head] = softmax_entropy(weights, count);
    const int64_t out = (r * p.num_heads + head) * p.top_k;
    select_top(weights, count, lo, p.top_k, p.top_positions + out, p.top_weights + out);
  }
}

// Non-zero when a row would read outside the block table or the cache.
template <typename T, typename C>
int check_rows(const Problem<T, C>& p, int64_t num_rows) {
  for (int64_t r = 0; r < num_rows; ++r) {
    const int64_t position = p.positions[r];
    if (p.rows[r] < 0 || p.seqs[r] < 0 || position < 0) return 4;
    const int64_t last_block = position / p.block_size;
    if (last_block >= p.block_table_stride) return 5;
    const int32_t* table = p.block_tables + p.seqs[r] * p.block_table_stride;
    for (int64_t b = 0; b <= last_block; ++b) {
      if (table[b] < 0 || table[b] >= p.num_blocks) return 6;
    }
  }
  return 0;
}

template <typename T, typename C>
int run(const Problem<T, C>& p, int64_t num_rows, int num_threads) {
  if (p.num_kv_heads <= 0 || p.num_heads % p.num_kv_heads != 0 || p.head_dim <= 0 ||
      p.block_size <= 0 || p.top_k <= 0) {
    return 1;
  }
  if (const int status = check_rows(p, num_rows)) return status;
  const int threads = std::max(1, num_threads);
  std::vector<Scratch> scratch(static_cast<size_t>(threads));
  ferry::parallel_for_worker(num_rows * p.num_kv_heads, threads, [&](int64_t item, int worker) {
    trace_item(p, item, scratch[worker]);
  });
  return 0;
}

// The kernel on caches of element type C (T, the query's, or ferry::Fp8).
template <typename C>
int trace(int dtype, const void* query, int64_t query_token_stride, const void* key_cache,
          int64_t num_blocks, const int32_t* block_tables, int64_t block_table_stride,
          const int64_t* rows, const int64_t* seqs, const int64_t* positions, int64_t num_rows,
          int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
          float scale, int64_t sliding_window, int64_t top_k, float* entropy,
          int64_t* top_positions, float* top_weights, int num_threads) {
  int status = 3;
  ferry::dispatch(dtype, [&](auto zero) {
    using T = decltype(zero);
    using Cache = std::conditional_t<std::is_void_v<C>, T, C>;
    const Problem<T, Cache> p{static_cast<const T*>(query), query_token_stride,
                              static_cast<const Cache*>(key_cache), num_blocks, block_tables,
                              block_table_stride, rows, seqs, positions, num_heads,
                              num_kv_heads, head_dim, block_size, scale, sliding_window, top_k,
                              entropy, top_positions, top_weights};
    status = run(p, num_rows, num_threads);
  });
  return status;
}

}  // namespace

extern "C" {

// dtype: ferry::DType of both the query and the key cache. Returns 0 on success, non-zero
// on bad arguments (then nothing is written).
int ferry_attention_trace(int dtype, const void* query, int64_t query_token_stride,
                          const void* key_cache, int64_t num_blocks, const int32_t* block_tables,
                          int64_t block_table_stride, const int64_t* rows, const int64_t* seqs,
                          const int64_t* positions, int64_t num_rows, int64_t num_heads,
                          int64_t num_kv_heads, int64_t head_dim, int64_t block_size, float scale,
                          int64_t sliding_window, int64_t top_k, float* entropy,
                          int64_t* top_positions, float* top_weights, int num_threads) {
  return trace<void>(dtype, query, query_token_stride, key_cache, num_blocks, block_tables,
                     block_table_stride, rows, seqs, positions, num_rows, num_heads,
                     num_kv_heads, head_dim, block_size, scale, sliding_window, top_k, entropy,
                     top_positions, top_weights, num_threads);
}

// The same over an FP8 (e4m3fn) key cache; dtype is the query's.
int ferry_attention_trace_fp8(int dtype, const void* query, int64_t query_token_stride,
                              const void* key_cache, int64_t num_blocks,
                              const int32_t* block_tables, int64_t block_table_stride,
                              const int64_t* rows, const int64_t* seqs, const int64_t* positions,
                              int64_t num_rows, int64_t num_heads, int64_t num_kv_heads,
                              int64_t head_dim, int64_t block_size, float scale,
                              int64_t sliding_window, int64_t top_k, float* entropy,
                              int64_t* top_positions, float* top_weights, int num_threads) {
  return trace<ferry::Fp8>(dtype, query, query_token_stride, key_cache, num_blocks, block_tables,
                           block_table_stride, rows, seqs, positions, num_rows, num_heads,
                           num_kv_heads, head_dim, block_size, scale, sliding_window, top_k,
                           entropy, top_positions, top_weights, num_threads);
}

}  // extern "C"
