"""Quality of quantized variants of the demo model, measured with ferry itself.

For each variant: the perplexity of held-out demo-task chats (teacher-forced logits of one
prefill through ferry's model), greedy task accuracy on the test split through ``LLM``,
and the bytes of the weights. ``python scripts/quant_quality.py [--out DIR]`` makes the
variants with ``ferry quantize`` (RTN / GPTQ / AWQ at 4 bits, RTN at 8 bits), adds fp32,
bf16, on-load fp8 weights and the fp32 model with an FP8 KV cache (``kv_cache_dtype: fp8``,
scales 1.0), and prints the markdown table of docs/quantization.md. ``--only TEXT`` measures
just the variants whose label contains TEXT (the fp32 reference logits are always made).
"""
from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch


def eval_texts(tokenizer, n: int = 64) -> list[tuple[list[int], int]]:
    """(chat token ids, length of its prompt) of ``n`` held-out demo problems with answers."""
    from ferry.demo.tasks import make_problems
    out = []
    for p in make_problems(n, seed=11, split="test"):
        chat = p.messages + [{"role": "assistant", "content": p.answer}]
        ids = tokenizer.apply_chat_template(chat, tokenize=True, return_dict=False)
        prompt = tokenizer.apply_chat_template(p.messages, add_generation_prompt=True,
                                               tokenize=True, return_dict=False)
        out.append((ids, len(prompt)))
    return out


