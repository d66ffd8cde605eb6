"""Calibration text for ``ferry quantize``: a local file, or the demo model's synthetic tasks.

No downloads. A file is split into paragraphs (blank lines) or, without any, lines; the
built-in text is the demo tasks' chats (question and answer) in the model's chat template.
"""
from __future__ import annotations

from pathlib import Path

import torch


def calibration_texts(tokenizer, calib_file: str | None, num_samples: int) -> list[str]:
    if calib_file:
        text = Path(calib_file).read_text()
        pieces = [p.strip() for p in text.split("\n\n") if p.strip()]
        if len(pieces) < 2:
            pieces = [line.strip() for line in text.splitlines() if line.strip()]
        if not pieces:
            raise ValueError(f"calibration file {calib_file} holds no text")
        return pieces[:num_samples]
    from ferry.demo.tasks import make_problems
    texts = []
    for problem in make_problems(num_samples, seed=7, split="train"):
        chat = problem.messages + [{"role": "assistant", "content": problem.answer}]
        try:
            texts.append(tokenizer.apply_chat_template(chat, tokenize=False))
        except Exception:  # noqa: BLE001 - a tokenizer without a chat template
            texts.append(f"{problem.question} {problem.answer}")
    return texts


def calibration_batches(tokenizer, texts: list[str], max_len: int) -> list[torch.Tensor]:
    """Each text as a (1, L) id tensor, L <= max_len."""
    out = []
    for text in texts:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[:, :max_len]
        if ids.shape[1]:
            out.append(ids)
    return out
