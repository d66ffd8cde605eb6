"""A model that fails to load with TP=2 (gloo, 2 processes): the caller gets rank 0's own
error, not "a worker exited", and the workers are gone.

- heads that do not divide by 2 (3 attention heads): refused before any worker starts;
- FP8 128x128 blocks that each rank's k/v rows (64 of head_dim 64) would split: every
  rank fails while building its layers. The worker monitor used to end the process
  (``os._exit``) moments after ``LLM()`` had raised; now the caller keeps its process,
  which then starts a TP=2 model that loads (rank 0's group was torn down).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ferry import LLM
from process_tree import worker_pids
from quant_cases import write_fp8_blocks_split_by_ranks

SCRIPT = textwrap.dedent('''
    import os, sys, time
    from ferry import LLM, SamplingParams
    from process_tree import alive, worker_pids

    def start(path):
        return LLM(path, dtype="float32", kv_cache_memory="4MiB", max_model_len=64,
                   tensor_parallel_size=2, distributed_timeout_seconds=30)

    if __name__ == "__main__":
        try:
            start(sys.argv[1])
        except ValueError as exc:
            print("raised:", exc, flush=True)
        time.sleep(2)   # longer than a worker's exit takes to reach the monitor
        print("workers left:", [p for p in worker_pids(os.getpid()) if alive(p)], flush=True)
        llm = start(sys.argv[2])
        out = llm.generate([{"prompt_token_ids": [5, 6, 7]}],
                           SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True),
                           use_tqdm=False)
        print("then generated:", len(out[0].outputs[0].token_ids), flush=True)
        llm.engine.executor.shutdown()
        sys.exit(3)   # the script's own non-zero code: the process was not ended for it
''')


def test_heads_that_do_not_divide_are_refused_before_any_worker_starts(tiny_model_dir):
    path = tiny_model_dir("llama", hidden_size=48, num_attention_heads=3, num_key_value_heads=1,
                          head_dim=16)
    with pytest.raises(ValueError, match="num_attention_heads=3 does not divide by "
                                         "tensor_parallel_size=2"):
        LLM(str(path), dtype="float32", kv_cache_memory="4MiB", tensor_parallel_size=2)
    assert worker_pids(os.getpid()) == []


def test_a_load_failing_on_every_rank_raises_rank0s_error_and_leaves_no_workers(
        tiny_model_dir, tmp_path):
    bad = write_fp8_blocks_split_by_ranks(tiny_model_dir, tmp_path)
    script = tmp_path / "start.py"
    script.write_text(SCRIPT)
    pythonpath = os.pathsep.join([str(Path(__file__).parent), *sys.path])
    proc = subprocess.run([sys.executable, str(script), str(bad), str(tiny_model_dir("llama"))],
                          capture_output=True, text=True, timeout=90,
                          env={**os.environ, "PYTHONPATH": pythonpath})
    output = proc.stdout + proc.stderr[-3000:]
    assert proc.returncode == 3, output
    assert ("raised: model.layers.0.self_attn.qkv_proj: output sizes [128, 64, 64] are not "
            "multiples of weight_block_size 128 (this rank's share with tensor parallelism"
            in proc.stdout), output
    assert "workers left: []" in proc.stdout and "then generated: 2" in proc.stdout, output
    assert "ferry: fatal" not in proc.stderr, output
