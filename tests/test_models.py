"""ferry's models against HF transformers on the same tiny random checkpoints.

Teacher-forced: for each token ferry computes (full prefill, a prefill chunk on top of
cached prefix blocks, decodes, many sequences flattened in one forward), its logits must
equal HF's logits at the same position of the same full sequence.
"""
from __future__ import annotations

from functools import lru_cache

import pytest
import torch

from ferry.checkpoint import load_hf_config
from ferry.models.loader import get_model
from paged_helpers import BlockAllocator, make_kv_caches, make_metadata

ARCHS = ["llama", "llama3", "mistral", "qwen2", "qwen3"]
BLOCK_SIZE = 4
NUM_BLOCKS = 96


@lru_cache(maxsize=None)
def _models(path: str, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM
    ferry_model = get_model(path, load_hf_config(path), dtype, torch.device("cpu"))
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return ferry_model, hf_model


@torch.inference_mode()
def hf_logits(hf_model, tokens: list[int]) -> torch.Tensor:
    return hf_model(torch.tensor([tokens])).logits[0].float()        # (L, V)


def assert_logits_close(got: torch.Tensor, want: torch.Tensor, context: str, rel: float = 1e-4):
    tol = rel * max(1.0, float(want.abs().max()))
    err = float((got - want).abs().max())
    assert err <= tol, f"{context}: max |ferry - HF| = {err:.2e} > {tol:.2e}"


class PagedRunner:
    """Drives a ferry model step by step over a shuffled paged cache, like the runner does."""

    def __init__(self, model, seed: int = 0):
        self.model = model
        self.alloc = BlockAllocator(NUM_BLOCKS, BLOCK_SIZE, seed=seed)
        self.caches = make_kv_caches(model.num_layers, NUM_BLOCKS, BLOCK_SIZE, model.num_kv_heads,
                                     model.head_dim, seed=seed)

    @torch.inference_mode()
    def step(self, batch: list[tuple[int, list[int], int, int]]) -> list[torch.Tensor]:
        """batch: (seq key, all its tokens, cached count, new count), decodes first.
        Returns each sequence's logits for its new tokens, (new, V)."""
        blocks = [self.alloc.grow(key, cached + new) for key, _, cached, new in batch]
        meta, positions = make_metadata(blocks, [b[2] for b in batch], [b[3] for b in batch], BLOCK_SIZE)
        input_ids = torch.tensor([t for _, toks, cached, new in batch for t in toks[cached:cached + new]])
        logits = self.model.compute_logits(self.model(input_ids, positions, self.caches, meta))
        assert logits.dtype == torch.float32
        return list(logits.split([b[3] for b in batch]))


def _tokens(seed: int, length: int, vocab: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(7, vocab, (length,), generator=gen).tolist()


@pytest.mark.parametrize("arch", ARCHS)
def test_full_prefill_matches_hf(arch, tiny_model_dir):
    model, hf = _models(str(tiny_model_dir(arch)))
    tokens = _tokens(1, 23, model.vocab_size)
    (got,) = PagedRunner(model).step([(0, tokens, 0, len(tokens))])
    assert_logits_close(got, hf_logits(hf, tokens), f"{arch} prefill")


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_chunks_and_decodes_match_hf(arch, tiny_model_dir):
    model, hf = _models(str(tiny_model_dir(arch)))
    seqs = {key: _tokens(10 + key, length, model.vocab_size)
            for key, length in {0: 16, 1: 27, 2: 5, 3: 13}.items()}
    runner = PagedRunner(model, seed=3)
    steps = [  # (seq, cached, new), decodes first as the runner orders them
        # fresh prefills, seq 1 only its first chunk (ends mid-block)
        [(0, 0, 13), (1, 0, 10), (2, 0, 4)],
        # decodes, then seq 1's second chunk on its cached prefix, then a new prompt
        [(0, 13, 1), (2, 4, 1), (1, 10, 14), (3, 0, 12)],
        # decodes, and seq 1's last chunk
        [(0, 14, 1), (3, 12, 1), (1, 24, 3)],
        [(0, 15, 1)],
    ]
    computed = {key: 0 for key in seqs}
    for number, step in enumerate(steps):
        batch = [(key, seqs[key], cached, new) for key, cached, new in step]
        for (key, tokens, cached, new), logits in zip(batch, runner.step(batch)):
            assert cached == computed[key]
            want = hf_logits(hf, tokens[:cached + new])[cached:]
            assert_logits_close(logits, want, f"{arch} step {number} seq {key}")
            computed[key] = cached + new
    assert computed == {key: len(tokens) for key, tokens in seqs.items()}


def _drive(runner: PagedRunner, hf, seqs: dict[int, list[int]], chunks: list[int], context: str):
    """Prefill each sequence in ``chunks`` sized pieces, then decode them all together to
    the end; every step's logits vs HF's."""
    computed = {key: 0 for key in seqs}
    for chunk in chunks:
        batch = [(k, t, computed[k], chunk) for k, t in seqs.items()]
        for (key, tokens, cached, new), logits in zip(batch, runner.step(batch)):
            assert_logits_close(logits, hf_logits(hf, tokens[:cached + new])[cached:], context)
            computed[key] += new
    while any(computed[k] < len(t) for k, t in seqs.items()):
        batch = [(k, t, computed[k], 1) for k, t in seqs.items() if computed[k] < len(t)]
        for (key, tokens, cached, _), logits in zip(batch, runner.step(batch)):
            assert_logits_close(logits, hf_logits(hf, tokens[:cached + 1])[cached:], f"{context} decode")
            computed[key] += 1


def test_mistral_sliding_window_longer_sequences(tiny_model_dir):
    from transformers import AutoModelForCausalLM
    path = str(tiny_model_dir("mistral"))
    model, hf = _models(path)
    assert model.sliding_window == 8
    seqs = {0: _tokens(30, 33, model.vocab_size), 1: _tokens(31, 26, model.vocab_size)}
    _drive(PagedRunner(model, seed=5), hf, seqs, chunks=[9, 11], context="mistral window")
    # the window must matter for these lengths, or this test would prove nothing
    hf_full = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, sliding_window=None).eval()
    gap = (hf_logits(hf, seqs[0]) - hf_logits(hf_full, seqs[0]))[-1].abs().max()
    assert gap > 1e-2


def test_qwen2_per_layer_sliding_window(tiny_model_dir):
    # transformers 5: layers >= max_window_layers slide, the others attend to everything
    path = str(tiny_model_dir("qwen2", use_sliding_window=True, sliding_window=5, max_window_layers=1,
                              layer_types=["full_attention", "sliding_attention"]))
    model, hf = _models(path)
    windows = [layer.self_attn.attn.sliding_window for layer in model.model.layers]
    assert windows == [None, 5]
    assert model.sliding_window is None  # mixed: some layer needs the full history
    seqs = {0: _tokens(40, 19, model.vocab_size), 1: _tokens(41, 14, model.vocab_size)}
    _drive(PagedRunner(model, seed=6), hf, seqs, chunks=[7], context="qwen2 mixed window")


def test_qwen2_sliding_window_off_when_not_used(tiny_model_dir):
    model, _ = _models(str(tiny_model_dir("qwen2")))
    assert model.sliding_window is None
    assert all(layer.self_attn.attn.sliding_window is None for layer in model.model.layers)


def test_llama3_long_positions(tiny_model_dir):
    # positions well past original_max_position_embeddings (64), where llama3 scaling bites
    model, hf = _models(str(tiny_model_dir("llama3")))
    tokens = _tokens(50, 150, model.vocab_size)
    runner = PagedRunner(model, seed=7)
    (first,) = runner.step([(0, tokens, 0, 120)])
    assert_logits_close(first, hf_logits(hf, tokens[:120]), "llama3 prefill")
    (rest,) = runner.step([(0, tokens, 120, 30)])
    assert_logits_close(rest, hf_logits(hf, tokens)[120:], "llama3 chunk")


def test_bfloat16_model_close_to_hf(tiny_model_dir):
    path = str(tiny_model_dir("qwen3"))
    model, hf = _models(path, torch.bfloat16)
    tokens = _tokens(60, 21, model.vocab_size)
    (got,) = PagedRunner(model).step([(0, tokens, 0, len(tokens))])
    want = hf_logits(hf, tokens)
    assert_logits_close(got, want, "qwen3 bf16", rel=0.1)
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean()
    assert agree >= 0.8


def test_wrong_number_of_kv_caches(tiny_model_dir):
    model, _ = _models(str(tiny_model_dir("llama")))
    meta, positions = make_metadata([[0]], [0], [2], BLOCK_SIZE)
    with pytest.raises(ValueError, match="KV caches"):
        model(torch.tensor([7, 8]), positions, [], meta)


@pytest.mark.parametrize("rope", [
    {"rope_type": "default", "rope_theta": 10000.0},
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0, "original_max_position_embeddings": 256},
])
def test_rope_frequencies_match_hf(rope):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from ferry.layers.rotary import compute_inv_freq, get_rope_parameters
    config = LlamaConfig(hidden_size=512, num_attention_heads=4, rope_scaling=dict(rope))
    if rope["rope_type"] == "default":
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
        want = LlamaRotaryEmbedding.compute_default_rope_parameters(config)[0]
    else:
        want = ROPE_INIT_FUNCTIONS[rope["rope_type"]](config, "cpu")[0]
    got = compute_inv_freq(128, get_rope_parameters(config))
    torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=0)


def test_rope_old_spelling_and_unknown_type():
    from types import SimpleNamespace
    from ferry.layers.rotary import compute_inv_freq, get_rope_parameters
    old = SimpleNamespace(rope_theta=1234.0, rope_scaling={"type": "linear", "factor": 2.0})
    params = get_rope_parameters(old)
    assert params["rope_type"] == "linear" and params["rope_theta"] == 1234.0
    plain = SimpleNamespace(rope_theta=1234.0, rope_scaling=None)
    assert get_rope_parameters(plain) == {"rope_type": "default", "rope_theta": 1234.0}
    with pytest.raises(ValueError, match="unsupported rope type 'yarn'"):
        compute_inv_freq(64, {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0})
