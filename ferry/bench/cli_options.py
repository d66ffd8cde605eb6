"""Options shared by the ``ferry bench`` commands (typer ``Annotated`` aliases) and helpers."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from ferry.bench.datasets import DATASETS

BaseUrl = Annotated[str, typer.Option(help="Server root, e.g. http://127.0.0.1:8000")]
Endpoint = Annotated[str, typer.Option(
    help="/v1/completions or /v1/chat/completions (or 'completions' / 'chat')")]
Model = Annotated[Optional[str], typer.Option(
    help="Model name sent in requests (default: the first one in /v1/models)")]
Tokenizer = Annotated[Optional[str], typer.Option(
    help="Tokenizer dir or cached hub id for token-exact prompts (default: the model path the "
         "server reports, or --model; else the server's /tokenize)")]
Dataset = Annotated[str, typer.Option("--dataset", "--dataset-name", help=f"One of: {', '.join(DATASETS)}")]
NumPrompts = Annotated[int, typer.Option(help="Requests to send (after warmup)")]
InputLen = Annotated[int, typer.Option(
    help="Prompt tokens (random, mixed: short prompts; prefix: the unique suffix)")]
OutputLen = Annotated[Optional[int], typer.Option(
    help="Tokens to generate per request [default: 128; sharegpt: the reply's length]")]
# serve / sweep: a length left out takes its default, shrunk to fit the server's context
# (its max_model_len in /v1/models) with a note; a length given is sent as given.
SERVE_LEN_DEFAULTS = {"input_len": 1024, "prefix_len": 512, "long_input_len": 4096}
_FITS = "shrunk to fit the server's max_model_len"
ServeInputLen = Annotated[Optional[int], typer.Option(
    help="Prompt tokens (random, mixed: short prompts; prefix: the unique suffix) "
         f"[default: 1024, {_FITS}]", show_default=False)]
ServeOutputLen = Annotated[Optional[int], typer.Option(
    help=f"Tokens to generate per request [default: 128, {_FITS}; sharegpt: the reply's "
         "length]", show_default=False)]
ServePrefixLen = Annotated[Optional[int], typer.Option(
    help=f"prefix: tokens in each shared prefix [default: 512, {_FITS}]", show_default=False)]
ServeLongInputLen = Annotated[Optional[int], typer.Option(
    help=f"mixed: tokens in a long prompt [default: 4096, {_FITS}]", show_default=False)]
RangeRatio = Annotated[float, typer.Option(
    help="random: lengths drawn uniformly from len*(1-r)..len*(1+r)")]
DatasetPath = Annotated[Optional[str], typer.Option(help="sharegpt: local ShareGPT JSON file")]
PrefixLen = Annotated[int, typer.Option(help="prefix: tokens in each shared prefix")]
NumPrefixes = Annotated[int, typer.Option(help="prefix: number of distinct shared prefixes")]
LongFraction = Annotated[float, typer.Option(help="mixed: share of long prompts (0..1)")]
LongInputLen = Annotated[int, typer.Option(help="mixed: tokens in a long prompt")]
RequestRate = Annotated[str, typer.Option(
    help="Mean requests per second (Poisson arrivals), or inf to send all at once")]
Burstiness = Annotated[float, typer.Option(
    help="Gamma shape of the arrival gaps: 1 = Poisson, <1 burstier, >1 more regular")]
MaxConcurrency = Annotated[Optional[int], typer.Option(help="Cap on requests in flight")]
Seed = Annotated[int, typer.Option(help="Seed of the dataset and the arrival times")]
Warmup = Annotated[int, typer.Option(help="Unmeasured requests sent before the run")]
Timeout = Annotated[float, typer.Option(help="Seconds allowed for each request")]
MaxDuration = Annotated[Optional[float], typer.Option(
    help="Stop the run after this many seconds; unfinished requests count as failed")]
Temperature = Annotated[float, typer.Option(help="Sampling temperature sent with requests")]
IgnoreEos = Annotated[bool, typer.Option(
    help="Send ignore_eos so outputs have exactly --output-len tokens (vLLM/ferry/SGLang "
         "extension; turn off for servers that reject it)")]
ExtraBody = Annotated[Optional[str], typer.Option(
    help="JSON object merged into each request body; a null value removes a key the bench "
         "sends by default, e.g. '{\"stream_options\": null}'")]
ApiKey = Annotated[Optional[str], typer.Option(envvar="OPENAI_API_KEY",
                                               help="Bearer token for the server")]
Goodput = Annotated[Optional[list[str]], typer.Option(
    help="SLOs in ms for goodput, e.g. --goodput ttft:500 tpot:50 (metrics: ttft, tpot, e2el)")]
Label = Annotated[Optional[str], typer.Option(help="Name of this engine/run in reports")]
NoProgress = Annotated[bool, typer.Option("--no-progress", help="Hide the progress bar")]


def fail(message: str, code: int = 2) -> typer.Exit:
    Console(stderr=True).print(f"[red]error:[/red] {message}")
    return typer.Exit(code)


def write_outputs(result: dict[str, Any], result_json: Path | None, plot: Path | None,
                  plotter) -> None:
    from ferry.bench.report import write_json

    console = Console()
    if result_json is not None:
        write_json(result, result_json)
        console.print(f"results written to {result_json}")
    if plot is not None:
        plotter(result, plot)
        console.print(f"plot written to {plot}")


