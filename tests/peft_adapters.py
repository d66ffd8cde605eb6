"""Random PEFT LoRA adapters for tiny models, and PEFT's merged model as the reference.

``init_lora_weights=False`` makes B random too (PEFT's default leaves B = 0, so an adapter
would equal the base model and a test would prove nothing).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(base_dir: str | Path, out_dir: str | Path, *, seed: int, r: int = 8,
                 alpha: float = 16, targets=tuple(ALL_MODULES), use_rslora: bool = False,
                 b_std: float = 0.05) -> Path:
    """Save a random LoRA adapter of ``base_dir`` under ``out_dir`` (PEFT's format)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets),
                        init_lora_weights=False, use_rslora=use_rslora, lora_dropout=0.0)
    model = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:   # sized so that outputs change but stay well-conditioned
                param.copy_(torch.randn(param.shape, generator=gen) * b_std)
    out_dir = Path(out_dir)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir


@lru_cache(maxsize=16)
def merged_model(base_dir: str, adapter_dir: str | None):
    """The base model with the adapter merged in by PEFT (``merge_and_unload``), float32."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter_dir is None:
        return base.eval()
    from peft import PeftModel

    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().eval()


@torch.inference_mode()
def merged_greedy(base_dir: str, adapter_dir: str | None, prompt: list[int], steps: int):
    """Greedy continuation of the merged model: [(token, log-softmax row, top-2 gap)]."""
    model = merged_model(str(base_dir), None if adapter_dir is None else str(adapter_dir))
    ids, out = list(prompt), []
    for _ in range(steps):
        logits = model(torch.tensor([ids])).logits[0, -1].float()
        top = torch.topk(logits, 2)
        out.append((int(top.indices[0]), torch.log_softmax(logits, -1),
                    float(top.values[0] - top.values[1])))
        ids.append(int(top.indices[0]))
    return out
