"""Settings, validated once: flat keys outside, frozen parts inside.

The keys are the contract of DESIGN.md §4: a config.yaml key is the CLI flag's long name
with ``_`` for ``-``, and ``LLM(...)`` takes any engine key as a keyword. Internally the keys
are grouped into parts (``ModelConfig``, ``CacheConfig``, ...), each a frozen pydantic model
whose fields carry the help text (``Field(description=...)``) the CLI shows.

``EngineConfig`` holds the parts the engine reads and no server part (the engine never sees
the API key); ``FerryConfig`` is the engine plus ``ServerConfig``, for ``ferry serve``.
Values discovered at start-up (the number of KV blocks, the model's context length) are not
written back here: they go into one ``RuntimeConfig``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)
from pydantic.fields import FieldInfo

API_KEY_ENV = "FERRY_API_KEY"

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


def _cli(**presentation: Any) -> dict[str, Any]:
    """How the CLI shows a field beyond its name and description (extra names, metavar,
    the default as words)."""
    return {"cli": presentation}


# ---------------------------------------------------------------------------- the parts
class ConfigPart(BaseModel):
    """One group of keys. Frozen; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True,
                              protected_namespaces=())


class ModelConfig(ConfigPart):
    """Which model, how its weights are read and run."""

    model_path: str | None = Field(
        None, validation_alias=AliasChoices("model_path", "model"),
        description="Model directory or hub id; omitted: the bundled demo model",
        json_schema_extra=_cli(names=("-m",), metavar="PATH|HUB_ID", default="the demo model"))
    served_model_name: str | None = Field(
        None, description="Model name in the API (default: the model directory's name)")
    tokenizer: str | None = Field(None, description="Tokenizer directory or hub id "
                                                    "(default: the model's)")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of "
                                                   "the model")
    trust_remote_code: bool = Field(False, description="Allow custom code from the model "
                                                       "repository")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Weights and activations dtype")
    device: Literal["auto", "cuda", "rocm", "cpu"] = Field("auto", description="Where to run")
    quant_type: Literal["auto", "none", "gptq_int4", "gptq_int8", "awq_int4", "int4", "int8",
                        "fp8"] = Field(
        "auto", description="Weight quantization (auto: read from the checkpoint's "
                            "quantization_config; int8/int4/fp8 on an unquantized checkpoint: "
                            "quantize while loading)")
    cpu_int8_activations: bool = Field(
        False, description="CPU int8/int4 weights: quantize the activations to int8 per "
                           "weight group too and multiply in integers (AVX512-VNNI; "
                           "llama.cpp's Q8_0/Q4_0 way): faster decode, logits differ slightly")
    lm_head_dtype: Literal["auto", "bfloat16", "int8"] = Field(
        "auto", description="LM head precision under quant_type int8/int4 on an unquantized "
                            "checkpoint (auto: as loaded; bfloat16 halves and int8 RTN quarters "
                            "the largest read of a small model's decode step, as llama.cpp's "
                            "Q8_0 files store the head); a head tied to the embeddings stays "
                            "as loaded")
    seed: int = Field(0, description="Seed of the engine's random sampling")
    max_model_len: int | None = Field(None, ge=1, description="Context length "
                                                              "(default: the model's)")
    enforce_eager: bool = Field(False, description="Disable CUDA graphs")
    structured_output_backend: Literal["auto", "xgrammar", "guidance"] = Field(
        "auto", description="Grammar library of structured output (auto: llguidance, else "
                            "xgrammar)")


class CacheConfig(ConfigPart):
    """The paged KV cache: block size, how much memory, prefix reuse."""

    block_size: int = Field(16, ge=1, le=1024, description="Tokens per KV cache block")
    gpu_memory_utilization: float = Field(0.90, gt=0, le=1,
                                          description="Share of GPU memory the engine may use")
    kv_cache_memory: int = Field(4 * 2**30, gt=0,
                                 description="KV cache size on the CPU (e.g. 4GiB)",
                                 json_schema_extra=_cli(metavar="SIZE", default="4GiB"))
    enable_prefix_caching: bool = Field(True, description="Reuse KV blocks of shared prompt "
                                                          "prefixes")
    kv_cache_dtype: Literal["auto", "fp8"] = Field("auto", description="KV cache dtype")
    swap_space: float = Field(4.0, ge=0, description="Host memory in GiB for KV blocks of "
                                                     "requests preempted by swapping (0: none)")

    @field_validator("kv_cache_memory", mode="before")
    @classmethod
    def _size(cls, value: Any) -> int:
        return parse_size(value)


