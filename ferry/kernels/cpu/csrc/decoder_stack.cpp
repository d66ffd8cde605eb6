// Every decoder layer of a float32 decode step in one call: the same kernels the layers
// call one by one (f32_gemv.cpp or wna16.cpp for the projections, elementwise.cpp,
// paged_attention.cpp), in the same order,
// on the same inputs. Twin of the Python layers (models/common.py), checked against them in
// tests/kernels/test_cpu_decoder_stack.py.
//
// Why: a decode step of a small model is short (a few ms), and the Python around each of
// the ~10 kernel calls of a layer (module dispatch, argument checks, ctypes, new tensors)
// cost ~1.5 ms of it on 8 layers. Here a layer costs its kernels and nothing else; the
// checks ran once when the stack was built (decoder_stack.py) and once per step.
//
// Per layer, with the residual stream carried beside the hidden state as the Python does:
//   normed, residual = add_rms_norm(hidden, residual)   (rms_norm alone on layer 0)
//   q, k, v = split(normed Wqkv^T + b);  q, k = rotary(q, k)
//   cache[slots] = k, v;  attn = paged_attention(q, cache)
//   normed, residual = add_rms_norm(attn Wo^T + b, residual)
//   hidden = down(silu(gate) * up)
#include <algorithm>
#include <cstdint>
#include <cstring>

extern "C" {
int ferry_f32_gemv(const float* x, int64_t x_stride, int64_t rows, int64_t k, int64_t n,
                   const float* w, const float* bias, float* out, int num_threads);
int ferry_rms_norm(int dtype, const void* x, int64_t x_stride, const void* weight, float eps,
                   int64_t rows, int64_t width, void* out, int num_threads);
int ferry_fused_add_rms_norm(int dtype, const void* x, int64_t x_stride, const void* residual,
                             int64_t residual_stride, const void* weight, float eps,
                             int64_t rows, int64_t width, void* normed, void* summed,
                             int num_threads);
int ferry_apply_rotary(int dtype, const void* query, int64_t q_stride, const void* key,
                       int64_t k_stride, const int64_t* positions, const float* cos_sin_cache,
                       int64_t tokens, int64_t heads, int64_t kv_heads, int64_t dim,
                       void* q_out, void* k_out, int num_threads);
int ferry_silu_and_mul(int dtype, const void* x, int64_t x_stride, int64_t rows, int64_t inter,
                       void* out, int num_threads);
int ferry_write_kv_cache(int dtype, const void* key, int64_t k_stride, const void* value,
                         int64_t v_stride, const int64_t* slot_mapping, int64_t tokens,
                         int64_t width, void* key_cache, void* value_cache);
int ferry_wna16_gemm(int dtype, const void* x, int64_t x_stride, int64_t rows, int64_t k, int64_t n,
                     const uint8_t* qweight, const void* scales, const void* zeros, int bits,
                     int64_t group_size, const void* bias, void* out, int allow_simd,
                     int num_threads);
int ferry_wna8_gemm(int dtype, const void* x, int64_t x_stride, int64_t rows, int64_t k, int64_t n,
                    const uint8_t* qweight, const void* scales, const void* zeros, int bits,
                    int64_t group_size, const void* bias, void* out, int allow_simd,
                    int num_threads);
int ferry_wna8_fits(int64_t group_size);
int ferry_paged_attention(int dtype, const void* query, const void* key_cache,
                          const void* value_cache, const int32_t* block_tables,
                          int64_t block_table_stride, const int32_t* query_start_loc,
                          const int32_t* seq_lens, int64_t num_seqs, int64_t num_heads,
                          int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
                          float scale, int64_t sliding_window, void* out, int num_threads);
}

