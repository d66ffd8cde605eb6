"""The fused C++ decoder stack (``kernels/cpu/decoder_stack.py``) against the layer-by-layer
forward it replaces, on the same tiny random checkpoints and paged caches: the same hidden
states, the same K/V written, and it runs exactly where it may (tests/test_models.py
checks both paths against HF)."""
from __future__ import annotations

import pytest
import torch

from ferry import kernels
from ferry.checkpoint import load_hf_config
from ferry.kernels.cpu import decoder_stack
from ferry.kernels.cpu import quant_linear as cpu_quant
from ferry.kernels.cpu.dense import max_kernel_rows
from ferry.models.loader import get_model
from ferry.quant.on_load_rtn import RtnWeightMethods
from paged_helpers import BlockAllocator, make_kv_caches, make_metadata

BLOCK_SIZE, NUM_BLOCKS = 4, 64

pytestmark = pytest.mark.skipif(kernels.prepare(torch.device("cpu")) != "cpu" or not max_kernel_rows(),
                                reason="needs the C++ CPU kernels with their AVX-512 GEMV")


@pytest.fixture
def stack_calls(monkeypatch) -> list[int]:
    """Rows of every step the fused stack ran."""
    calls: list[int] = []
    run = decoder_stack.F32DecoderStack.run

    def counted(self, hidden, *args):
        calls.append(hidden.shape[0])
        return run(self, hidden, *args)

    monkeypatch.setattr(decoder_stack.F32DecoderStack, "run", counted)
    return calls


def _model(path, weight_methods=None):
    return get_model(str(path), load_hf_config(str(path)), torch.float32, torch.device("cpu"),
                     weight_methods=weight_methods)


def _steps(vocab: int):
    """(seq, cached, new) per step: prefills, a chunk on a cached prefix beside decodes,
    decodes long enough to pass a sliding window of 6."""
    gen = torch.Generator().manual_seed(0)
    seqs = {key: torch.randint(7, vocab, (40,), generator=gen).tolist() for key in range(3)}
    steps = [[(0, 0, 9), (1, 0, 3)], [(0, 9, 1), (1, 3, 1), (2, 0, 11)]]
    steps += [[(0, 10 + i, 1), (1, 4 + i, 1), (2, 11 + i, 1)] for i in range(8)]
    return seqs, steps


@torch.inference_mode()
def _run(model, seqs, steps, fused: bool):
    """Every step's final hidden states, and the caches after the last step."""
    model.model.fused_layers.__init__()                # rebuilt (or not) on the next step
    if not fused:
        model.model.fused_layers._built = True         # built as "none": layer by layer
    alloc = BlockAllocator(NUM_BLOCKS, BLOCK_SIZE, seed=1)
    caches = make_kv_caches(model.num_layers, NUM_BLOCKS, BLOCK_SIZE, model.num_kv_heads,
                            model.head_dim, seed=2)
    outputs = []
    for step in steps:
        blocks = [alloc.grow(key, cached + new) for key, cached, new in step]
        meta, positions = make_metadata(blocks, [s[1] for s in step], [s[2] for s in step],
                                        BLOCK_SIZE)
        ids = torch.tensor([t for key, cached, new in step for t in seqs[key][cached:cached + new]])
        outputs.append(model(ids, positions, caches, meta))
    return outputs, caches


@pytest.mark.parametrize("arch, overrides, rtn", [
    ("llama", {}, None),
    ("qwen2", {}, None),                                       # q/k/v biases
    ("mistral", {"sliding_window": 6}, None),                  # a window the decodes pass
    ("llama", {}, (8, 32, True)),                              # int8 codes (wna16 kernel)
    ("qwen2", {}, (4, 32, False)),                             # int4, zero points, biases
    ("llama", {}, (8, 64, True, None, True)),                  # int8 activations (wna8 kernel)
    ("qwen2", {}, (4, 64, False, None, True)),
])
def test_fused_stack_equals_the_layers(arch, overrides, rtn, tiny_model_dir, stack_calls):
    methods = RtnWeightMethods(*rtn) if rtn else None
    model = _model(tiny_model_dir(arch, **overrides), methods)
    seqs, steps = _steps(model.vocab_size)
    want, want_caches = _run(model, seqs, steps, fused=False)
    assert stack_calls == []
    got, got_caches = _run(model, seqs, steps, fused=True)
    assert stack_calls == [sum(s[2] for s in step) for step in steps]
    for number, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=f"{arch} step {number}")
    for g, w in zip(got_caches, want_caches):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not cpu_quant.int8_activations_fit(64), reason="no AVX512-VNNI")