class SchedulerConfig(ConfigPart):
    """Batching: how many sequences and tokens per step, in which order."""

    max_num_seqs: int = Field(256, ge=1, description="Most sequences in one batch")
    max_num_batched_tokens: int = Field(8192, ge=1, description="Token budget of one engine "
                                                                "step")
    prefill_parallelism: int = Field(4, ge=1, description="Prompts prefilled together in one "
                                                          "step")
    scheduling_policy: Literal["fcfs", "priority"] = Field(
        "priority", description="Order of the waiting queue")
    async_scheduling: Literal["auto", "on", "off"] = Field(
        "auto", description="Schedule step N+1 while the device runs step N (auto: on GPUs)")
    short_prompt_threshold: int = Field(
        256, ge=0, description="Fast lane: prompts with at most this many uncached tokens are "
                               "admitted ahead of long prefills (0: no fast lane)")
    max_queue_bypasses: int = Field(
        32, ge=0, description="Age bound of the waiting queue: a request passed over this many "
                              "steps blocks admissions behind it until it starts")
    reserved_blocks_for_priority: int = Field(
        0, ge=0, description="KV blocks only requests more urgent than the default "
                             "(priority < 0) may be admitted into")
    preemption_mode: Literal["auto", "swap", "recompute"] = Field(
        "auto", description="How a preempted request keeps its work: swap its KV blocks to "
                            "host memory, recompute them, or choose per victim by cost (auto)")
    memory_pressure_threshold: float = Field(
        0.85, gt=0, le=1, description="KV usage above which new prefills wait and the batch "
                                      "shrinks (graceful degradation)")
    thermal_limit_c: float = Field(75.0, gt=0, description="Device temperature (C) above "
                                                            "which prefill is throttled")
    power_limit_w: float | None = Field(None, gt=0, description="Device power (W) above "
                                                                "which prefill is throttled")


class ParallelConfig(ConfigPart):
    """How many devices one replica spans, and how many CPU threads it runs."""

    tensor_parallel_size: int = Field(1, ge=1, description="Devices (ranks) each layer is "
                                                         "split across (tensor parallelism)")
    pipeline_parallel_size: int = Field(1, ge=1, description="Stages the layers are split "
                                                           "into (pipeline parallelism)")
    nnodes: int = Field(1, ge=1, description="Machines (nodes) the replica spans")
    node_rank: int = Field(0, ge=0, description="This machine's index among the nodes (0 "
                                                "serves HTTP and schedules)")
    master_addr: str = Field("127.0.0.1", description="Address of node 0's rendezvous "
                                                      "(torch.distributed MASTER_ADDR)")
    master_port: int = Field(29500, ge=1, le=65535, description="Port of node 0's "
                                                                "rendezvous (MASTER_PORT)")
    distributed_timeout_seconds: float = Field(
        120.0, gt=0, description="Seconds a collective may wait for the other ranks before "
                                 "it fails naming the rank (a hang or a dead peer)")
    distributed_startup_timeout_seconds: float = Field(
        300.0, gt=0, description="Seconds the ranks may wait for each other while they start "
                                 "(join, self-test, loading); then collectives get "
                                 "distributed_timeout_seconds")
    cpu_threads: int | None = Field(
        None, ge=1, description="CPU threads of the engine's matmuls and kernels (auto: the "
                                "cores this process may use, from its CPU affinity and cgroup "
                                "quota; CPU only)",
        json_schema_extra=_cli(metavar="N|auto", default="auto"))

    @model_validator(mode="after")
    def _check_world(self) -> "ParallelConfig":
        world = self.tensor_parallel_size * self.pipeline_parallel_size
        if world % self.nnodes:
            raise ValueError(f"tensor_parallel_size x pipeline_parallel_size = {world} ranks "
                             f"do not split evenly over nnodes={self.nnodes}")
        if self.node_rank >= self.nnodes:
            raise ValueError(f"node_rank={self.node_rank} must be below nnodes={self.nnodes}")
        return self

    @field_validator("cpu_threads", mode="before")
    @classmethod
    def _auto_threads(cls, value: Any) -> Any:
        return None if isinstance(value, str) and value.strip().lower() == "auto" else value


