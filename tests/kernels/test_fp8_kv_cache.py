"""FP8 (e4m3) KV cache: the attention layer over an fp8 cache against a reference that
fake-quantizes K/V (k / k_scale rounded to e4m3 and back, in a float32 cache), on every
backend (PyTorch reference, C++ CPU, Triton under the interpreter); the block count
doubles; the engine's greedy tokens through chunked prefill and async scheduling equal
those of the fake-quantizing reference; ``auto`` follows the checkpoint."""
from __future__ import annotations

import dataclasses
import json
import shutil
from types import SimpleNamespace

import pytest
import torch

import ferry.kernels
from attention_cases import MIXED_QUERY_LENS, MIXED_SEQ_LENS, make_batch
from ferry import LLM, SamplingParams
from ferry.kernels import reference
from ferry.layers.attention import Attention
from ferry.runner import memory
from ferry.runner.kv_dtype import FP8_KV_DTYPE, resolve_kv_cache_dtype

FP8 = torch.float8_e4m3fn


def _fake_quant(x, scale):
    return (x / scale).clamp(-448, 448).to(FP8).float() * scale


def _slots(meta):
    """The cache slot of every new token (make_batch leaves them at 0)."""
    slots = []
    for seq, (qlen, seq_len) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
        for pos in range(seq_len - qlen, seq_len):
            block = int(meta.block_tables[seq, pos // meta.block_size])
            slots.append(block * meta.block_size + pos % meta.block_size)
    return torch.tensor(slots, dtype=torch.int64)


def _backends():
    backends = [("reference", reference)]
    import ferry.kernels.cpu as cpu
    if cpu.available():
        backends.append(("cpu", cpu))
    try:
        import ferry.kernels.triton as triton_ops
        from ferry.kernels.triton._common import interpreter_active
        if interpreter_active():
            backends.append(("triton", triton_ops))
    except ImportError:
        pass
    return backends


@pytest.mark.parametrize("backend", [name for name, _ in _backends()])
@pytest.mark.parametrize("scales", [(1.0, 1.0), (0.05, 2.5)])
def test_attention_over_fp8_cache_matches_fake_quantized_reference(monkeypatch, backend, scales):
    ops = dict(_backends())[backend]
    for name in ferry.kernels.OP_NAMES:
        monkeypatch.setattr(ferry.kernels, name, getattr(ops, name))
    heads, kv_heads, dim = 4, 2, 64
    meta, float_cache = make_batch(MIXED_QUERY_LENS, MIXED_SEQ_LENS, kv_heads, dim, torch.float32, "cpu")
    meta = dataclasses.replace(meta, slot_mapping=_slots(meta))
    tokens = sum(MIXED_QUERY_LENS)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(tokens, heads * dim, generator=gen)
    k = torch.randn(tokens, kv_heads * dim, generator=gen) * 3
    v = torch.randn(tokens, kv_heads * dim, generator=gen) * 3
    k_scale, v_scale = scales
    # the cached prefix, as it would have been written: fake-quantized in the float cache,
    # stored (divided by the scale) in the fp8 one
    float_cache = _fake_quant(float_cache, 1.0)
    fp8_cache = torch.empty_like(float_cache, dtype=FP8)
    fp8_cache[0] = (float_cache[0] / k_scale).clamp(-448, 448).to(FP8)
    fp8_cache[1] = (float_cache[1] / v_scale).clamp(-448, 448).to(FP8)
    float_cache[0] = fp8_cache[0].float() * k_scale
    float_cache[1] = fp8_cache[1].float() * v_scale
    layer = Attention(heads, kv_heads, dim, dim ** -0.5)
    layer.k_scale, layer.v_scale = k_scale, v_scale
    out = layer(q, k, v, fp8_cache, meta)
    # reference: the new tokens' K/V fake-quantized, float cache, plain attention
    reference.write_kv_cache(_fake_quant(k, k_scale).view(tokens, kv_heads, dim),
                             _fake_quant(v, v_scale).view(tokens, kv_heads, dim),
                             float_cache, meta.slot_mapping)
    expected = reference.paged_attention(q.view(tokens, heads, dim), float_cache, meta, dim ** -0.5)
    torch.testing.assert_close(out, expected.reshape(tokens, heads * dim), rtol=1e-4, atol=1e-4)
    # the written fp8 values are exactly the quantized inputs
    written = fp8_cache[0].view(-1, kv_heads, dim)[meta.slot_mapping[meta.slot_mapping >= 0]].float()
    valid = meta.slot_mapping >= 0
    torch.testing.assert_close(written * k_scale, _fake_quant(k, k_scale).view(tokens, kv_heads, dim)[valid])


@pytest.mark.parametrize("backend", [name for name, _ in _backends()])
@pytest.mark.parametrize("k_scale", [1.0, 0.05])
def test_debug_trace_over_fp8_cache_is_that_of_the_dequantized_keys(monkeypatch, backend,
                                                                     k_scale):
    """A step with traced rows over an fp8 cache: the layer records one trace, equal to the
    PyTorch op's on a float32 cache holding the dequantized keys (k' * k_scale) at the
    model's scale, with the backend's own trace kernel; the attention output is the same
    as in the step without traced rows."""
    from ferry.kernels.attention_trace import attention_trace, rows_of_sequences

    ops = dict(_backends())[backend]
    monkeypatch.setitem(ferry.kernels._ops_by_device_type, "cpu", ops)   # the trace too
    kernel_calls = _count_trace_kernel_calls(monkeypatch, backend)
    heads, kv_heads, dim = 6, 2, 32
    meta, float_cache = make_batch(MIXED_QUERY_LENS, MIXED_SEQ_LENS, kv_heads, dim, torch.float32,
                                   "cpu", seed=4)
    meta = dataclasses.replace(meta, slot_mapping=_slots(meta))
    tokens = sum(MIXED_QUERY_LENS)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(tokens, heads * dim, generator=gen) * 2
    k = torch.randn(tokens, kv_heads * dim, generator=gen) * 3 * k_scale
    v = torch.randn(tokens, kv_heads * dim, generator=gen)
    fp8_cache = torch.empty_like(float_cache, dtype=FP8)
    fp8_cache[0] = (float_cache[0] * 3).clamp(-448, 448).to(FP8)
    fp8_cache[1] = float_cache[1].to(FP8)
    layer = Attention(heads, kv_heads, dim, dim ** -0.5, sliding_window=9)
    layer.k_scale = k_scale
    plain = layer(q, k, v, fp8_cache.clone(), meta)
    rows = rows_of_sequences(meta, [0, 3], include_prompt=True, top_k=5)   # not every sequence
    traced_meta = dataclasses.replace(meta, trace_rows=rows, trace_out=[])
    out = layer(q, k, v, fp8_cache, traced_meta)
    torch.testing.assert_close(out, plain, rtol=0, atol=0)   # tracing changes nothing
    [trace] = traced_meta.trace_out
    assert kernel_calls == ([] if backend == "reference" else [0])   # its kernel, no fallback
    dequantized = fp8_cache.float()
    dequantized[0] *= k_scale
    want = attention_trace(q.view(tokens, heads, dim), dequantized, meta, dim ** -0.5, rows, 5, 9)
    torch.testing.assert_close(trace.entropy.cpu(), want.entropy, atol=1e-5, rtol=0)
    torch.testing.assert_close(trace.top_weights.cpu(), want.top_weights, atol=1e-6, rtol=0)
    assert torch.equal(trace.top_positions.cpu(), want.top_positions)


def _count_trace_kernel_calls(monkeypatch, backend: str) -> list[int]:
    """The calls into the backend's own trace kernel over an fp8 cache: the statuses of the
    compiled ``ferry_attention_trace_fp8`` (C++), a 0 per launch (Triton)."""
    calls: list[int] = []
    if backend == "cpu":
        from ferry.kernels.cpu._lib import functions

        kernel = functions().attention_trace_fp8
        monkeypatch.setattr(functions(), "attention_trace_fp8",
                            lambda *args: calls.append(kernel(*args)) or calls[-1])
    elif backend == "triton":
        import importlib   # by module path: the package attribute is the function

        triton_trace = importlib.import_module("ferry.kernels.triton.attention_trace")
        launch = triton_trace.launch
        monkeypatch.setattr(triton_trace, "launch",
                            lambda *args, **kw: calls.append(0) or launch(*args, **kw))
    return calls


def test_fp8_doubles_the_blocks_of_a_16_bit_cache():
    block16 = memory.kv_block_bytes(8, 8, 64, 16, torch.bfloat16)
    block8 = memory.kv_block_bytes(8, 8, 64, 16, FP8_KV_DTYPE)
    assert block16 == 2 * block8


def test_auto_follows_the_checkpoint_and_explicit_wins():
    plain = SimpleNamespace()
    ct = SimpleNamespace(quantization_config={
        "quant_method": "compressed-tensors",
        "kv_cache_scheme": {"type": "float", "num_bits": 8, "strategy": "tensor"}})
    int_kv = SimpleNamespace(quantization_config={"kv_cache_scheme": {"type": "int", "num_bits": 8}})
    assert resolve_kv_cache_dtype("auto", plain, torch.bfloat16) == torch.bfloat16
    assert resolve_kv_cache_dtype("auto", ct, torch.bfloat16) == FP8_KV_DTYPE
    assert resolve_kv_cache_dtype("auto", int_kv, torch.float32) == torch.float32
    assert resolve_kv_cache_dtype("fp8", plain, torch.float32) == FP8_KV_DTYPE


def _fake_quantizing_write(real):
    def write(key, value, kv_cache, slot_mapping):
        return real(_fake_quant(key, 1.0).to(key.dtype), _fake_quant(value, 1.0).to(value.dtype),
                    kv_cache, slot_mapping)
    return write


@pytest.mark.parametrize("async_scheduling", ["off", "on"])
def test_engine_greedy_tokens_match_fake_quantized_reference(tiny_model_dir, monkeypatch,
                                                             async_scheduling):
    model_dir = str(tiny_model_dir("llama"))
    prompts = [[5 + (7 * i + 3 * j) % 250 for j in range(n)] for i, n in enumerate((5, 19, 33))]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)

    def run(**kw):
        llm = LLM(model_dir, dtype="float32", kv_cache_memory="4MiB", block_size=4,
                  max_num_batched_tokens=8, async_scheduling=async_scheduling, **kw)  # chunked
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        assert llm.engine.get_stats().kv_cache_usage == 0.0
        return llm, [o.outputs[0].token_ids for o in outs]

    fp8_llm, fp8_tokens = run(kv_cache_dtype="fp8")
    assert fp8_llm.engine.executor.runner.kv_caches[0].dtype == FP8
    auto_llm, _ = run()
    # the same memory holds twice the blocks of a 16-bit cache, 4x those of float32
    assert fp8_llm.engine.runtime.num_blocks >= 3 * auto_llm.engine.runtime.num_blocks
    # The reference wraps the per-layer KV write: keep its layers from the fused stack.
    monkeypatch.setenv("FERRY_CPU_DECODER_STACK", "0")
    monkeypatch.setattr(ferry.kernels, "write_kv_cache", _fake_quantizing_write(ferry.kernels.write_kv_cache))
    _, expected = run()
    assert fp8_tokens == expected


def test_checkpoint_kv_scheme_selects_fp8_under_auto(tiny_model_dir, tmp_path, monkeypatch):
    path = tmp_path / "fp8kv"
    shutil.copytree(tiny_model_dir("llama"), path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "compressed-tensors", "config_groups": {},
                                     "kv_cache_scheme": {"type": "float", "num_bits": 8}}
    (path / "config.json").write_text(json.dumps(config))
    # a checkpoint whose weights are float and whose KV scheme is FP8, with its per-layer scales
    from safetensors.torch import load_file, save_file
    for shard in path.glob("*.safetensors"):
        tensors = load_file(shard)
        for i in range(config["num_hidden_layers"]):
            for name in ("k_scale", "v_scale"):
                tensors[f"model.layers.{i}.self_attn.{name}"] = torch.tensor(1.0)
        save_file(tensors, shard, metadata={"format": "pt"})
        break   # one shard holds them all
    llm = LLM(str(path), dtype="float32", kv_cache_memory="4MiB")
    assert llm.engine.executor.runner.kv_caches[0].dtype == FP8
    llm = LLM(str(path), dtype="float32", kv_cache_memory="4MiB", kv_cache_dtype="auto")
    assert llm.engine.executor.runner.kv_caches[0].dtype == FP8


@pytest.mark.parametrize("backend", [name for name, _ in _backends()])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_write_is_torchs_saturating_cast_bit_for_bit(backend, dtype):
    """Round to nearest even, saturating at 448, across the whole range (subnormals,
    binade edges, huge values)."""
    ops = dict(_backends())[backend]
    gen = torch.Generator().manual_seed(3)
    edges = torch.tensor([448., 460., 464., 500., -1e9, 2 ** -10, 3 * 2 ** -10, 1.9999, 0.0, -0.0,
                          2 ** -9 * 0.5, 2 ** -9 * 1.5, 15.5, -240.0])
    x = torch.cat([edges, torch.randn(4000, generator=gen) * 100,
                   torch.randn(2000, generator=gen) * 1e-3]).to(dtype)
    x = x[: x.numel() // 64 * 64].view(-1, 1, 64)
    cache = torch.zeros(2, x.shape[0], 1, 1, 64, dtype=FP8)
    ops.write_kv_cache(x, -x, cache, torch.arange(x.shape[0]))
    expected = x.float().clamp(-448, 448).to(FP8).view(torch.uint8)
    assert torch.equal(cache[0].view(torch.uint8).view_as(expected), expected)
    assert torch.equal(cache[1].float().view_as(x), (-x).float().clamp(-448, 448).to(FP8).float())


def test_fp8_is_refused_on_a_gpu_without_float8(monkeypatch):
    monkeypatch.setattr("ferry.platform.has_fp8_matmul", lambda device: False)
    with pytest.raises(ValueError, match="kv_cache_dtype=fp8 needs a GPU with float8"):
        resolve_kv_cache_dtype("fp8", SimpleNamespace(), torch.bfloat16, torch.device("cuda"))
    assert resolve_kv_cache_dtype("fp8", SimpleNamespace(), torch.float32, torch.device("cpu")) == FP8


def test_fp8_cache_kernels_are_in_the_aot_matrix_where_triton_has_e4m3():
    pytest.importorskip("triton")
    from ferry.tools import aot
    for target in aot.TARGETS:
        fp8 = {v.kernel_name for v in aot.all_variants(target, ["bf16"]) if "kv=fp8" in v.config}
        expected = ({"write_kv_cache_kernel", "paged_decode_kernel", "paged_prefill_kernel",
                     "attention_trace_kernel"}
                    if target in ("sm_90", "gfx942") else set())
        assert fp8 == expected, target
