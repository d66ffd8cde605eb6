"""Command-line flags generated from EngineConfig, so the CLI and config.yaml never drift.

Every field ``some_key`` becomes ``--some-key`` (booleans: ``--some-key/--no-some-key``).
Values arrive as text and are validated by ``EngineConfig`` itself, so a bad flag and a bad
config.yaml entry get the same message naming the key.
"""
from __future__ import annotations

import inspect
import os
import typing
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ferry.config import EngineConfig

API_KEY_ENV = "FERRY_API_KEY"

HELP: dict[str, str] = {
    "model_path": "Model directory or hub id; omitted: the bundled demo model",
    "served_model_name": "Model name in the API (default: the model directory's name)",
    "tokenizer": "Tokenizer directory or hub id (default: the model's)",
    "revision": "Hub revision (branch, tag or commit) of the model",
    "trust_remote_code": "Allow custom code from the model repository",
    "dtype": "Weights and activations dtype",
    "device": "Where to run",
    "quant_type": "Weight quantization (auto: read from the checkpoint)",
    "seed": "Seed of the engine's random sampling",
    "kv_cache_dtype": "KV cache dtype",
    "max_model_len": "Context length (default: the model's)",
    "max_num_seqs": "Most sequences in one batch",
    "max_num_batched_tokens": "Token budget of one engine step",
    "block_size": "Tokens per KV cache block",
    "gpu_memory_utilization": "Share of GPU memory the engine may use",
    "kv_cache_memory": "KV cache size on the CPU (e.g. 4GiB)",
    "enable_prefix_caching": "Reuse KV blocks of shared prompt prefixes",
    "prefill_parallelism": "Prompts prefilled together in one step",
    "scheduling_policy": "Order of the waiting queue",
    "enforce_eager": "Disable CUDA graphs",
    "async_scheduling": "Schedule step N+1 while the device runs step N (auto: on GPUs)",
    "tensor_parallel_size": "GPUs per replica",
    "lora_adapters_dir": "Directory of LoRA adapters to serve",
    "max_loras": "LoRA adapters resident at once",
    "max_lora_rank": "Largest LoRA rank accepted",
    "debug_trace": "Debug tracing",
    "host": "Address to listen on",
    "port": "Port to listen on",
    "api_key": f"Require 'Authorization: Bearer KEY' on /v1 routes (or set {API_KEY_ENV})",
    "max_waiting_requests": "Waiting-queue limit; beyond it requests get 503 + Retry-After",
    "shutdown_grace_seconds": "On SIGTERM, how long requests in flight may finish",
}

_EXTRA_NAMES = {"model_path": ("--model", "-m")}
_DEFAULTS = {"model_path": "the demo model", "kv_cache_memory": "4GiB"}
_METAVARS = {"kv_cache_memory": "SIZE", "model_path": "PATH|HUB_ID"}


def _metavar(annotation: Any) -> str:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return "[" + "|".join(map(str, args)) + "]"
    inner = [a for a in args if a is not type(None)] or [annotation]
    if typing.get_origin(inner[0]) is typing.Literal:
        return _metavar(inner[0])
    return {int: "INTEGER", float: "FLOAT", str: "TEXT"}.get(inner[0], "VALUE")


def _is_bool(annotation: Any) -> bool:
    return annotation is bool


def config_flag_parameters(fields: set[str] | None = None) -> list[inspect.Parameter]:
    """``inspect.Parameter``s with typer Options: ``--config`` plus one per config field."""
    params = [inspect.Parameter(
        "config", inspect.Parameter.KEYWORD_ONLY, default=None,
        annotation=Annotated[Optional[Path], typer.Option(
            "--config", "-c", help="config.yaml whose keys are these flags' names with '_'; "
            "flags override it", metavar="PATH", show_default=False)])]
    for name, field in EngineConfig.model_fields.items():
        if fields is not None and name not in fields:
            continue
        flag = "--" + name.replace("_", "-")
        default = _DEFAULTS.get(name, field.default)
        shown = f"; default: {default}" if default is not None else ""
        help_text = f"{HELP.get(name, name)} [key: {name}{shown}]"
        if _is_bool(field.annotation):
            option = typer.Option(f"{flag}/--no-{flag[2:]}", help=help_text, show_default=False)
            annotation = Annotated[Optional[bool], option]
        else:
            option = typer.Option(flag, *_EXTRA_NAMES.get(name, ()), help=help_text,
                                  metavar=_METAVARS.get(name) or _metavar(field.annotation),
                                  show_default=False)
            annotation = Annotated[Optional[str], option]
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                        annotation=annotation))
    return params


def with_config_flags(fields: set[str] | None = None, extra: list[inspect.Parameter] = ()):
    """Decorator: give ``fn(**kwargs)`` a signature typer reads as the config flags."""
    def decorate(fn):
        fn.__signature__ = inspect.Signature(list(extra) + config_flag_parameters(fields))
        return fn
    return decorate


def build_config(config: Path | None, flags: dict[str, Any], *,
                 use_env_api_key: bool = False) -> EngineConfig:
    """config.yaml, then ``FERRY_API_KEY``, then flags (later wins). ``ValueError`` names
    the bad key."""
    overrides = {k: v for k, v in flags.items() if v is not None}
    env_key = os.environ.get(API_KEY_ENV) if use_env_api_key else None
    if env_key and "api_key" not in overrides:
        overrides["api_key"] = env_key
    return EngineConfig.from_sources(config, **overrides)
