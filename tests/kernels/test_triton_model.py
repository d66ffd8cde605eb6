"""The whole engine with every op on the Triton kernels, against Hugging Face transformers.

The attention layer, norms, rotary and MLP call ops through ``ferry.kernels``; here those
names are pointed at ``ferry.kernels.triton`` (what the dispatcher selects on a GPU), and
greedy tokens must equal HF's on the same random weights: prefill, chunked prefill on a
cached prefix and decode, with and without a sliding window. Without a GPU the kernels run
through Triton's interpreter on the CPU (TRITON_INTERPRET=1, set before triton's import).
"""
from __future__ import annotations

import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before the first `import triton`

pytest.importorskip("triton")

import ferry.kernels  # noqa: E402
import ferry.kernels.triton as triton_ops  # noqa: E402
from ferry import LLM, SamplingParams  # noqa: E402
from ferry.kernels.triton._common import interpreter_active  # noqa: E402
from hf_reference import assert_greedy_matches, hf_greedy  # noqa: E402
from tiny_models import make_tiny_model  # noqa: E402

MAX_NEW = 6

if torch.cuda.is_available():
    DEVICE = "cuda"
elif interpreter_active():
    DEVICE = "cpu"
else:
    DEVICE = None   # triton imported without the interpreter: the kernel tests cover this


@pytest.fixture
def triton_kernels(monkeypatch):
    """Route every op of ``ferry.kernels`` to its Triton twin for one test."""
    for name in ferry.kernels.OP_NAMES:
        monkeypatch.setattr(ferry.kernels, name, getattr(triton_ops, name))


@pytest.mark.skipif(DEVICE is None, reason="no GPU and triton's interpreter is off in this process")
@pytest.mark.parametrize("arch", ["llama", "mistral"])     # mistral: sliding window 8
def test_greedy_tokens_match_hf_on_triton_kernels(tmp_path, triton_kernels, arch):
    model_dir = str(make_tiny_model(arch, tmp_path / arch))
    rng = random.Random(0)
    prefix = [rng.randrange(3, 256) for _ in range(12)]
    prompts = [prefix + [rng.randrange(3, 256) for _ in range(n)] for n in (3, 9)]
    # Small chunks: the second prompt is prefilled in pieces on top of its cached prefix.
    llm = LLM(model_dir, dtype="float32", device=DEVICE, kv_cache_memory="16MiB",
              max_num_batched_tokens=8, block_size=4)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        assert_greedy_matches(output.outputs[0].token_ids, hf_greedy(model_dir, prompt, MAX_NEW), arch)


@pytest.mark.skipif(DEVICE is None, reason="no GPU and triton's interpreter is off in this process")
def test_decode_graph_steps_match_hf_on_triton_kernels(tmp_path, triton_kernels):
    """Decode graphs with the Triton kernels: the decode kernel is planned at capture for
    max_model_len (512), so it splits the context into partitions and short sequences
    leave most of them empty. On a GPU this captures real graphs; without one, the
    stand-in replays the recorded forward (see tests/engine/test_decode_graphs.py)."""
    from ferry.runner.cuda_graphs import EagerReplay

    model_dir = str(make_tiny_model("llama", tmp_path / "llama"))
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 256) for _ in range(n)] for n in (5, 11, 8)]
    llm = LLM(model_dir, dtype="float32", device=DEVICE, kv_cache_memory="16MiB", max_num_seqs=4,
              enforce_eager=True)
    runner = llm.engine.runner
    capture = None if DEVICE == "cuda" else EagerReplay()
    assert runner.capture_decode_graphs(max_num_seqs=4, max_model_len=llm.engine.max_model_len,
                                        capture=capture)
    graphs, replayed = runner.decode_graphs, []
    try_run = graphs.try_run
    graphs.try_run = lambda *args: replayed.append(try_run(*args)) or replayed[-1]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (4, 6, 2)]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert sum(r is not None for r in replayed) >= 3        # the decode steps took graphs
    for prompt, output, p in zip(prompts, outputs, params):
        assert_greedy_matches(output.outputs[0].token_ids, hf_greedy(model_dir, prompt, p.max_tokens),
                              "llama")
