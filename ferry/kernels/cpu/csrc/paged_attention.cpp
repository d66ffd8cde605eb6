// Paged attention on the CPU: reads K/V blocks in place through the block table.
//
// Twin of ferry.kernels.reference.paged_attention (same semantics, checked against it in
// tests/kernels/test_cpu_kernels.py). The reference gathers every sequence's blocks into
// a padded copy and then runs SDPA, so it moves the KV cache through memory three times;
// this kernel reads each visible key and value once per query tile.
//
// Work items are (sequence, tile of up to kQueryTile of its new tokens), run in parallel
// with OpenMP. An item has one "row" per (query, head). It walks the sequence's blocks
// twice: first scoring every row against the block's keys, then (after a softmax per
// row) adding the block's values into every row's accumulator. A block (all KV heads) is
// small enough to stay in L1/L2 while every row uses it, and each row's query or
// accumulator stays in registers across the block's positions. Rows only ever touch the
// positions they can see (causal, sliding window), so there is no -inf masking and the
// build can use -ffast-math (which gives vectorised exp from glibc's libmvec).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "dtype.h"
#include "fp8.h"

namespace {

using ferry::to_float;

constexpr int64_t kQueryTile = 16;
// An item keeps a score for each of its rows and visible positions: long contexts get
// smaller query tiles so that this stays under ~16 MB per thread.
constexpr int64_t kMaxScores = int64_t{1} << 22;

// Queries per item for a sequence: kQueryTile, fewer when its scores would not fit.
inline int64_t query_tile(int64_t seq_len, int64_t heads, int64_t sliding_window) {
  const int64_t span = sliding_window > 0 ? std::min(seq_len, sliding_window + kQueryTile) : seq_len;
  return std::clamp<int64_t>(kMaxScores / std::max<int64_t>(heads * span, 1), 1, kQueryTile);
}

// T: the query/output type; C: the cache's (T itself, or ferry::Fp8 for an FP8 cache).
template <typename T, typename C = T>
struct Problem {
  const T* query;                  // (T, H, D)
  const C* key_cache;              // (num_blocks, block_size, Hkv, D)
  const C* value_cache;            // (num_blocks, block_size, Hkv, D)
  const int32_t* block_tables;     // (B, block_table_stride)
  int64_t block_table_stride;
  const int32_t* query_start_loc;  // (B + 1,)
  const int32_t* seq_lens;         // (B,)
  int64_t num_heads, num_kv_heads, head_dim, block_size;
  float scale;
  int64_t sliding_window;  // 0: none
  T* out;                  // (T, H, D)
};

struct WorkItem {
  int64_t seq, first_query, end_query;  // queries index the sequence's new tokens
};

// Per-thread buffers, grown on demand and reused across items.
struct Scratch {
  std::vector<float> scores, acc, queries, block, inv_sums;
  std::vector<int64_t> row_lo, row_hi;
  static void grow(std::vector<float>& v, int64_t n) {
    if (static_cast<int64_t>(v.size()) < n) v.resize(n);
  }
  void reserve(int64_t rows, int64_t span, int64_t dim, int64_t block_elements) {
    grow(scores, rows * span);
    grow(acc, rows * dim);
    grow(queries, rows * dim);
    grow(block, block_elements);
    grow(inv_sums, rows);
    if (static_cast<int64_t>(row_lo.size()) < rows) {
      row_lo.resize(rows);
      row_hi.resize(rows);
    }
  }
};

// A cache block as float32: the block itself for float caches, else converted into buf.
inline const float* block_as_float(const float* block, int64_t, float*) { return block; }
inline const float* block_as_float(const ferry::Bf16* block, int64_t n, float* buf) {
  for (int64_t i = 0; i < n; ++i) buf[i] = to_float(block[i]);
  return buf;
}
inline const float* block_as_float(const ferry::Fp8* block, int64_t n, float* buf) {
  const float* table = ferry::fp8_table().values;
  for (int64_t i = 0; i < n; ++i) buf[i] = table[block[i].bits];
  return buf;
}

// Scores of one row against positions [lo, hi] of a block: out[pos] = q . key(pos).
// kDim > 0 fixes the head dim at compile time (unrolled, query in registers).
template <int kDim>
inline void score_positions(const float* q, const float* keys, int64_t token_stride,
                            int64_t count, int64_t dim, float* out) {
  for (int64_t j = 0; j < count; ++j, keys += token_stride) {
    float acc = 0.f;
    if constexpr (kDim > 0) {
#pragma omp simd reduction(+ : acc)
      for (int d = 0; d < kDim; ++d) acc += q[d] * keys[d];
    } else {
#pragma omp simd reduction(+ : acc)
      for (int64_t d = 0; d < dim; ++d) acc += q[d] * keys[d];
    }
    out[j] = acc;
  }
}

// acc += sum_j weights[j] * value(j) over a block's positions.
template <int kDim>
inline void accumulate_values(const float* weights, const float* values, int64_t token_stride,
                              int64_t count, int64_t dim, float* acc) {
  if constexpr (kDim > 0) {
    float sum[kDim];  // held in registers across the positions
    for (int d = 0; d < kDim; ++d) sum[d] = acc[d];
    for (int64_t j = 0; j < count; ++j, values += token_stride) {
      const float w = weights[j];
#pragma omp simd
      for (int d = 0; d < kDim; ++d) sum[d] += w * values[d];
    }
    for (int d = 0; d < kDim; ++d) acc[d] = sum[d];
  } else {
    for (int64_t j = 0; j < count; ++j, values += token_stride) {
      const float w = weights[j];
#pragma omp simd
      for (int64_t d = 0; d < dim; ++d) acc[d] += w * values[d];
    }
  }
}

// Prefetches the next block a slice at a time, spread over the work on the current one
// rather than in one burst. Blocks are scattered, so the hardware prefetcher cannot see
// the next one coming (measured: ~6% of the offline benchmark's throughput).
struct Prefetch {
  const char* next = nullptr;
  int64_t bytes = 0;
  void slice(int64_t i, int64_t n) const {
    if (next == nullptr) return;
    const int64_t begin = bytes * i / n / 64 * 64, end = bytes * (i + 1) / n;
    for (int64_t offset = begin; offset < end; offset += 64) __builtin_prefetch(next + offset);
  }
};

// Calls fn(first, block, prefetch) for each block overlapping positions [lo, hi], where
// first is the block's first position and block its (block_size, Hkv, D) data as float32.
// After the last block, prefetch points at `after` (the next pass's first block).
template <typename T, typename C, typename Fn>
inline void for_each_block(const C* cache, const Problem<T, C>& p, const int32_t* table, int64_t lo,
                           int64_t hi, const C* after, Scratch& s, Fn&& fn) {
  const int64_t block_elements = p.block_size * p.num_kv_heads * p.head_dim;
  const int64_t last = hi / p.block_size;
  Prefetch prefetch;
  prefetch.bytes = block_elements * static_cast<int64_t>(sizeof(C));
  for (int64_t b = lo / p.block_size; b <= last; ++b) {
    const C* block = cache + static_cast<int64_t>(table[b]) * block_elements;
    prefetch.next = reinterpret_cast<const char*>(
        b < last ? cache + static_cast<int64_t>(table[b + 1]) * block_elements : after);
    fn(b * p.block_size, block_as_float(block, block_elements, s.block.data()), prefetch);
  }
}

template <typename T, typename C, int kDim>
void attend(const Problem<T, C>& p, const WorkItem& item, Scratch& s) {
  const int64_t dim = p.head_dim, heads = p.num_heads;
  const int64_t group = heads / p.num_kv_heads;
  const int64_t token_stride = p.num_kv_heads * dim;
  const int64_t q_begin = p.query_start_loc[item.seq];
  const int64_t query_len = p.query_start_loc[item.seq + 1] - q_begin;
  const int64_t seq_len = p.seq_lens[item.seq];
  const int32_t* table = p.block_tables + item.seq * p.block_table_stride;
  const int64_t rows = (item.end_query - item.first_query) * heads;  // row = (query, head)

  // Query i of the chunk sits at position seq_len - query_len + i and sees [lo, hi].
  auto hi_of = [&](int64_t i) { return seq_len - query_len + i; };
  auto lo_of = [&](int64_t i) {
    return p.sliding_window > 0 ? std::max<int64_t>(0, hi_of(i) - p.sliding_window + 1) : 0;
  };
  const int64_t key_lo = lo_of(item.first_query), key_hi = hi_of(item.end_query - 1);
  const int64_t span = key_hi - key_lo + 1;
  s.reserve(rows, span, dim, p.block_size * token_stride);
  for (int64_t r = 0; r < rows; ++r) {
    s.row_lo[r] = lo_of(item.first_query + r / heads);
    s.row_hi[r] = hi_of(item.first_query + r / heads);
  }
  // (num_queries, H, D) scaled queries: exactly the rows' order.
  const T* q = p.query + (q_begin + item.first_query) * heads * dim;
  for (int64_t n = 0; n < rows * dim; ++n) s.queries[n] = to_float(q[n]) * p.scale;

  // One pass over the blocks of `cache`: fn(r, lo, count, rows) for each row r and the
  // part [lo, lo + count) of its visible range inside the block, where rows points at
  // position lo's (K or V) row for r's KV head. `after` is prefetched at the end.
  auto sweep = [&](const C* cache, const C* after, auto&& fn) {
    for_each_block(cache, p, table, key_lo, key_hi, after, s,
                   [&](int64_t first, const float* block, const Prefetch& prefetch) {
      for (int64_t r = 0; r < rows; ++r) {
        prefetch.slice(r, rows);
        const int64_t lo = std::max(first, s.row_lo[r]);
        const int64_t hi = std::min(first + p.block_size - 1, s.row_hi[r]);
        if (lo > hi) continue;
        fn(r, lo, hi - lo + 1, block + (lo - first) * token_stride + (r % heads) / group * dim);
      }
    });
  };
  // Row r's score for position pos (key_lo <= pos <= key_hi): *score_at(r, pos).
  auto score_at = [&](int64_t r, int64_t pos) { return s.scores.data() + r * span + (pos - key_lo); };

  const C* first_values = p.value_cache + static_cast<int64_t>(table[key_lo / p.block_size]) *
                                              p.block_size * token_stride;
  sweep(p.key_cache, first_values, [&](int64_t r, int64_t lo, int64_t count, const float* keys) {
    score_positions<kDim>(s.queries.data() + r * dim, keys, token_stride, count, dim,
                          score_at(r, lo));
  });

  // Softmax per row over its own visible range; the weights overwrite the scores.
  for (int64_t r = 0; r < rows; ++r) {
    float* row = score_at(r, s.row_lo[r]);
    const int64_t count = s.row_hi[r] - s.row_lo[r] + 1;
    float max_score = row[0];
    for (int64_t j = 1; j < count; ++j) max_score = std::max(max_score, row[j]);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < count; ++j) {
      row[j] = std::exp(row[j] - max_score);
      sum += row[j];
    }
    s.inv_sums[r] = 1.f / sum;
  }

