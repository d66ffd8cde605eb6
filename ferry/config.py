"""EngineConfig: every user-facing setting, validated once.

The keys are the contract of DESIGN.md §4: a config.yaml key is the CLI flag's long name
with ``_`` for ``-``. Values discovered at run time (the number of KV blocks, the model's
context length) are returned by the components that find them, never written back here.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator

_SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6,
               "mib": 2**20, "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12,
               "tib": 2**40}


def parse_size(value: int | str) -> int:
    """'4GiB' -> 4294967296; plain integers are bytes."""
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"cannot read {value!r} as a size (examples: 4GiB, 512MiB, 1000000)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


class EngineConfig(BaseModel):
    """All settings of an engine and its server. Frozen after validation."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True,
                              protected_namespaces=())

    # model
    model_path: str | None = Field(None, validation_alias=AliasChoices("model_path", "model"))
    served_model_name: str | None = None
    tokenizer: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    device: Literal["auto", "cuda", "rocm", "cpu"] = "auto"
    quant_type: Literal["auto", "none", "gptq_int4", "awq_int4", "int8", "fp8"] = "auto"
    seed: int = 0
    # cache and batching
    kv_cache_dtype: Literal["auto", "fp8"] = "auto"
    max_model_len: int | None = Field(None, ge=1)
    max_num_seqs: int = Field(256, ge=1)
    max_num_batched_tokens: int = Field(8192, ge=1)
    block_size: int = Field(16, ge=1, le=1024)
    gpu_memory_utilization: float = Field(0.90, gt=0, le=1)
    kv_cache_memory: int = Field(4 * 2**30, gt=0)
    enable_prefix_caching: bool = True
    prefill_parallelism: int = Field(4, ge=1)
    scheduling_policy: Literal["fcfs", "priority"] = "priority"
    enforce_eager: bool = False
    async_scheduling: Literal["auto", "on", "off"] = "auto"
    # parallelism and adapters
    tensor_parallel_size: int = Field(1, ge=1)
    lora_adapters_dir: str | None = None
    max_loras: int = Field(8, ge=1)
    max_lora_rank: int = Field(64, ge=1)
    # observability
    debug_trace: Literal["none", "attention"] = "none"
    # server
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key: str | None = None
    max_waiting_requests: int = Field(1024, ge=1)
    shutdown_grace_seconds: float = Field(30.0, ge=0)

    @field_validator("kv_cache_memory", mode="before")
    @classmethod
    def _size(cls, value: Any) -> int:
        return parse_size(value)

    @classmethod
    def from_sources(cls, yaml_path: str | Path | None = None, **overrides: Any) -> "EngineConfig":
        """Merge a config.yaml (if given) with overrides (CLI flags, kwargs); overrides win.

        Raises ``ValueError`` naming the offending key.
        """
        values: dict[str, Any] = {}
        if yaml_path is not None:
            values.update(load_yaml(yaml_path))
        if "model" in values:
            values["model_path"] = values.pop("model")
        for key, value in overrides.items():
            if value is not None:
                values["model_path" if key == "model" else key] = value
        return validate_config(values)


def load_yaml(path: str | Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ValueError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of keys to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def validate_config(values: dict[str, Any]) -> EngineConfig:
    try:
        return EngineConfig(**values)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "config"
            if err["type"] == "extra_forbidden":
                problems.append(f"unknown key '{key}'")
            else:
                problems.append(f"'{key}': {err['msg']} (got {err.get('input')!r})")
        raise ValueError("invalid configuration: " + "; ".join(problems)) from None