@pytest.mark.parametrize("bits", [8, 4])
def test_the_stack_takes_the_int8_activation_switch(bits, tiny_model_dir, stack_calls):
    """Fused with the switch = layers with it (above), and != fused without it: the
    Projection's flag reaches the C++ stack."""
    path = tiny_model_dir("llama")
    seqs, steps = _steps(_model(path).vocab_size)
    a8, _ = _run(_model(path, RtnWeightMethods(bits, 64, int8_activations=True)), seqs, steps, True)
    a16, _ = _run(_model(path, RtnWeightMethods(bits, 64)), seqs, steps, True)
    assert len(stack_calls) == 2 * len(steps)
    assert max(float((x - y).abs().max()) for x, y in zip(a8, a16)) > 1e-4


def test_what_the_stack_does_not_compute_runs_layer_by_layer(tiny_model_dir, stack_calls):
    qwen3 = _model(tiny_model_dir("qwen3"))                    # q/k norm: never fused
    seqs, steps = _steps(qwen3.vocab_size)
    _run(qwen3, seqs, steps[:3], fused=True)
    assert stack_calls == []
    llama = _model(tiny_model_dir("llama"))
    seqs, steps = _steps(llama.vocab_size)
    long_step = [[(0, 0, max_kernel_rows() // 2), (1, 0, max_kernel_rows() // 2 + 1)]]
    seqs = {key: seqs[key] * 10 for key in seqs}
    _run(llama, seqs, long_step, fused=True)                   # more rows than the GEMV takes
    assert stack_calls == []


def test_a_traced_step_runs_layer_by_layer(tiny_model_dir, stack_calls):
    model = _model(tiny_model_dir("llama"))
    seqs, steps = _steps(model.vocab_size)
    runner = model.model.fused_layers
    meta, positions = make_metadata([[0, 1, 2]], [0], [9], BLOCK_SIZE)
    caches = make_kv_caches(model.num_layers, NUM_BLOCKS, BLOCK_SIZE, model.num_kv_heads,
                            model.head_dim)
    hidden = torch.zeros(9, model.model.norm.weight.shape[0])
    meta.trace_rows = object()                                 # any traced row
    assert runner.run(model.model.layers, hidden, positions, caches, meta) is None
    meta.trace_rows = None
    assert runner.run(model.model.layers, hidden, positions, caches, meta) is not None


def test_weights_it_cannot_take_are_refused_with_the_reason(tiny_model_dir):
    from ferry.models import fused_decode
    model = _model(tiny_model_dir("llama"))
    layer = model.model.layers[0]
    tensors = [fused_decode._layer_tensors(layer)]
    tensors[0].o.weight = tensors[0].o.weight.contiguous()     # row-major
    shape = fused_decode.StackShape(
        hidden=layer.input_layernorm.weight.shape[0], num_heads=layer.self_attn.num_heads,
        num_kv_heads=layer.self_attn.num_kv_heads, head_dim=layer.self_attn.head_dim,
        intermediate=layer.mlp.down_proj.input_size, eps=1e-6, scale=1.0)
    assert decoder_stack.F32DecoderStack.build(shape, tensors,
                                               layer.self_attn.rotary_emb.cos_sin_cache) is None
    assert "o is not stored column-major" in decoder_stack.F32DecoderStack.why_not


def test_a_position_past_the_rotary_table_is_an_error(tiny_model_dir):
    model = _model(tiny_model_dir("llama"))
    meta, _ = make_metadata([[0]], [0], [1], BLOCK_SIZE)
    caches = make_kv_caches(model.num_layers, NUM_BLOCKS, BLOCK_SIZE, model.num_kv_heads,
                            model.head_dim)
    table = model.model.layers[0].self_attn.rotary_emb.cos_sin_cache.shape[0]
    with pytest.raises(IndexError, match="positions must lie"):
        with torch.inference_mode():
            model(torch.tensor([7]), torch.tensor([table]), caches, meta)
