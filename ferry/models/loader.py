"""Build a checkpoint's model and load its weights (``ferry.checkpoint`` finds the checkpoint).

Weights load from ``*.safetensors`` only (single file or sharded with an index); pickle
checkpoints (.bin/.pt) are refused. Every model parameter must be filled: a missing tensor
or a wrong shape is a ValueError naming it; unexpected extra tensors are logged. Tensors
land through each parameter's ``weight_loader`` and layout attributes, whatever the weight
format; then every layer's weight method prepares its weights once.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from ferry.layers.parameter import default_weight_loader
from ferry.layers.weight_methods import WeightMethods, process_weights_after_loading
from ferry.models.common import CausalLM
from ferry.models.registry import get_model_class

logger = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


def get_model(model_dir: Path, hf_config: Any, dtype: torch.dtype, device: torch.device,
              weight_methods: WeightMethods | None = None) -> CausalLM:
    """Build the architecture's ``CausalLM`` on ``device`` in ``dtype`` and load its weights.

    ``weight_methods`` picks each layer's weight format (None: all unquantized); its
    optional ``prepare_model(model)`` runs after the model is built, before the weights
    load (to register tensors beyond the linears', such as per-layer KV scales). After
    loading, every layer's method prepares its weights once, for the device they are on.
    """
    model_cls = get_model_class(hf_config)
    files = find_safetensors_files(Path(model_dir))
    with torch.device(device):
        model = model_cls(hf_config, dtype=dtype, weight_methods=weight_methods)
        prepare = getattr(weight_methods, "prepare_model", None)
        if prepare is not None:   # a format's extra tensors (e.g. per-layer KV scales)
            prepare(model)
    load_weights(model, files, Path(model_dir))
    process_weights_after_loading(model)
    return model.eval()


def find_safetensors_files(model_dir: Path) -> list[Path]:
    """The checkpoint's safetensors files: from the shard index when there is one."""
    index_path = model_dir / SAFETENSORS_INDEX
    if index_path.is_file():
        weight_map = json.loads(index_path.read_text()).get("weight_map", {})
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"{index_path} lists shards that are not in {model_dir}: {missing}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if len(files) > 1:  # a stray consolidated copy duplicates every tensor
        files = [f for f in files if not f.name.startswith("consolidated")] or files
    if files:
        return files
    if any(f.suffix in PICKLE_SUFFIXES for f in model_dir.iterdir()):
        raise ValueError(f"{model_dir} only has pickle weights (.bin/.pt); ferry loads safetensors "
                         "only (convert with transformers' save_pretrained(safe_serialization=True))")
    raise ValueError(f"no *.safetensors weights found in {model_dir}")


def checkpoint_targets(model: CausalLM) -> dict[str, tuple[torch.nn.Parameter, Any]]:
    """Checkpoint tensor name -> (parameter, shard id) for every tensor the model needs."""
    packed: dict[str, list[tuple[str, Any]]] = {}
    for hf_name, (packed_name, shard_id) in model.packed_modules_mapping.items():
        packed.setdefault(packed_name, []).append((hf_name, shard_id))
    targets: dict[str, tuple[torch.nn.Parameter, Any]] = {}
    for name, param in model.named_parameters():  # tied weights appear once
        parts = name.split(".")
        packed_name = next((p for p in parts if p in packed), None)
        if packed_name is None:
            targets[name] = (param, None)
            continue
        for hf_name, shard_id in packed[packed_name]:
            hf_parts = [hf_name if p == packed_name else p for p in parts]
            targets[".".join(hf_parts)] = (param, shard_id)
    return targets


def iterate_checkpoint(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of the files, with a progress bar over tensors."""
    total = 0
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            total += len(f.keys())
    with tqdm(total=total, desc="Loading safetensors", unit="tensor", disable=None) as bar:
        for path in files:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
                    bar.update(1)


def renamed(name: str, renames: dict[str, str]) -> str:
    """``name`` with an older suffix (``renames`` key, after a dot) replaced by its current one."""
    for old, new in renames.items():
        if name.endswith("." + old):
            return name[: len(name) - len(old)] + new
    return name


def load_weights(model: CausalLM, files: list[Path], model_dir: Path) -> None:
    """Fill every parameter of ``model`` from the files; ValueError on missing/misshaped tensors."""
    targets = checkpoint_targets(model)
    ignorable = model.ignored_checkpoint_suffixes
    if model.options.tie_word_embeddings:
        ignorable = ignorable + ("lm_head.weight",)  # tied: the embedding is the head
    loaded: set[str] = set()
    unexpected: list[str] = []
    with torch.no_grad():
        for name, tensor in iterate_checkpoint(files):
            name = renamed(name, model.checkpoint_renames)
            if name not in targets:
                if not name.endswith(ignorable):
                    unexpected.append(name)
                continue
            param, shard_id = targets[name]
            weight_loader = getattr(param, "weight_loader", default_weight_loader)
            try:
                weight_loader(param, tensor, shard_id)
            except ValueError as exc:
                raise ValueError(f"tensor {name!r} in {model_dir}: {exc}") from None
            loaded.add(name)
    missing = sorted(set(targets) - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else "")
        raise ValueError(f"checkpoint {model_dir} is missing tensor(s) the model needs: {shown}")
    if unexpected:
        logger.warning("checkpoint %s has %d tensor(s) ferry does not use: %s", model_dir,
                       len(unexpected), ", ".join(unexpected[:5]))