namespace {

constexpr int kFloat32 = 0;  // ferry::DType

// Field order matches decoder_stack.py's ctypes structures.
struct StackShape {
  int64_t hidden, num_heads, num_kv_heads, head_dim, intermediate, block_size, max_position;
  float eps, scale;
  const float* cos_sin_cache;  // (max_position, head_dim)
};

// A linear as its LinearMethod runs it (decoder_stack_spec.Projection).
struct Projection {
  int64_t kind;           // kF32 or kWna16
  const void* weight;     // kF32: float (in, out) storage; kWna16: the uint8 codes
  const float* bias;      // or null
  const float* scales;    // kWna16: (n, groups)
  const float* zeros;
  int64_t bits, group_size;
  int64_t int8_activations;  // kWna16: 1 runs wna8.cpp where it fits, as wna16_linear_a8
};
constexpr int64_t kF32 = 0, kWna16 = 1;

struct LayerWeights {
  const float *input_norm, *post_norm;
  Projection qkv, o, gate_up, down;
  float *key_cache, *value_cache;  // (blocks, block_size, Hkv, D)
  int64_t sliding_window;          // 0: none
};

// out (rows, n) = x (rows, k; row stride x_stride) through projection p.
int linear(const Projection& p, const float* x, int64_t x_stride, int64_t rows, int64_t k,
           int64_t n, float* out, int threads) {
  if (p.kind == kF32) {
    return ferry_f32_gemv(x, x_stride, rows, k, n, static_cast<const float*>(p.weight), p.bias,
                          out, threads);
  }
  if (p.kind == kWna16 && p.int8_activations && ferry_wna8_fits(p.group_size)) {
    return ferry_wna8_gemm(kFloat32, x, x_stride, rows, k, n, static_cast<const uint8_t*>(p.weight),
                           p.scales, p.zeros, static_cast<int>(p.bits), p.group_size, p.bias, out,
                           1, threads);
  }
  if (p.kind == kWna16) {
    return ferry_wna16_gemm(kFloat32, x, x_stride, rows, k, n,
                            static_cast<const uint8_t*>(p.weight), p.scales, p.zeros,
                            static_cast<int>(p.bits), p.group_size, p.bias, out, 1, threads);
  }
  return 1;
}

struct StepInputs {
  int64_t tokens, num_seqs, block_table_stride;
  const int64_t* positions;        // (tokens,)
  const int64_t* slot_mapping;     // (tokens,)
  const int32_t* block_tables;     // (num_seqs, block_table_stride)
  const int32_t* query_start_loc;  // (num_seqs + 1,)
  const int32_t* seq_lens;         // (num_seqs,)
};

// The step's intermediate tensors, carved from one scratch buffer (scratch_floats()).
struct Buffers {
  float *normed, *qkv, *q, *k, *attn, *gate_up, *act, *residual;
  Buffers(const StackShape& s, int64_t t, float* scratch) {
    const int64_t q_width = s.num_heads * s.head_dim, kv_width = s.num_kv_heads * s.head_dim;
    float* at = scratch;
    auto take = [&](int64_t n) { float* p = at; at += n; return p; };
    normed = take(t * s.hidden);
    qkv = take(t * (q_width + 2 * kv_width));
    q = take(t * q_width);
    k = take(t * kv_width);
    attn = take(t * q_width);
    gate_up = take(t * 2 * s.intermediate);
    act = take(t * s.intermediate);
    residual = take(t * s.hidden);
  }
};

int64_t scratch_floats(const StackShape& s, int64_t t) {
  const int64_t q_width = s.num_heads * s.head_dim, kv_width = s.num_kv_heads * s.head_dim;
  return t * (2 * s.hidden + (q_width + 2 * kv_width) + 2 * q_width + kv_width +
              3 * s.intermediate);
}

// The attention half: hidden (the normed input) -> attn (T, H*D) and the cache written.
int attention(const StackShape& s, const LayerWeights& w, const StepInputs& in, Buffers& b,
              int threads) {
  const int64_t t = in.tokens;
  const int64_t q_width = s.num_heads * s.head_dim, kv_width = s.num_kv_heads * s.head_dim;
  const int64_t qkv_width = q_width + 2 * kv_width;
  int status = linear(w.qkv, b.normed, s.hidden, t, s.hidden, qkv_width, b.qkv, threads);
  // q and k are the first columns of each qkv row, v the last: views with row stride qkv_width.
  status = status ? status : ferry_apply_rotary(kFloat32, b.qkv, qkv_width, b.qkv + q_width,
                                                qkv_width, in.positions, s.cos_sin_cache, t,
                                                s.num_heads, s.num_kv_heads, s.head_dim, b.q,
                                                b.k, threads);
  status = status ? status : ferry_write_kv_cache(kFloat32, b.k, kv_width,
                                                  b.qkv + q_width + kv_width, qkv_width,
                                                  in.slot_mapping, t, kv_width, w.key_cache,
                                                  w.value_cache);
  return status ? status : ferry_paged_attention(
      kFloat32, b.q, w.key_cache, w.value_cache, in.block_tables, in.block_table_stride,
      in.query_start_loc, in.seq_lens, in.num_seqs, s.num_heads, s.num_kv_heads, s.head_dim,
      s.block_size, s.scale, w.sliding_window, b.attn, threads);
}

// One layer: hidden (T, hidden) in and out; residual (T, hidden) carried (null on layer 0).
int layer(const StackShape& s, const LayerWeights& w, const StepInputs& in, float* hidden,
          float*& residual, Buffers& b, int threads) {
  const int64_t t = in.tokens, h = s.hidden;
  int status;
  if (residual == nullptr) {  // layer 0: the residual is the embedding itself
    std::memcpy(b.residual, hidden, sizeof(float) * t * h);
    residual = b.residual;
    status = ferry_rms_norm(kFloat32, hidden, h, w.input_norm, s.eps, t, h, b.normed, threads);
  } else {
    status = ferry_fused_add_rms_norm(kFloat32, hidden, h, residual, h, w.input_norm, s.eps, t, h,
                                      b.normed, residual, threads);
  }
  status = status ? status : attention(s, w, in, b, threads);
  const int64_t q_width = s.num_heads * s.head_dim;
  status = status ? status : linear(w.o, b.attn, q_width, t, q_width, h, hidden, threads);
  status = status ? status : ferry_fused_add_rms_norm(kFloat32, hidden, h, residual, h,
                                                      w.post_norm, s.eps, t, h, b.normed,
                                                      residual, threads);
  const int64_t inter = s.intermediate;
  status = status ? status : linear(w.gate_up, b.normed, h, t, h, 2 * inter, b.gate_up, threads);
  status = status ? status : ferry_silu_and_mul(kFloat32, b.gate_up, 2 * inter, t, inter, b.act,
                                                threads);
  return status ? status : linear(w.down, b.act, inter, t, inter, h, hidden, threads);
}

bool positions_valid(const StackShape& s, const StepInputs& in) {
  for (int64_t i = 0; i < in.tokens; ++i) {
    if (in.positions[i] < 0 || in.positions[i] >= s.max_position) return false;
  }
  return true;
}

}  // namespace

extern "C" {

// Floats of scratch a step of `tokens` rows needs.
int64_t ferry_f32_decoder_stack_scratch(const StackShape* shape, int64_t tokens) {
  return scratch_floats(*shape, tokens);
}

// hidden (tokens, hidden): the embeddings in, the last layer's MLP output out; residual
// (tokens, hidden) out: the residual stream after the last layer (the final norm adds it).
// Returns 0, 2 for a position outside the rotary table, or the failing kernel's code.
int ferry_f32_decoder_stack(const StackShape* shape, const LayerWeights* layers,
                            int64_t num_layers, const StepInputs* step, float* hidden,
                            float* residual_out, float* scratch, int num_threads) {
  const StackShape& s = *shape;
  if (!positions_valid(s, *step)) return 2;
  Buffers buffers(s, step->tokens, scratch);
  float* residual = nullptr;
  for (int64_t i = 0; i < num_layers; ++i) {
    const int status = layer(s, layers[i], *step, hidden, residual, buffers, num_threads);
    if (status) return status;
  }
  if (residual != nullptr) {
    std::memcpy(residual_out, residual, sizeof(float) * step->tokens * s.hidden);
  }
  return 0;
}

}  // extern "C"