  std::fill(s.acc.begin(), s.acc.begin() + rows * dim, 0.f);
  sweep(p.value_cache, static_cast<const C*>(nullptr),
        [&](int64_t r, int64_t lo, int64_t count, const float* values) {
    accumulate_values<kDim>(score_at(r, lo), values, token_stride, count, dim,
                            s.acc.data() + r * dim);
  });

  T* out = p.out + (q_begin + item.first_query) * heads * dim;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t d = 0; d < dim; ++d) ferry::store(s.acc[r * dim + d] * s.inv_sums[r], out + r * dim + d);
  }
}

template <typename T, typename C>
void paged_attention(const Problem<T, C>& p, int64_t num_seqs, int num_threads) {
  std::vector<WorkItem> items;
  for (int64_t seq = 0; seq < num_seqs; ++seq) {
    const int64_t query_len = p.query_start_loc[seq + 1] - p.query_start_loc[seq];
    const int64_t tile = query_tile(p.seq_lens[seq], p.num_heads, p.sliding_window);
    for (int64_t first = 0; first < query_len; first += tile) {
      items.push_back({seq, first, std::min(first + tile, query_len)});
    }
  }
  // Head dims of the common models get loops unrolled at compile time.
  auto* attend_item = p.head_dim == 64 ? &attend<T, C, 64>
                      : p.head_dim == 128 ? &attend<T, C, 128>
                                          : &attend<T, C, 0>;
  const int64_t num_items = static_cast<int64_t>(items.size());
  // One scratch per thread of the pool (worker 0 is the caller).
  std::vector<Scratch> scratch(static_cast<size_t>(std::max(1, num_threads)));
  ferry::parallel_for_worker(num_items, num_threads, [&](int64_t n, int worker) {
    attend_item(p, items[n], scratch[worker]);
  });
}

