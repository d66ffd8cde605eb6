"""Hugging Face transformers as the reference: greedy tokens with the top-2 margin."""
from __future__ import annotations

from functools import lru_cache

import torch

NEAR_TIE = 1e-3  # top-2 logit gap below which float32 rounding may pick either token


@lru_cache(maxsize=8)
def hf_model(model_dir: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.eval()


@torch.inference_mode()
def hf_greedy(model_dir: str, prompt_ids: list[int], max_new_tokens: int) -> list[tuple[int, float]]:
    """Greedy continuation without EOS stopping: [(token, top1 - top2 logit gap), ...]."""
    model = hf_model(str(model_dir))
    ids = list(prompt_ids)
    out = []
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([ids])).logits[0, -1].float()
        top = torch.topk(logits, 2)
        token = int(top.indices[0])
        out.append((token, float(top.values[0] - top.values[1])))
        ids.append(token)
    return out


def assert_greedy_matches(ferry_tokens: list[int], reference: list[tuple[int, float]],
                          context: str = "") -> None:
    """Token-for-token equality, up to the first step where HF's top-2 is a near-tie
    (after a legitimate tie-break the continuations are different sequences)."""
    for step, (got, (want, margin)) in enumerate(zip(ferry_tokens, reference)):
        if got != want:
            assert margin < NEAR_TIE, (
                f"{context}: step {step}: ferry chose {got}, HF {want} with a top-2 gap of "
                f"{margin:.2e}\nferry: {ferry_tokens}\nHF:    {[t for t, _ in reference]}")
            return
    assert len(ferry_tokens) == len(reference), f"{context}: lengths differ"