class LoRAConfig(ConfigPart):
    """LoRA adapters served next to the base model."""

    enable_lora: bool = Field(False, description="Serve LoRA adapters (implied by lora_modules "
                                                 "or lora_adapters_dir; the Python API's "
                                                 "lora_request needs it)")
    lora_modules: dict[str, str] | None = Field(
        None, description="Adapters to load at start, name=path[,name=path...]",
        json_schema_extra=_cli(metavar="NAME=PATH,..."))
    lora_adapters_dir: str | None = Field(None, description="Directory of LoRA adapters to "
                                                            "serve, watched while running (each "
                                                            "subdirectory is one adapter)")
    max_loras: int = Field(8, ge=1, description="LoRA adapters resident at once")
    max_cpu_loras: int = Field(32, ge=1, description="LoRA adapters kept in host memory")
    max_lora_rank: int = Field(64, ge=1, le=1024, description="Largest LoRA rank accepted")

    @field_validator("lora_modules", mode="before")
    @classmethod
    def _lora_modules(cls, value: Any) -> Any:
        return parse_lora_modules(value)

    @property
    def enabled(self) -> bool:
        return bool(self.enable_lora or self.lora_modules or self.lora_adapters_dir)


def parse_lora_modules(value: Any) -> Any:
    """``a=/p,b=/q`` (the flag), a list of ``name=path`` or a mapping -> {name: path}."""
    if value is None or isinstance(value, dict):
        return value
    items = value.replace(",", " ").split() if isinstance(value, str) else value
    if not isinstance(items, list):
        raise ValueError("lora_modules must be name=path pairs")
    modules: dict[str, str] = {}
    for item in items:
        name, sep, path = str(item).partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ValueError(f"lora_modules entry {item!r} is not name=path")
        modules[name.strip()] = path.strip()
    return modules or None


class ObservabilityConfig(ConfigPart):
    """Debugging aids."""

    debug_trace: Literal["none", "attention"] = Field(
        "none", description="Debug tracing: 'attention' lets requests ask for an attention "
                            "trace (extension field debug_trace: true)")
    debug_trace_dir: str | None = Field(None, description="Directory for traces as JSON lines "
                                                          "(one file per day)")
    debug_trace_max_tokens: int = Field(256, ge=1, description="Most positions traced per "
                                                               "request")
    debug_trace_prompt: bool = Field(False, description="Trace the prompt's positions too, "
                                                        "not only the generated tokens")
    debug_trace_top_k: int = Field(8, ge=1, le=64, description="Attended positions kept per "
                                                               "head and token")
    debug_trace_entropy_jump: float = Field(1.0, gt=0, description="Flag a head whose entropy "
                                                                   "changes by more than this "
                                                                   "(nats) between tokens")


