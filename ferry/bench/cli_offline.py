"""``ferry bench throughput`` and ``ferry bench latency`` (ferry in-process, no HTTP)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from ferry.bench.cli_options import (Dataset, DatasetPath, InputLen, LongFraction, LongInputLen,
                                     NumPrefixes, NumPrompts, OutputLen, PrefixLen, RangeRatio,
                                     Seed, Temperature, fail, write_outputs)
from ferry.bench.datasets import DatasetOptions
from ferry.bench.report import fmt, limit_rows

OfflineModel = Annotated[Optional[str], typer.Option(
    help="Model dir or hub id (default: the bundled demo model)")]
ConfigFile = Annotated[Optional[Path], typer.Option("--config", help="Engine config.yaml")]
EngineArg = Annotated[Optional[list[str]], typer.Option(
    help="Any engine config key as KEY=VALUE (repeatable), e.g. --engine-arg block_size=32")]
Dtype = Annotated[Optional[str], typer.Option(help="auto, bfloat16, float16, float32")]
Device = Annotated[Optional[str], typer.Option(help="auto, cuda, rocm, cpu")]
MaxModelLen = Annotated[Optional[int], typer.Option(help="Context length limit")]
MaxNumSeqs = Annotated[Optional[int], typer.Option(help="Most sequences in a batch")]
KvCacheMemory = Annotated[Optional[str], typer.Option(help="KV cache bytes on CPU, e.g. 2GiB")]


def _engine_args(config: Path | None, engine_arg: list[str] | None, **flags: Any) -> dict:
    """Engine config from a YAML file (its server keys, if any, ignored), KEY=VALUE pairs
    and flags (flags win)."""
    import yaml

    from ferry.config import SERVER_KEYS, load_yaml

    from_file = load_yaml(config) if config else {}
    values: dict[str, Any] = {k: v for k, v in from_file.items() if k not in SERVER_KEYS}
    for item in engine_arg or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--engine-arg takes KEY=VALUE, got {item!r}")
        values[key.strip().replace("-", "_")] = yaml.safe_load(raw)
    values.update({k: v for k, v in flags.items() if v is not None})
    values.pop("model", None)
    values.pop("model_path", None)
    return values


def _print_limits(result: dict[str, Any], console: Console) -> None:
    table = Table(title="Against the physical limits", show_header=False, title_justify="left")
    table.add_column("")
    table.add_column("")
    for name, value in limit_rows(result):
        table.add_row(name, value)
    console.print(table)


def throughput(model: OfflineModel = None, dataset: Dataset = "random",
               num_prompts: NumPrompts = 100, input_len: InputLen = 1024,
               output_len: OutputLen = None, range_ratio: RangeRatio = 0.0,
               dataset_path: DatasetPath = None, prefix_len: PrefixLen = 512,
               num_prefixes: NumPrefixes = 4, long_fraction: LongFraction = 0.1,
               long_input_len: LongInputLen = 4096, seed: Seed = 0,
               temperature: Temperature = 0.0, config: ConfigFile = None,
               engine_arg: EngineArg = None, dtype: Dtype = None, device: Device = None,
               max_model_len: MaxModelLen = None, max_num_seqs: MaxNumSeqs = None,
               kv_cache_memory: KvCacheMemory = None,
               result_json: Annotated[Optional[Path], typer.Option(
                   help="Write the result here")] = None) -> None:
    """Offline throughput of ferry (the LLM API, in-process) on a workload."""
    from ferry.bench.offline import load_llm, run_throughput

    try:
        options = DatasetOptions(
            name=dataset, num_prompts=num_prompts, input_len=input_len, output_len=output_len,
            range_ratio=range_ratio, dataset_path=dataset_path, prefix_len=prefix_len,
            num_prefixes=num_prefixes, long_fraction=long_fraction,
            long_input_len=long_input_len, seed=seed)
        args = _engine_args(config, engine_arg, dtype=dtype, device=device,
                            max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                            kv_cache_memory=kv_cache_memory)
        result = run_throughput(load_llm(model, args), options, temperature)
    except ValueError as exc:
        raise fail(str(exc)) from None
    console = Console()
    console.print(f"[bold]ferry bench throughput[/bold]: {result['model']}, "
                  f"{result['num_requests']} requests in {fmt(result['elapsed_s'])} s")
    for key in ("request_throughput", "output_throughput", "total_token_throughput"):
        console.print(f"  {key}: {fmt(result[key])} /s")
    _print_limits(result, console)
    for note in result["notes"]:
        console.print(f"[yellow]note:[/yellow] {note}")
    write_outputs(result, result_json, None, None)


def latency(model: OfflineModel = None,
            batch_size: Annotated[int, typer.Option(help="Prompts decoded together")] = 8,
            input_len: Annotated[int, typer.Option(help="Prompt tokens")] = 512,
            output_len: Annotated[int, typer.Option(help="Generated tokens")] = 128,
            num_iters: Annotated[int, typer.Option(help="Measured iterations")] = 3,
            num_iters_warmup: Annotated[int, typer.Option(help="Unmeasured first ones")] = 1,
            seed: Seed = 0, config: ConfigFile = None, engine_arg: EngineArg = None,
            dtype: Dtype = None, device: Device = None, max_model_len: MaxModelLen = None,
            max_num_seqs: MaxNumSeqs = None, kv_cache_memory: KvCacheMemory = None,
            result_json: Annotated[Optional[Path], typer.Option(
                help="Write the result here")] = None) -> None:
    """Per-step prefill and decode latency of one batch (in-process)."""
    from ferry.bench.offline import load_llm, run_latency

    try:
        for name, value in (("batch-size", batch_size), ("input-len", input_len),
                            ("output-len", output_len), ("num-iters", num_iters)):
            if value < 1:
                raise ValueError(f"--{name} must be >= 1, got {value}")
        if num_iters_warmup < 0:
            raise ValueError(f"--num-iters-warmup must be >= 0, got {num_iters_warmup}")
        args = _engine_args(config, engine_arg, dtype=dtype, device=device,
                            max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                            kv_cache_memory=kv_cache_memory)
        result = run_latency(load_llm(model, args), batch_size, input_len, output_len,
                             num_iters, num_iters_warmup, seed)
    except ValueError as exc:
        raise fail(str(exc)) from None
    console = Console()
    table = Table(title=f"ferry bench latency: {result['model']}, batch {batch_size}, "
                        f"input {input_len}, output {output_len} (ms)", title_justify="left")
    table.add_column("")
    for col in ("mean", "median", "p90", "p99"):
        table.add_column(col, justify="right")
    for name, key in (("Prefill (all first tokens)", "prefill_ms"),
                      ("Decode step", "decode_step_ms"), ("End to end", "e2e_ms")):
        table.add_row(name, *(fmt(result[key][c]) for c in ("mean", "median", "p90", "p99")))
    console.print(table)
    _print_limits(result, console)
    write_outputs(result, result_json, None, None)


def register_offline_commands(app: typer.Typer) -> None:
    app.command()(throughput)
    app.command()(latency)
