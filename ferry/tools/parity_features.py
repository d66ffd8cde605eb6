"""The engine features the parity matrix (docs/parity.md) has a row for, and which exist.

"What exists" is read from the code, not written down: the kernel dispatch table
(``ferry.kernels.OP_NAMES``), and every config key, each either a feature (its values, for
an enum such as ``quant_type``, are features of their own) or a plain setting. A new op,
a new enum value or a new config key therefore fails ``tests/test_parity_matrix.py``
until it is classified here, and a feature row with tests.

Whether a feature is built is read from the code too: the runner's start-up check refuses
the config values of features that are not built (``runner.model_setup``).
"""
from __future__ import annotations

import typing
from dataclasses import dataclass

from ferry.config import EngineConfig, config_fields

CPP_ONLY = "tests/kernels/test_cpu_kernels.py"   # the C++ kernels' own tests: not reference proof
K = CPP_ONLY + "::"
MODELS = ("tests/test_models.py::test_full_prefill_matches_hf",
          "tests/test_models.py::test_batched_chunks_and_decodes_match_hf")


@dataclass(frozen=True)
class Feature:
    """One row. ``tests``: pytest node ids (or prefixes) whose results prove it on a CPU;
    the same tests run on a GPU machine (they pick the device). ``triton_kernels``: the
    kernels it runs on a GPU, as named in the AOT kernel matrix (docs/kernels.md).
    ``cpu``: False where the feature only acts on a GPU (its CPU tests use a stand-in).
    ``gpu_tests`` count for the GPU columns only (on the CPU they run through Triton's
    interpreter, which proves the kernels' arithmetic, not a CPU path)."""

    id: str
    title: str
    tests: tuple[str, ...] = ()
    triton_kernels: tuple[str, ...] = ()
    cpu: bool = True
    note: str = ""
    gpu_tests: tuple[str, ...] = ()   # the Triton kernels' tests: GPU columns only


