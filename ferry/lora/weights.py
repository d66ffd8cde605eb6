"""Load a PEFT adapter's tensors and check them against the base model (torch, the runner's side).

``load_adapter`` reads ``adapter_model.safetensors`` (never a pickle), maps each
``base_model.model.<module>.lora_{A,B}.weight`` onto the model's projections and checks
every name and shape, so a mismatch is refused with the tensor's name before anything is
visible. The result lives in host memory until a device slot takes it (``slots.py``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ferry.lora.adapter_config import (SUPPORTED_MODULES, WEIGHTS_FILE, AdapterConfig, LoRAError,
                                       read_adapter_config)

_PREFIX = "base_model.model."
_TENSOR = re.compile(r"^(?P<module>.+)\.lora_(?P<half>[AB])(?:\.default)?\.weight$")


@dataclass
class LoRAWeights:
    """One adapter in host memory: per target module (HF path) its A (r, in) and B (out, r)."""

    path: str
    config: AdapterConfig
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return self.config.rank

    @property
    def scaling(self) -> float:
        return self.config.scaling

    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.modules.values())


def load_adapter(path: str | Path, targets: dict[str, tuple[int, int]],
                 max_lora_rank: int) -> LoRAWeights:
    """Read and check the adapter at ``path``.

    ``targets`` maps each projection the model can adapt (HF module path, e.g.
    ``model.layers.0.self_attn.q_proj``) to its (in_features, out_features).
    Raises :class:`LoRAError` (or ``LoRANotFoundError``) with the reason.
    """
    path = Path(path)
    config = read_adapter_config(path, max_lora_rank)
    tensors = _read_safetensors(path / WEIGHTS_FILE)
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        module, half = _parse_name(name)
        if module not in targets:
            leaf = module.rsplit(".", 1)[-1]
            where = ("a projection ferry does not adapt" if leaf not in SUPPORTED_MODULES
                     else "a module this base model does not have")
            raise LoRAError(f"adapter tensor {name!r} targets {module!r}, {where}; ferry applies "
                            f"LoRA to {', '.join(SUPPORTED_MODULES)} of the base model's layers")
        halves.setdefault(module, {})[half] = tensor
    if not halves:
        raise LoRAError(f"{path / WEIGHTS_FILE} holds no LoRA tensors")
    weights = LoRAWeights(str(path), config)
    for module, pair in sorted(halves.items()):
        weights.modules[module] = _checked_pair(module, pair, targets[module], config.rank)
    return weights


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(file), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise LoRAError(f"cannot read {file}: {exc}") from None


def _parse_name(name: str) -> tuple[str, str]:
    """``base_model.model.X.lora_A.weight`` -> (X, "A"); refuses other tensors by name."""
    stripped = name[len(_PREFIX):] if name.startswith(_PREFIX) else name
    match = _TENSOR.match(stripped)
    if match is None:
        kind = ("a DoRA magnitude" if "lora_magnitude_vector" in name else
                "an embedding LoRA" if "lora_embedding" in name else
                "a trained bias" if name.endswith(".bias") else "not a LoRA A/B weight")
        raise LoRAError(f"adapter tensor {name!r} is {kind}; ferry serves plain LoRA on "
                        f"{', '.join(SUPPORTED_MODULES)} only")
    return match["module"], match["half"]


def _checked_pair(module: str, pair: dict[str, torch.Tensor], shape: tuple[int, int],
                  rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r, in) and B (out, r) of one module, both present and of the base model's sizes."""
    missing = {"A", "B"} - set(pair)
    if missing:
        raise LoRAError(f"adapter module {module!r} has no lora_{missing.pop()} weight")
    a, b = pair["A"], pair["B"]
    in_features, out_features = shape
    if not (a.is_floating_point() and b.is_floating_point()):
        raise LoRAError(f"adapter module {module!r}: LoRA weights must be floating point")
    if a.dim() != 2 or b.dim() != 2 or a.shape != (rank, in_features) or b.shape != (out_features, rank):
        raise LoRAError(f"adapter module {module!r} has lora_A {tuple(a.shape)} and lora_B "
                        f"{tuple(b.shape)}, but r={rank} on this base model needs "
                        f"({rank}, {in_features}) and ({out_features}, {rank}): the adapter was "
                        "trained for another base model")
    return a.contiguous(), b.contiguous()
