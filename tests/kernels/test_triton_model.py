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
    runner = llm.engine.executor.runner
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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA or ROCm GPU")
def test_async_launch_never_waits_for_the_device(tmp_path):
    """With async scheduling, ``launch`` must only queue work: a host sync inside it (a
    pageable copy, ``.item()``, an event wait) would stall the host until the step in
    flight ends, and the overlap would be gone. CUDA's sync debug mode turns any such sync
    into an error. Greedy tokens must still equal the synchronous engine's."""
    model_dir = str(make_tiny_model("llama", tmp_path / "llama"))
    rng = random.Random(2)
    prompts = [{"prompt_token_ids": [rng.randrange(3, 256) for _ in range(n)]} for n in (5, 17, 9)]
    params = [SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
              SamplingParams(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, max_tokens=8,
                             ignore_eos=True),
              SamplingParams(temperature=1.0, seed=3, min_tokens=2, max_tokens=8)]

    def generate(setting: str, strict: bool):
        llm = LLM(model_dir, dtype="float32", device="cuda", max_num_seqs=4,
                  gpu_memory_utilization=0.2, async_scheduling=setting)
        runner = llm.engine.executor.runner
        launch = runner.launch

        def strict_launch(sched):
            torch.cuda.set_sync_debug_mode("error")
            try:
                return launch(sched)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        if strict:
            runner.launch = strict_launch
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    overlapped = generate("on", strict=True)
    assert overlapped[0] == generate("off", strict=False)[0]
    assert all(len(tokens) == 8 for tokens in overlapped[:2])