_ATTN = ("paged_decode_kernel", "paged_decode_reduce_kernel", "paged_prefill_kernel")
TA, TE = "tests/kernels/test_triton_attention.py", "tests/kernels/test_triton_elementwise.py::"
TRITON_MODEL = ("tests/kernels/test_triton_model.py",)
QF, QE = "tests/quant/test_formats.py", "tests/quant/test_engine_quant.py"
PT = "tests/distributed/test_parallel_tokens.py"
FEATURES: tuple[Feature, ...] = (
    Feature("kernel:paged_attention", "Paged attention (prefill, decode, mixed; sliding window)",
            (K + "test_mixed_batch_matches_naive", K + "test_sliding_window",
             K + "test_random_ragged_batches_match_reference",
             "tests/test_reference_attention.py", *MODELS), _ATTN, gpu_tests=(TA, *TRITON_MODEL)),
    Feature("kernel:write_kv_cache", "KV cache write (paged slots)",
            (K + "test_write_kv_cache_matches_reference", "tests/test_reference_attention.py"),
            ("write_kv_cache_kernel",),
            gpu_tests=(TA + "::test_write_kv_cache_scatters_rows_and_skips_padding",)),
    Feature("kernel:rms_norm", "RMSNorm", (K + "test_norms_match_reference", *MODELS),
            ("rms_norm_kernel",), gpu_tests=(TE + "test_rms_norm", *TRITON_MODEL)),
    Feature("kernel:fused_add_rms_norm", "Residual add + RMSNorm",
            (K + "test_norms_match_reference", *MODELS), ("fused_add_rms_norm_kernel",),
            gpu_tests=(TE + "test_fused_add_rms_norm", *TRITON_MODEL)),
    Feature("kernel:apply_rotary", "Rotary embedding (incl. llama3 scaling)",
            (K + "test_rotary_matches_reference_on_views", *MODELS), ("rotary_kernel",),
            gpu_tests=(TE + "test_apply_rotary", *TRITON_MODEL)),
    Feature("kernel:silu_and_mul", "SiLU and multiply (gated MLP)",
            (K + "test_silu_and_mul_matches_reference", *MODELS), ("silu_and_mul_kernel",),
            gpu_tests=(TE + "test_silu_and_mul", *TRITON_MODEL)),
    Feature("model:greedy_vs_hf", "Whole model: greedy tokens equal HF transformers",
            (K + "test_engine_greedy_matches_hf_on_both_cpu_paths", *MODELS),
            ("write_kv_cache_kernel", *_ATTN, "rms_norm_kernel", "fused_add_rms_norm_kernel",
             "rotary_kernel", "silu_and_mul_kernel"), gpu_tests=TRITON_MODEL),
    Feature("prefix_caching", "Automatic prefix caching",
            ("tests/engine/test_kv_cache_manager.py", "tests/test_engine_e2e.py")),
    Feature("scheduling:fcfs", "FCFS scheduling", ("tests/engine/test_scheduler.py",)),
    Feature("scheduling:priority", "Priority scheduling", ("tests/engine/test_scheduler.py",)),
    Feature("async_scheduling", "Async scheduling (host overlaps the device)",
            ("tests/engine/test_async_scheduling.py", "tests/test_async_scheduling_e2e.py")),
    Feature("device_graphs", "CUDA/HIP graphs of decode steps",
            ("tests/runner/test_decode_graphs.py",), cpu=False,
            note="GPU only; on the CPU a stand-in replays the recorded forward"),
    Feature("spec_decoding:seam", "Draft tokens: scheduling, verification, rollback",
            ("tests/runner/test_draft_tokens.py", "tests/engine/test_scheduler_drafts.py"),
            note="the seam, with a test drafter"),
    Feature("spec_decoding", "Speculative decoding proposers (n-gram, draft model)"),
    Feature("kernel:wna16_linear", "Weight-only int8/int4 linear (canonical layout)",
            ("tests/kernels/test_cpu_quant_linear.py", "tests/quant/test_on_load_rtn.py"),
            ("wna16_gemm_kernel",), gpu_tests=("tests/kernels/test_triton_wna16.py",)),
    Feature("cpu:int8_activations", "CPU int8/int4 linears on int8 activations (VNNI; "
            "`cpu_int8_activations`), int8 RTN LM head",
            ("tests/kernels/test_cpu_quant_a8.py", "tests/quant/test_int8_activations.py",
             "tests/kernels/test_cpu_decoder_stack.py"),
            note="C++ backend on AVX512-VNNI CPUs; elsewhere the float-activation kernel"),
    Feature("kernel:dense_linear", "Unquantized linear (F.linear; C++ decode GEMV on the pool)",
            ("tests/kernels/test_cpu_gemv.py", *MODELS)),
    Feature("cpu:decoder_stack", "Fused CPU decoder stack (every layer of a decode step in one C++ call)",
            ("tests/kernels/test_cpu_decoder_stack.py", *MODELS),
            note="C++ backend only; GPUs and the reference run layer by layer"),
    Feature("kernel:bf16_weight_linear", "bfloat16-weight linear at float32 arithmetic",
            ("tests/kernels/test_cpu_quant_linear.py",)),
    Feature("kernel:lora_shrink", "Segmented LoRA shrink", ("tests/kernels/test_lora_kernels.py",),
            ("lora_shrink_kernel",)),
    Feature("kernel:lora_expand", "Segmented LoRA expand", ("tests/kernels/test_lora_kernels.py",),
            ("lora_expand_kernel",)),
    Feature("kernel:apply_token_bitmask", "Structured output's grammar mask on the logits",
            ("tests/kernels/test_token_bitmask.py", "tests/runner/test_grammar_mask.py")),
    Feature("kernel:attention_trace", "Attention trace op (entropy, top-k)",
            ("tests/kernels/test_attention_trace.py",), ("attention_trace_kernel",),
            gpu_tests=("tests/kernels/test_triton_attention_trace.py",)),
    Feature("quant:gptq_int4", "GPTQ int4 weights", (QF, QE)),
    Feature("quant:gptq_int8", "GPTQ int8 weights", (QF,)),
    Feature("quant:awq_int4", "AWQ int4 weights", (QF, QE)),
    Feature("quant:int4", "int4 weights, round-to-nearest while loading",
            ("tests/quant/test_on_load_rtn.py",)),
    Feature("quant:int8", "int8 weights, round-to-nearest while loading (or W8A8 checkpoints)",
            ("tests/quant/test_on_load_rtn.py", QF)),
    Feature("quant:fp8", "FP8 weights (checkpoints, or quantized while loading)", (QF,),
            note="torch._scaled_mm on FP8 GPUs, dequantized elsewhere"),
    Feature("lm_head:bfloat16", "LM head in bfloat16 under on-load int8/int4 (`lm_head_dtype`)",
            ("tests/quant/test_lm_head_dtype.py",)),
    Feature("lm_head:int8", "LM head RTN int8 under on-load int8/int4 (`lm_head_dtype`)",
            ("tests/quant/test_lm_head_dtype.py", "tests/quant/test_int8_activations.py")),
    Feature("quantize", "`ferry quantize` (RTN, GPTQ, AWQ)", ("tests/quant/test_quantize.py",)),
    Feature("kv_cache:fp8", "FP8 (e4m3) KV cache", ("tests/kernels/test_fp8_kv_cache.py",),
            note="GPU: sm_90 and gfx942 only (refused at start elsewhere)"),
    Feature("lora", "LoRA adapters (mixed batches, hot loading)",
            ("tests/lora/test_lora_peft.py", "tests/lora/test_lora_engine.py",
             "tests/lora/test_adapter_validation.py", "tests/lora/test_paths_and_watcher.py",
             "tests/server/test_lora_server.py",
             "tests/engine/test_scheduler_lora_admission.py")),
    Feature("tensor_parallel", "Tensor parallelism (torch.distributed; gloo on the CPU)",
            (PT, "tests/distributed/test_parallel_server.py", "tests/distributed/test_sharding.py",
             "tests/distributed/test_rank_loading.py", "tests/distributed/test_collectives.py",
             "tests/distributed/test_parallel_quant.py", "tests/distributed/test_quant_rank_parts.py",
             "tests/distributed/test_parallel_fp8_kv.py",
             "tests/distributed/test_parallel_start_failure.py"),
            note="one GPU has never run it; NCCL/RCCL untested"),
    Feature("tensor_parallel:quant", "Quantized layers on tensor-parallel ranks (GPTQ 4/8-bit, "
            "AWQ, compressed-tensors W4A16/FP8/W8A8, vLLM FP8 incl. 128x128 blocks, on-load "
            "int8/FP8)",
            ("tests/distributed/test_parallel_quant.py",
             "tests/distributed/test_quant_rank_parts.py"),
            note="gloo on the CPU only; FP8 GEMMs (torch._scaled_mm) never run under TP"),
    Feature("pipeline_parallel", "Pipeline parallelism", (PT,)),
    Feature("lora:parallel", "LoRA adapters on tensor/pipeline-parallel ranks (sharded like "
            "their layers)", ("tests/distributed/test_parallel_lora.py",),
            note="gloo on the CPU only; NCCL/RCCL untested"),
    Feature("debug_trace:attention", "Attention debug trace (entropy, top-k per layer/head)",
            ("tests/kernels/test_attention_trace.py", "tests/test_debug_trace_e2e.py",
             "tests/server/test_debug_trace_stream_http.py"),
            ("attention_trace_kernel",),
            note="a C++ trace kernel on the CPU, a Triton one on GPUs (interpreter-tested "
                 "and compiled ahead of time; never run on a GPU), the PyTorch op on the "
                 "reference backend", gpu_tests=("tests/kernels/test_triton_attention_trace.py",)),
    Feature("trace:fp8_kv_cache", "Attention debug trace over an FP8 KV cache (the "
            "dequantized scores)",
            ("tests/test_debug_trace_e2e.py::test_fp8_kv_cache_traces_match_the_dequantized_cache",
             "tests/kernels/test_fp8_kv_cache.py::"
             "test_debug_trace_over_fp8_cache_is_that_of_the_dequantized_keys",
             "tests/kernels/test_attention_trace.py::"
             "test_cpp_kernel_over_an_fp8_cache_is_the_op_on_its_dequantized_keys"),
            note="GPU: the Triton trace kernel's kv=fp8 variant (sm_90, gfx942), "
                 "interpreter-tested only",
            gpu_tests=("tests/kernels/test_triton_attention_trace.py::"
                       "test_fp8_cache_is_the_op_on_its_dequantized_keys",)),
    Feature("web_ui:attention_trace", "Web UI: the heatmap of a traced message, from the "
            "stream's final chunk",
            ("tests/server/test_webui_browser.py::"
             "test_a_traced_message_shows_the_trace_of_its_final_chunk",),
            note="headless Chromium; device-independent (the page reads the server's trace)"),
    Feature("structured_output", "Structured output (JSON schema, regex, choice, grammars)",
            ("tests/structured_output/test_backends.py",
             "tests/structured_output/test_engine_constraints.py", "tests/runner/test_grammar_mask.py",
             "tests/server/test_structured_output_http.py",
             "tests/structured_output/test_async_masks.py",
             "tests/structured_output/test_constrained_drafts.py")),
    Feature("tool_calling", "Tool calling (tools, tool_choice, parsers per family)",
            ("tests/server/test_tool_calls_http.py", "tests/server/test_tool_parsers.py")),
    Feature("preemption:swap", "Preemption by KV swap to host memory (or recompute)",
            ("tests/engine/test_scheduler_swap.py", "tests/test_preemption_e2e.py")),
    Feature("scheduling:fast_lane", "Fast lane for short prompts, no head-of-line blocking",
            ("tests/engine/test_scheduler_lanes.py",)),
    Feature("degradation", "Graceful degradation under memory pressure; thermal/power guard",
            ("tests/engine/test_degradation_thermal.py",)),
    Feature("energy", "Energy per request (NVML, amdsmi, RAPL)", ("tests/test_energy.py",),
            note="tested with a fake counter; no hardware counter read here"),
)
FEATURE_BY_ID = {f.id: f for f in FEATURES}