class ServerConfig(ConfigPart):
    """The HTTP server around the engine: address, API key, queue limit, shutdown, request
    limits."""

    host: str = Field("127.0.0.1", description="Address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on")
    api_key: str | None = Field(
        None, repr=False, description=f"Require 'Authorization: Bearer KEY' on /v1 routes "
                          f"(or set {API_KEY_ENV})")
    max_waiting_requests: int = Field(
        1024, ge=1, description="Waiting-queue limit; beyond it requests get 503 + Retry-After")
    shutdown_grace_seconds: float = Field(
        30.0, ge=0, description="On SIGTERM, how long requests in flight may finish")
    max_request_body_bytes: int = Field(
        16 * 2**20, gt=0, description="Largest request body (e.g. 16MiB); a larger one gets "
                                      "413 before it is read",
        json_schema_extra=_cli(metavar="SIZE", default="16MiB"))
    request_timeout_seconds: float = Field(
        0.0, ge=0, description="Abort a generation request still running after this many "
                               "seconds (504); 0: no limit")
    tool_call_parser: Literal["auto", "hermes", "llama3_json", "mistral"] = Field(
        "auto", description="How tool calls are read from the model's text (auto: from the "
                            "model family)")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log level of the server process")
    web_ui: bool = Field(True, description="Serve the built-in chat UI at / (--no-web-ui: "
                                           "leave it out)")

    @field_validator("max_request_body_bytes", mode="before")
    @classmethod
    def _size(cls, value: Any) -> int:
        return parse_size(value)


# ---------------------------------------------------------------------------- containers
class EngineConfig(BaseModel):
    """Everything the engine reads, by part: ``config.scheduler.max_num_seqs``,
    ``config.model.model_path``, ``config.cache.block_size``, ... No server settings.

    Build it from flat keys with :meth:`from_flat` or :meth:`from_sources`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    model: ModelConfig = Field(default_factory=ModelConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    lora: LoRAConfig = Field(default_factory=LoRAConfig)
    observability: ObservabilityConfig = Field(default_factory=ObservabilityConfig)

    @classmethod
    def from_flat(cls, **flat: Any) -> "EngineConfig":
        """From flat keys (``max_num_seqs=4, model="x"``); ``ValueError`` names a bad key,
        and a server key (``api_key``, ``port``, ...) is refused as a server setting."""
        return cls(**build_parts(_normalized(flat), ENGINE_PARTS))

    @classmethod
    def from_sources(cls, yaml_path: str | Path | None = None,
                     **overrides: Any) -> "EngineConfig":
        """A config.yaml (if given) merged with overrides (kwargs; ``None`` = not given);
        overrides win."""
        return cls.from_flat(**merge_sources(yaml_path, overrides))

    def to_flat(self) -> dict[str, Any]:
        """Every engine key and its value, flat (``{"max_num_seqs": 256, ...}``)."""
        return {key: value for part in ENGINE_PARTS
                for key, value in getattr(self, part).model_dump().items()}


class FerryConfig(BaseModel):
    """What ``ferry serve`` runs: the engine's settings and the server's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    engine: EngineConfig = Field(default_factory=EngineConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)

    @classmethod
    def from_flat(cls, **flat: Any) -> "FerryConfig":
        """From flat keys of any part; ``ValueError`` names every bad key."""
        parts = build_parts(_normalized(flat), ALL_PARTS)
        server = parts.pop(SERVER_PART)
        return cls(engine=EngineConfig(**parts), server=server)

    @classmethod
    def from_sources(cls, yaml_path: str | Path | None = None,
                     **overrides: Any) -> "FerryConfig":
        """A config.yaml (if given) merged with overrides (CLI flags; ``None`` = not given);
        overrides win."""
        return cls.from_flat(**merge_sources(yaml_path, overrides))

    def to_flat(self) -> dict[str, Any]:
        """Every key and its value, flat, as in a config.yaml."""
        return {**self.engine.to_flat(), **self.server.model_dump()}


