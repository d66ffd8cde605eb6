"""Read and check a PEFT LoRA adapter's ``adapter_config.json`` (pure Python).

What ferry serves: plain LoRA (``peft_type`` LORA) on the attention and MLP projections
(q/k/v/o/gate/up/down), any rank up to ``max_lora_rank``, ``lora_alpha`` scaling or
rsLoRA (alpha / sqrt(r)). Everything else PEFT can train changes the model in ways the
segmented kernels do not compute, so it is refused with the reason, before the adapter
becomes visible: DoRA, extra trained modules (``modules_to_save``), trained biases,
per-module rank/alpha patterns, ``fan_in_fan_out`` weights and pickle-only checkpoints.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The projections of ferry's decoder a LoRA may target (HF module names).
SUPPORTED_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")


class LoRAError(ValueError):
    """An adapter that cannot be served; the message says why (an HTTP 400)."""


class LoRANotFoundError(LoRAError):
    """No adapter at that path, or no adapter of that name (an HTTP 404)."""


@dataclass(frozen=True)
class AdapterConfig:
    """The parts of ``adapter_config.json`` that decide the computation."""

    rank: int
    lora_alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...] | str    # names, or PEFT's regex form
    base_model_name_or_path: str | None

    @property
    def scaling(self) -> float:
        """The factor on B A: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.lora_alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def check_adapter_dir(path: Path) -> None:
    """The directory holds a config and safetensors weights (not only a pickle)."""
    if not path.is_dir():
        raise LoRANotFoundError(f"no LoRA adapter at {path}: not a directory")
    if not (path / CONFIG_FILE).is_file():
        raise LoRAError(f"{path} is not a PEFT adapter: {CONFIG_FILE} is missing")
    if not (path / WEIGHTS_FILE).is_file():
        pickles = [name for name in PICKLE_FILES if (path / name).exists()]
        if pickles:
            raise LoRAError(f"{path} has only {pickles[0]}, a pickle file, which ferry never "
                            f"loads (it can run code); save the adapter as {WEIGHTS_FILE} "
                            "(PEFT's save_pretrained(safe_serialization=True))")
        raise LoRAError(f"{path} is not a PEFT adapter: {WEIGHTS_FILE} is missing")


def read_adapter_config(path: Path, max_lora_rank: int) -> AdapterConfig:
    """Parse and check ``path/adapter_config.json``; :class:`LoRAError` says what is wrong."""
    check_adapter_dir(path)
    try:
        raw = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoRAError(f"{path / CONFIG_FILE} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise LoRAError(f"{path / CONFIG_FILE} must hold a JSON object")
    _refuse_unsupported(raw)
    rank = raw.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise LoRAError(f"adapter_config.json: r must be a positive integer, got {rank!r}")
    if rank > max_lora_rank:
        raise LoRAError(f"adapter rank r={rank} is above max_lora_rank={max_lora_rank}; "
                        "start the server with a larger --max-lora-rank")
    alpha = raw.get("lora_alpha", 8)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise LoRAError(f"adapter_config.json: lora_alpha must be a number, got {alpha!r}")
    targets = raw.get("target_modules") or ()
    if isinstance(targets, list):
        unknown = sorted(set(targets) - set(SUPPORTED_MODULES))
        if unknown:
            raise LoRAError(f"adapter targets {unknown}, which this model does not have as LoRA "
                            f"targets; ferry applies LoRA to {', '.join(SUPPORTED_MODULES)}")
        targets = tuple(targets)
    return AdapterConfig(rank, float(alpha), bool(raw.get("use_rslora", False)), targets,
                         raw.get("base_model_name_or_path"))


def _refuse_unsupported(raw: dict[str, Any]) -> None:
    """Refuse the PEFT options whose computation ferry does not do, naming each."""
    peft_type = str(raw.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise LoRAError(f"peft_type {peft_type!r} is not served; only LoRA adapters are")
    checks = [
        (raw.get("use_dora"), "DoRA adapters (use_dora) are not supported"),
        (raw.get("modules_to_save"), f"modules_to_save={raw.get('modules_to_save')!r}: adapters "
                                     "that retrain whole modules are not supported"),
        (raw.get("bias", "none") not in ("none", None), f"bias={raw.get('bias')!r}: trained "
                                                        "biases are not supported"),
        (raw.get("lora_bias"), "lora_bias: trained LoRA biases are not supported"),
        (raw.get("rank_pattern"), "rank_pattern (per-module ranks) is not supported"),
        (raw.get("alpha_pattern"), "alpha_pattern (per-module alphas) is not supported"),
        (raw.get("fan_in_fan_out"), "fan_in_fan_out weights (Conv1D layouts) are not supported"),
        (raw.get("layer_replication"), "layer_replication is not supported"),
        (raw.get("trainable_token_indices"), "trainable_token_indices is not supported"),
        (raw.get("target_parameters"), "target_parameters is not supported"),
    ]
    for refused, reason in checks:
        if refused:
            raise LoRAError(f"cannot serve this adapter: {reason}")
