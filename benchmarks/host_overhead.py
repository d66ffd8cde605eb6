"""Host time per engine step: the work async scheduling hides behind the device.

A decode step has a device part (the forward, the logits, the sampling kernels) and a host
part (scheduling, building the batch's inputs, appending the tokens, stop checks,
detokenizing, building the outputs). With ``async_scheduling`` the host part of step N+1
runs while the device runs step N; without it the device waits for it every step. This
script times each part per decode step on the CPU, where it can run with no GPU: a model
small enough that the host part is what is left (Llama shape, hidden 64, 2 layers), B
streamed requests of 32 prompt and 128 output tokens, greedy. The host figures are the
same Python that runs on a GPU host, so they show how much an overlapped step can save.

    python benchmarks/host_overhead.py [--batch-sizes 1 16 64 256] [--json out.json]

Whether the output part grows with the output length (it must not for streams, which
read DELTA outputs) is ``benchmarks/output_path_overhead.py``'s question.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch

HOST_PARTS = ("schedule", "build_inputs", "update", "outputs")
DEVICE_PARTS = ("forward", "sample")


def build_model(path: Path, vocab: int) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    words = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(path)
    return path


class StepTimer:
    """Wraps the engine's stage functions and adds up their time within each step."""

    def __init__(self, engine) -> None:
        import ferry.runner.model_runner as model_runner

        self.current: dict[str, float] = defaultdict(float)
        self._wrap(engine.scheduler, "schedule", "schedule")
        self._wrap(engine.scheduler, "update_from_output", "update")
        self._wrap(engine.outputs, "process", "outputs")
        self._wrap(engine.outputs, "collect", "outputs")
        self._wrap(engine.executor.runner.model, "forward", "forward")
        self._wrap(engine.executor.runner.model, "compute_logits", "forward")
        self._wrap(engine.executor.runner.sampler, "sample", "sample")
        self._wrap(model_runner, "build_model_input", "build_inputs")

    def _wrap(self, owner, name: str, part: str) -> None:
        inner = getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.current[part] += time.perf_counter() - start
        setattr(owner, name, timed)

    @contextmanager
    def step(self):
        self.current = defaultdict(float)
        start = time.perf_counter()
        yield
        self.current["step"] = time.perf_counter() - start


def measure(model_dir: Path, batch_size: int, vocab: int) -> dict:
    from ferry import LLM, SamplingParams

    llm = LLM(str(model_dir), dtype="float32", max_num_seqs=max(batch_size, 1),
              kv_cache_memory="512MiB", async_scheduling="off", enable_prefix_caching=False)
    engine = llm.engine
    timer = StepTimer(engine)
    params = SamplingParams(temperature=0.0, max_tokens=128, ignore_eos=True)
    generator = torch.Generator().manual_seed(batch_size)
    for i in range(batch_size):
        prompt = torch.randint(3, vocab, (32,), generator=generator).tolist()
        engine.add_request(f"r{i}", {"prompt_token_ids": prompt}, params)
    decode_steps: list[dict[str, float]] = []
    while engine.has_unfinished_requests():
        with timer.step():
            outputs = engine.step()
        if len(outputs) == batch_size and all(len(o.outputs[0].token_ids) > 1 for o in outputs):
            decode_steps.append(dict(timer.current))   # every request decoded this step
    medians = {part: statistics.median(s.get(part, 0.0) for s in decode_steps) * 1e3
               for part in (*HOST_PARTS, *DEVICE_PARTS, "step")}
    host = sum(medians[p] for p in HOST_PARTS)
    return {"batch_size": batch_size, "decode_steps": len(decode_steps),
            "median_ms": medians, "host_ms": host,
            "host_us_per_request": host * 1e3 / batch_size,
            "other_ms": medians["step"] - host - medians["forward"] - medians["sample"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64, 256])
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp) / "model", args.vocab)
        rows = [measure(model_dir, b, args.vocab) for b in args.batch_sizes]
    print(f"{'batch':>6}{'schedule':>10}{'inputs':>9}{'update':>9}{'outputs':>9}"
          f"{'host ms':>9}{'us/req':>8}{'forward':>9}{'sample':>8}{'step ms':>9}")
    for r in rows:
        m = r["median_ms"]
        print(f"{r['batch_size']:>6}{m['schedule']:>10.3f}{m['build_inputs']:>9.3f}"
              f"{m['update']:>9.3f}{m['outputs']:>9.3f}{r['host_ms']:>9.3f}"
              f"{r['host_us_per_request']:>8.1f}{m['forward']:>9.3f}{m['sample']:>8.3f}"
              f"{m['step']:>9.3f}")
    if args.json:
        args.json.write_text(json.dumps({"benchmark": "host_overhead", "torch": torch.__version__,
                                         "threads": args.threads, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
