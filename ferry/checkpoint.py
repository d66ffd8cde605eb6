"""Find a checkpoint and read what the engine needs of it without loading weights.

A local directory or a hub id (none: the bundled demo model); its ``config.json``, the
tokenizer, the EOS ids and the context length. No torch here: the engine (pure Python)
reads these, and the runner side loads the weights (``ferry/models/loader.py``).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.jinja", "*.txt"]
# Mistral repos ship a duplicate consolidated checkpoint; Llama repos an original/ folder.
HUB_IGNORE_PATTERNS = ["consolidated*.safetensors", "original/*"]


def resolve_model_path(model: str, revision: str | None = None) -> Path:
    """A local directory as is; otherwise a hub id, downloaded (or found in the HF cache).

    Honours HF_HUB_OFFLINE / HF_HUB_CACHE. Raises ValueError when neither works.
    """
    local = Path(model).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise ValueError(f"model path {model!r} is a file; pass the checkpoint directory")
    if looks_like_path(model):
        # A hub id never looks like this: asking the hub would only fail with a
        # validation error about repo ids that hides the real problem (a typo, a mount).
        raise ValueError(f"no such directory: {local} (the model {model!r} looks like a "
                         "local path; a hub id is 'owner/name')")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(repo_id=model, revision=revision,
                                      allow_patterns=HUB_ALLOW_PATTERNS,
                                      ignore_patterns=HUB_IGNORE_PATTERNS))
    except Exception as exc:  # hub errors come in many types; all mean "not available"
        raise ValueError(f"model {model!r} (revision {revision or 'main'}) was not found locally "
                         f"or on the Hugging Face hub: {type(exc).__name__}: {exc}") from exc


def looks_like_path(model: str) -> bool:
    """True when ``model`` can only be a local path, never a hub id (``name`` or
    ``owner/name``): it starts with ``/``, ``./``, ``../`` or ``~``, or has more than one
    separator (``models/llama/8b``), or the platform's own separator where it is not ``/``."""
    if model.startswith(("/", "./", "../", "~")) or model in (".", ".."):
        return True
    return model.count("/") > 1 or (os.sep != "/" and os.sep in model)


def resolve_model_dir(model_path: str | None, revision: str | None = None) -> Path:
    """The checkpoint directory of ``model_path``; None means the bundled demo model."""
    if model_path is None:
        from ferry.demo import demo_model_path
        return demo_model_path()
    return resolve_model_path(model_path, revision)


def load_hf_config(path: str | Path) -> Any:
    """The checkpoint's ``transformers`` config (no remote code)."""
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"cannot read a model config from {path}: {exc}") from exc


def load_tokenizer(source: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ValueError(f"could not load a tokenizer from {source}: {exc}") from None


def checkpoint_has_fp8_kv_cache(hf_config: Any) -> bool:
    """True when the checkpoint's ``quantization_config`` declares an FP8 KV cache: a
    compressed-tensors ``kv_cache_scheme`` of 8-bit floats, AutoFP8's ``kv_cache_scheme:
    static`` (``quant_method: fp8``), or vLLM's ``kv_cache_dtype: fp8*``."""
    quant = getattr(hf_config, "quantization_config", None)
    if not isinstance(quant, dict):
        quant = getattr(quant, "to_dict", lambda: {})() if quant is not None else {}
    scheme = quant.get("kv_cache_scheme") or {}
    if isinstance(scheme, dict) and scheme.get("type") == "float" and scheme.get("num_bits") == 8:
        return True
    if scheme == "static" and quant.get("quant_method") == "fp8":   # AutoFP8
        return True
    return str(quant.get("kv_cache_dtype", "")).startswith("fp8")


def resolve_max_model_len(requested: int | None, hf_config: Any) -> int:
    """``requested`` when it fits the model's positions; the model's own length when None.

    A longer ``requested`` is clamped to the model's length with a warning rather than
    refused: one config file (the README's) then serves models of any context length.
    """
    model_max = int(getattr(hf_config, "max_position_embeddings", None) or 2048)
    if requested is None:
        return model_max
    if requested > model_max:
        logger.warning("max_model_len=%d is longer than the model's max_position_embeddings "
                       "(%d): using %d", requested, model_max, model_max)
        return model_max
    return requested


def resolve_eos_token_ids(model_dir: Path, hf_config: Any, tokenizer) -> tuple[int, ...]:
    """EOS ids from generation_config.json (may be a list), else config, else tokenizer."""
    candidates = []
    gen_path = model_dir / "generation_config.json"
    if gen_path.exists():
        candidates.append(json.loads(gen_path.read_text()).get("eos_token_id"))
    candidates += [getattr(hf_config, "eos_token_id", None), tokenizer.eos_token_id]
    for value in candidates:
        if value is not None:
            return tuple(value) if isinstance(value, (list, tuple)) else (int(value),)
    return ()


def default_served_name(model_path: str | None) -> str:
    """The API's model name: a local directory's name, a hub id as typed, or ferry-demo."""
    if model_path is None:
        return "ferry-demo"
    path = Path(model_path)
    return path.resolve().name if path.is_dir() else model_path
