"""Score a causal LM on demo problems with HF transformers greedy decoding.

This is the reference evaluation (HF ``generate``); the same problems can be
run through the ferry engine and must give the same accuracy.
"""

from __future__ import annotations

import torch

from ferry.demo.tasks import Problem

# Longest answer: 8 letters, or 4 digits; plus the end-of-turn token.
DEFAULT_MAX_NEW_TOKENS = 12


@torch.inference_mode()
def hf_greedy_answers(
    model,
    tokenizer,
    problems: list[Problem],
    batch_size: int = 50,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> list[str]:
    """Greedy-decode each problem's chat prompt and return the completion texts.

    Prompts are left-padded so the new tokens of a batch line up at the end.
    Special tokens (the end-of-turn EOS, padding) are dropped from the text.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model.eval()
    texts: list[str] = []
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        prompts = [
            tokenizer.apply_chat_template(p.messages, add_generation_prompt=True, return_dict=False)
            for p in chunk
        ]
        batch = _left_pad(prompts, tokenizer.pad_token_id)
        generated = model.generate(
            **batch,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )  # (B, prompt_len + new_len)
        new_tokens = generated[:, batch["input_ids"].shape[1] :]  # (B, new_len)
        texts.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return texts


def _left_pad(prompts: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)  # (B, T)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention_mask[row, width - len(ids) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}