# Config keys that name a feature: key -> feature id, or a prefix "name:" whose values
# (but the listed defaults) are features each.
FEATURE_KEYS: dict[str, str] = {
    "enable_prefix_caching": "prefix_caching", "async_scheduling": "async_scheduling",
    "enforce_eager": "device_graphs", "tensor_parallel_size": "tensor_parallel",
    "lora_adapters_dir": "lora", "max_loras": "lora", "max_lora_rank": "lora",
    "quant_type": "quant:", "kv_cache_dtype": "kv_cache:", "debug_trace": "debug_trace:",
    "scheduling_policy": "scheduling:", "structured_output_backend": "structured_output",
    "tool_call_parser": "tool_calling", "pipeline_parallel_size": "pipeline_parallel",
    "enable_lora": "lora", "lora_modules": "lora", "max_cpu_loras": "lora",
    "swap_space": "preemption:swap", "preemption_mode": "preemption:swap",
    "short_prompt_threshold": "scheduling:fast_lane", "max_queue_bypasses": "scheduling:fast_lane",
    "memory_pressure_threshold": "degradation", "thermal_limit_c": "degradation",
    "power_limit_w": "degradation", "reserved_blocks_for_priority": "scheduling:priority",
    "speculative_config": "spec_decoding", "cpu_int8_activations": "cpu:int8_activations",
    "lm_head_dtype": "lm_head:",
}
ENUM_DEFAULTS = {"quant_type": {"auto", "none"}, "kv_cache_dtype": {"auto"},
                 "debug_trace": {"none"}, "lm_head_dtype": {"auto"}}