template <typename T, typename C = T>
int run(const void* query, const void* key_cache, const void* value_cache,
        const int32_t* block_tables, int64_t block_table_stride, const int32_t* query_start_loc,
        const int32_t* seq_lens, int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,
        int64_t head_dim, int64_t block_size, float scale, int64_t sliding_window, void* out,
        int num_threads) {
  if (num_kv_heads <= 0 || num_heads % num_kv_heads != 0 || head_dim <= 0 || block_size <= 0) return 1;
  for (int64_t seq = 0; seq < num_seqs; ++seq) {
    const int64_t query_len = query_start_loc[seq + 1] - query_start_loc[seq];
    if (query_len < 0 || query_len > seq_lens[seq]) return 2;
  }
  const Problem<T, C> p{static_cast<const T*>(query), static_cast<const C*>(key_cache),
                        static_cast<const C*>(value_cache), block_tables, block_table_stride,
                     query_start_loc, seq_lens, num_heads, num_kv_heads, head_dim, block_size,
                     scale, sliding_window, static_cast<T*>(out)};
  paged_attention(p, num_seqs, std::max(1, num_threads));
  return 0;
}

}  // namespace

extern "C" {

// dtype: ferry::DType. Returns 0 on success, non-zero on bad arguments.
int ferry_paged_attention(int dtype, const void* query, const void* key_cache,
                          const void* value_cache, const int32_t* block_tables,
                          int64_t block_table_stride, const int32_t* query_start_loc,
                          const int32_t* seq_lens, int64_t num_seqs, int64_t num_heads,
                          int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
                          float scale, int64_t sliding_window, void* out, int num_threads) {
  int status = 3;
  ferry::dispatch(dtype, [&](auto zero) {
    using T = decltype(zero);
    status = run<T>(query, key_cache, value_cache, block_tables, block_table_stride,
                    query_start_loc, seq_lens, num_seqs, num_heads, num_kv_heads, head_dim,
                    block_size, scale, sliding_window, out, num_threads);
  });
  return status;
}

// The same over an FP8 (e4m3fn) cache: blocks are widened to float32 as they are read.
int ferry_paged_attention_fp8(int dtype, const void* query, const void* key_cache,
                              const void* value_cache, const int32_t* block_tables,
                              int64_t block_table_stride, const int32_t* query_start_loc,
                              const int32_t* seq_lens, int64_t num_seqs, int64_t num_heads,
                              int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
                              float scale, int64_t sliding_window, void* out, int num_threads) {
  int status = 3;
  ferry::dispatch(dtype, [&](auto zero) {
    using T = decltype(zero);
    status = run<T, ferry::Fp8>(query, key_cache, value_cache, block_tables, block_table_stride,
                                query_start_loc, seq_lens, num_seqs, num_heads, num_kv_heads,
                                head_dim, block_size, scale, sliding_window, out, num_threads);
  });
  return status;
}

}  // extern "C"
