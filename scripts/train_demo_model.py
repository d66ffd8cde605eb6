"""Train the bundled demo model (a tiny Llama) on the synthetic demo tasks.

Runs on the CPU in about 8-9 minutes on 2 idle cores and writes a complete HF model
dir (safetensors weights, config, generation config, tokenizer with chat
template) that ``ferry serve`` uses when no model is given.

    python scripts/train_demo_model.py                      # train + evaluate
    python scripts/train_demo_model.py --eval-only          # evaluate the shipped model

Training is deterministic for a given --seed and --threads: fixed data order,
seeded init, deterministic kernels.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

# Run from a checkout without installing ferry: make the repo root importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ferry.demo import DEMO_MODEL_DIR  # noqa: E402
from ferry.demo.evaluate import hf_greedy_answers  # noqa: E402
from ferry.demo.tasks import TASK_KINDS, accuracy_by_kind, make_problems  # noqa: E402
from ferry.demo.tokenizer import build_demo_tokenizer  # noqa: E402

# Addition is the hardest task, so it gets half of the training examples.
TRAIN_KIND_MIX = ("add", "reverse", "add", "upper")
TOKENIZER_CORPUS_SIZE = 3000
IGNORE_INDEX = -100


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEMO_MODEL_DIR, help="model dir to write (or read with --eval-only)")
    parser.add_argument("--steps", type=int, default=2400, help="optimizer steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--eval-n", type=int, default=200, help="held-out problems to evaluate")
    parser.add_argument("--eval-only", action="store_true", help="skip training; evaluate the model in --out")
    args = parser.parse_args()
    for name in ("steps", "batch_size", "threads", "eval_n"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def model_config(tokenizer) -> LlamaConfig:
    """A few-million-parameter Llama with grouped-query attention (4 q heads, 2 kv heads)."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def encode_example(tokenizer, problem) -> tuple[list[int], list[int]]:
    """Token ids of prompt + answer + <|end|>, and labels that score only the answer."""
    prompt = tokenizer.apply_chat_template(problem.messages, add_generation_prompt=True, return_dict=False)
    chat = problem.messages + [{"role": "assistant", "content": problem.answer}]
    full = tokenizer.apply_chat_template(chat, return_dict=False)
    if full[: len(prompt)] != prompt:
        raise RuntimeError("chat template: the prompt is not a prefix of the full chat")
    labels = [IGNORE_INDEX] * len(prompt) + full[len(prompt) :]
    return full, labels


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padding is masked out of attention and loss."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)  # (B, T)
    for row, (ids, labs) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def lr_lambda(warmup_steps: int, total_steps: int):
    """Linear warmup, then cosine decay to 10% of the peak."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def train(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    corpus = make_problems(TOKENIZER_CORPUS_SIZE, args.seed, "train")
    tokenizer = build_demo_tokenizer(p.question + " " + p.answer for p in corpus)
    model = LlamaForCausalLM(model_config(tokenizer))
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, vocab {len(tokenizer)}")

    # Fixed data order: the whole run's examples are drawn up front from the seed.
    problems = make_problems(args.steps * args.batch_size, args.seed, "train", kinds=TRAIN_KIND_MIX)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.warmup_steps, args.steps))
    model.train()
    start = time.perf_counter()
    progress = tqdm(range(args.steps), desc="train", mininterval=5.0)
    for step in progress:
        chunk = problems[step * args.batch_size : (step + 1) * args.batch_size]
        batch = collate([encode_example(tokenizer, p) for p in chunk], tokenizer.pad_token_id)
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        progress.set_postfix(loss=f"{loss.item():.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", refresh=False)
    minutes = (time.perf_counter() - start) / 60
    print(f"trained {args.steps} steps x {args.batch_size} examples in {minutes:.1f} min")
    save(model, tokenizer, args.out)


def save(model: LlamaForCausalLM, tokenizer, out: Path) -> None:
    """Write float32 safetensors weights, config, generation config and tokenizer."""
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    _inline_chat_template(out, tokenizer.chat_template)
    _add_legacy_config_keys(out)
    for path in out.iterdir():
        path.chmod(0o644)  # safetensors writes 0600; the package data must be world-readable
    size_mb = sum(f.stat().st_size for f in out.iterdir()) / 1e6
    print(f"saved to {out} ({size_mb:.1f} MB)")


def _inline_chat_template(out: Path, chat_template: str) -> None:
    # transformers 5 writes the template to chat_template.jinja; older readers
    # (and other engines) look for it in tokenizer_config.json, so put it there too.
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = chat_template
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def _add_legacy_config_keys(out: Path) -> None:
    # transformers 5 writes rope_parameters and dtype; readers written for
    # transformers 4 look for rope_theta and torch_dtype. Both spellings agree.
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config.setdefault("rope_theta", config["rope_parameters"]["rope_theta"])
    config.setdefault("torch_dtype", config["dtype"])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def evaluate(out: Path, n: int, seed: int) -> dict[str, float]:
    """Greedy HF accuracy of the saved model on ``n`` held-out problems."""
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    problems = make_problems(n, seed, "test", kinds=TASK_KINDS)
    completions = hf_greedy_answers(model, tokenizer, problems)
    accuracy = accuracy_by_kind(problems, completions)
    for kind, value in sorted(accuracy.items()):
        print(f"held-out accuracy {kind:8s} {value:6.1%}")
    for problem, text in list(zip(problems, completions))[:6]:
        print(f"  {problem.question!r} -> {text!r} (want {problem.answer!r})")
    return accuracy


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if not args.eval_only:
        train(args)
    evaluate(args.out, args.eval_n, args.seed)


if __name__ == "__main__":
    main()