@torch.inference_mode()
def ferry_logits(model_dir, token_lists, dtype=torch.float32, quant_type="auto",
                 kv_dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """Each chat's teacher-forced logits (L, V) float32 from one ferry prefill; the paged
    attention reads K/V back from a cache of ``kv_dtype`` (None: the model dtype)."""
    from ferry.checkpoint import load_hf_config
    from ferry.models.loader import get_model
    from ferry.outputs import ScheduledRequest
    from ferry.quant import resolve_quantization
    from ferry.runner.input_batch import ScheduledState, build_model_input
    from ferry.runner.model_runner import allocate_kv_caches
    from ferry.runner.request_states import RequestState
    from ferry.sampling_params import SamplingParams

    hf_config = load_hf_config(model_dir)
    quant = resolve_quantization(hf_config, quant_type)
    cpu = torch.device("cpu")
    model = get_model(Path(model_dir), hf_config, dtype, cpu, weight_methods=quant.weight_methods)
    out, block = [], 16
    for ids, _ in token_lists:
        blocks = -(-len(ids) // block)
        caches = allocate_kv_caches(model, blocks, block, kv_dtype or dtype, cpu)
        state = RequestState("ppl", len(ids), SamplingParams(), (), list(ids), list(range(blocks)))
        step = ScheduledState(ScheduledRequest("ppl", list(ids), 0, True), state)
        batch = build_model_input([step], block, cpu)
        hidden = model(batch.input_ids, batch.positions, caches, batch.attn_metadata)
        out.append(model.compute_logits(hidden).float())
    return out


def answer_perplexity(logits: list[torch.Tensor], token_lists) -> float:
    """exp(mean NLL of the answer tokens): the tokens after each prompt."""
    nll, count = 0.0, 0
    for lg, (ids, prompt_len) in zip(logits, token_lists):
        logp = torch.log_softmax(lg[prompt_len - 1:-1], dim=-1)
        target = torch.tensor(ids[prompt_len:])
        nll -= float(logp.gather(1, target[:, None]).sum())
        count += len(target)
    return math.exp(nll / count)


def kl_to(reference: list[torch.Tensor], logits: list[torch.Tensor]) -> float:
    """Mean per-token KL(reference || model) over every position of every chat (nats)."""
    total, count = 0.0, 0
    for ref, lg in zip(reference, logits):
        p = torch.log_softmax(ref, -1)
        q = torch.log_softmax(lg, -1)
        total += float((p.exp() * (p - q)).sum())
        count += ref.shape[0]
    return total / count


def ferry_perplexity(model_dir, token_lists, dtype=torch.float32, quant_type="auto") -> float:
    """Answer perplexity of ``model_dir`` as ferry runs it."""
    return answer_perplexity(ferry_logits(model_dir, token_lists, dtype, quant_type), token_lists)


def task_accuracy(model_dir, n: int = 120, **llm_kwargs) -> float:
    from ferry import LLM, SamplingParams
    from ferry.demo.tasks import check, make_problems
    llm = LLM(str(model_dir), kv_cache_memory="64MiB", **llm_kwargs)
    problems = make_problems(n, seed=3, split="test")
    outs = llm.chat([p.messages for p in problems], SamplingParams(temperature=0.0, max_tokens=24))
    return sum(check(p, o.outputs[0].text) for p, o in zip(problems, outs)) / n


def weight_bytes(model_dir, quant_type="auto", dtype=torch.float32) -> int:
    """Bytes of the linears' weights as ferry holds them (projections only)."""
    from ferry.checkpoint import load_hf_config
    from ferry.models.loader import get_model
    from ferry.quant import resolve_quantization
    hf_config = load_hf_config(model_dir)
    quant = resolve_quantization(hf_config, quant_type)
    model = get_model(Path(model_dir), hf_config, dtype, torch.device("cpu"),
                      weight_methods=quant.weight_methods)
    total = 0
    for name, module in model.named_modules():
        if name.endswith(("qkv_proj", "o_proj", "gate_up_proj", "down_proj")):
            total += sum(t.numel() * t.element_size() for t in
                         list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
                         if t is not module.bias)
    return total


def main() -> None:
    from ferry.checkpoint import load_tokenizer
    from ferry.demo import demo_model_path
    from ferry.quant.quantize.pipeline import QuantizeOptions, quantize_checkpoint

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--group-size", type=int, default=16)
    parser.add_argument("--only", default="", help="measure only the variants whose label has this")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="ferry-quant-"))
    demo = demo_model_path()
    texts = eval_texts(load_tokenizer(str(demo)))
    g = args.group_size
    variants = {"fp32": (demo, {}, "auto", torch.float32), "bf16": (demo, {"dtype": "bfloat16"}, "auto", torch.bfloat16)}
    quantized = {f"RTN int4 g{g}": QuantizeOptions("rtn", 4, g, True),
                 f"GPTQ int4 g{g}": QuantizeOptions("gptq", 4, g, True),
                 f"AWQ int4 g{g}": QuantizeOptions("awq", 4, g, False),
                 f"RTN int8 g{g}": QuantizeOptions("rtn", 8, g, True)}
    for label, opts in quantized.items():
        if args.only not in label:
            continue
        path = out / label.replace(" ", "_")
        if not (path / "config.json").exists():
            start = time.perf_counter()
            quantize_checkpoint(demo, path, opts)
            print(f"# {label}: quantized in {time.perf_counter() - start:.1f}s", flush=True)
        variants[label] = (path, {}, "auto", torch.float32)
    variants["FP8 weights (on load, W8A8 per-token)"] = (demo, {"quant_type": "fp8"}, "fp8", torch.float32)
    variants["FP8 KV cache (fp32 weights, scales 1.0)"] = (demo, {"kv_cache_dtype": "fp8"}, "auto", torch.float32)
    print("| weights | answer perplexity | KL to fp32 (nats/token) | task accuracy (120 test problems) | linear weight bytes |")
    print("|---|---|---|---|---|")
    reference = ferry_logits(demo, texts)
    for label, (path, kwargs, qt, dtype) in variants.items():
        if args.only not in label:
            continue
        kv_dtype = torch.float8_e4m3fn if kwargs.get("kv_cache_dtype") == "fp8" else None
        logits = ferry_logits(path, texts, dtype, qt, kv_dtype)
        acc = task_accuracy(path, **kwargs)
        size = weight_bytes(path, qt, dtype)
        print(f"| {label} | {answer_perplexity(logits, texts):.6f} | {kl_to(reference, logits):.2e} "
              f"| {acc:.1%} | {size / 2**20:.2f} MiB |", flush=True)


if __name__ == "__main__":
    main()