# Plain settings: sizes, limits, addresses, names.
SETTING_KEYS = frozenset({
    "model_path", "served_model_name", "tokenizer", "revision", "trust_remote_code", "dtype",
    "device", "seed", "max_model_len", "block_size", "gpu_memory_utilization",
    "kv_cache_memory", "max_num_seqs", "max_num_batched_tokens", "prefill_parallelism",
    "cpu_threads", "host", "port", "api_key", "max_waiting_requests", "shutdown_grace_seconds",
    "max_request_body_bytes", "request_timeout_seconds", "log_level", "web_ui",
    "debug_trace_dir", "debug_trace_max_tokens", "debug_trace_prompt",
    "debug_trace_entropy_jump", "debug_trace_top_k", "nnodes", "node_rank", "master_addr",
    "master_port", "distributed_timeout_seconds", "distributed_startup_timeout_seconds",
})


class UnclassifiedKey(ValueError):
    """A config key that is neither a feature nor a plain setting here."""


def existing_features() -> dict[str, str]:
    """``{feature id: where it was found}`` from the dispatch table and the config keys."""
    from ferry.kernels import OP_NAMES

    found = {f"kernel:{op}": "ferry.kernels.OP_NAMES" for op in OP_NAMES}
    found["model:greedy_vs_hf"] = "ferry.models"
    from ferry.runner.drafts import DraftProposer

    found["spec_decoding:seam"] = f"ferry.runner.drafts.{DraftProposer.__name__}"
    from ferry.models.lora_plan import rank_lora_plan

    found["lora:parallel"] = f"ferry.models.lora_plan.{rank_lora_plan.__name__}"
    from ferry.models.tensor_parallel import RowParallelMethod   # wraps any format's method

    found["tensor_parallel:quant"] = f"ferry.models.tensor_parallel.{RowParallelMethod.__name__}"
    from ferry.layers.attention import Attention   # its FP8 path traces too

    found["trace:fp8_kv_cache"] = f"ferry.layers.attention.{Attention._trace.__qualname__}"
    from importlib import resources

    if resources.files("ferry.server").joinpath("webui", "heatmap.js").is_file():
        found["web_ui:attention_trace"] = "ferry/server/webui/heatmap.js"
    unclassified = []
    for key, field in config_fields().items():
        target = FEATURE_KEYS.get(key)
        if target is None:
            if key not in SETTING_KEYS:
                unclassified.append(key)
            continue
        if target.endswith(":"):
            for value in _enum_values(field.annotation):
                if value not in ENUM_DEFAULTS.get(key, ()):
                    found[f"{target}{value}"] = f"config key {key}"
        else:
            found[target] = f"config key {key}"
    if unclassified:
        raise UnclassifiedKey(f"config keys neither a feature nor a setting in "
                              f"ferry/tools/parity_features.py: {unclassified}")
    return found


def _enum_values(annotation) -> list[str]:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return [str(a) for a in args]
    return [v for a in args for v in _enum_values(a)]


# A feature's config value, to ask the runner's start-up check whether it is built.
def _probe(feature_id: str) -> dict | None:
    kind, _, value = feature_id.partition(":")
    probes = {"quant": {"quant_type": value}, "kv_cache": {"kv_cache_dtype": value},
              "debug_trace": {"debug_trace": value}, "lora": {"lora_adapters_dir": "/x"},
              "tensor_parallel": {"tensor_parallel_size": 2},
              "pipeline_parallel": {"pipeline_parallel_size": 2}}
    return probes.get(kind)


def is_built(feature: Feature, existing: dict[str, str]) -> bool:
    """False when the feature has no config key yet, or its value is refused at start."""
    if feature.id not in existing:
        return False
    probe = _probe(feature.id)
    if probe is None:
        return True
    from ferry.runner.model_setup import check_features_available

    try:
        check_features_available(EngineConfig.from_flat(**probe))
    except ValueError:
        return False
    return True