@dataclass(frozen=True)
class RuntimeConfig:
    """The one resolved run-time view every component reads.

    Start-up fills it once, from the ``EngineConfig`` and what it finds (the checkpoint's
    dtype and context length, the memory left for KV blocks), so a later choice such as an
    FP8 KV cache changes one value here instead of every component's arguments.
    """

    dtype: str                 # weights and activations, e.g. "bfloat16"
    kv_cache_dtype: str        # e.g. "bfloat16"; "fp8" later
    max_model_len: int         # tokens of one request, prompt + output
    num_blocks: int            # KV cache blocks allocated
    block_size: int            # tokens per KV cache block
    device: str                # e.g. "cuda:0", "cpu"
    device_kind: str           # "cuda", "rocm" or "cpu"
    gpu_vendor: str            # "nvidia", "amd" or "cpu" (the metrics' label)
    vocab_size: int            # token ids the model accepts: [0, vocab_size)
    num_host_blocks: int = 0   # host (swap) KV blocks allocated, from swap_space
    kv_block_bytes: int = 0    # bytes of one KV block over all layers
    kv_copy_bytes_per_second: float = 0.0   # measured swap copy bandwidth (0: not measured)
    quant_type: str = "none"   # weight format: none, gptq_int4, awq_int4, int8, fp8, ...

    @property
    def is_gpu(self) -> bool:
        return self.device_kind != "cpu"


# ---------------------------------------------------------------------------- which key where
SERVER_PART = "server"
ENGINE_PARTS: dict[str, type[ConfigPart]] = {
    name: field.annotation for name, field in EngineConfig.model_fields.items()}
ALL_PARTS: dict[str, type[ConfigPart]] = {**ENGINE_PARTS, SERVER_PART: ServerConfig}
PART_OF_KEY: dict[str, str] = {key: part for part, cls in ALL_PARTS.items()
                               for key in cls.model_fields}
SERVER_KEYS: frozenset[str] = frozenset(ServerConfig.model_fields)


def config_fields(parts: dict[str, type[ConfigPart]] = ALL_PARTS) -> dict[str, FieldInfo]:
    """Every key of ``parts`` and its field (type, default, description), part by part."""
    return {key: field for cls in parts.values() for key, field in cls.model_fields.items()}


def _aliases() -> dict[str, str]:
    """Other accepted names of keys (``model`` -> ``model_path``), from the fields."""
    return {alias: key for key, field in config_fields().items()
            if isinstance(field.validation_alias, AliasChoices)
            for alias in field.validation_alias.choices if alias != key}


_ALIASES = _aliases()


def _normalized(flat: dict[str, Any]) -> dict[str, Any]:
    return {_ALIASES.get(key, key): value for key, value in flat.items()}


# ---------------------------------------------------------------------------- sources
def merge_sources(yaml_path: str | Path | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """The file's keys, then the overrides that are not ``None`` (later wins), aliases
    resolved."""
    values = _normalized(load_yaml(yaml_path)) if yaml_path is not None else {}
    values.update(_normalized({k: v for k, v in overrides.items() if v is not None}))
    return values


def load_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping of a config.yaml, keys with ``_`` for ``-``; ``ValueError`` otherwise."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ValueError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of keys to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


# ---------------------------------------------------------------------------- validation
def build_parts(values: dict[str, Any],
                parts: dict[str, type[ConfigPart]]) -> dict[str, ConfigPart]:
    """Validate flat ``values`` into one instance per part; one ``ValueError`` names every
    bad key ("invalid configuration: unknown key 'x'; 'port': ...")."""
    grouped, problems = _group(values, parts)
    built = {}
    for part, cls in parts.items():
        try:
            built[part] = cls(**grouped[part])
        except ValidationError as exc:
            problems += [_describe(err) for err in exc.errors()]
    if problems:
        raise ValueError("invalid configuration: " + "; ".join(problems))
    return built


def _group(values: dict[str, Any], parts: dict[str, type[ConfigPart]]
           ) -> tuple[dict[str, dict[str, Any]], list[str]]:
    grouped: dict[str, dict[str, Any]] = {part: {} for part in parts}
    problems = []
    for key, value in values.items():
        part = PART_OF_KEY.get(key)
        if part in parts:
            grouped[part][key] = value
        elif part == SERVER_PART:
            problems.append(f"'{key}' is a server setting (ferry serve --"
                            f"{key.replace('_', '-')}), not an engine one")
        else:
            problems.append(f"unknown key '{key}'")
    return grouped, problems


def _describe(err: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in err["loc"]) or "config"
    if err["type"] == "extra_forbidden":
        return f"unknown key '{key}'"
    return f"'{key}': {err['msg']} (got {err.get('input')!r})"
