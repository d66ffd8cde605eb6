"""``ferry bench``: serve / sweep / compare (any OpenAI-compatible server), and the offline
throughput / latency benchmarks of ferry itself. Mounted by ``ferry/cli.py``; also runs as
``python -m ferry.bench.cli``.
"""
from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ferry.bench.cli_offline import register_offline_commands
from ferry.bench.cli_options import (SERVE_LEN_DEFAULTS, ApiKey, BaseUrl, Burstiness, Dataset,
                                     DatasetPath, Endpoint, ExtraBody, Goodput, IgnoreEos, Label,
                                     LongFraction, MaxConcurrency, MaxDuration, Model, NoProgress,
                                     NumPrefixes, NumPrompts, RangeRatio, RequestRate, Seed,
                                     ServeInputLen, ServeLongInputLen, ServeOutputLen,
                                     ServePrefixLen, Temperature, Timeout, Tokenizer, Warmup,
                                     fail, write_outputs)
from ferry.bench.datasets import DatasetOptions

bench_app = typer.Typer(name="bench", no_args_is_help=True, add_completion=False,
                        help="Benchmark ferry or any OpenAI-compatible server.")

_EXTRA_ARGS = {"allow_extra_args": True}


def _goodput_items(goodput: list[str] | None, extra: list[str]) -> list[str]:
    """``--goodput ttft:500 tpot:50``: the words after the first value arrive as extras."""
    if extra and not goodput:
        raise ValueError(f"unexpected arguments: {' '.join(extra)}")
    bad = [arg for arg in extra if ":" not in arg or arg.startswith("-")]
    if bad:
        raise ValueError(f"unexpected arguments: {' '.join(bad)}")
    return list(goodput or []) + list(extra)


def _parse_rate(text: str) -> float:
    try:
        rate = float(text)
    except ValueError:
        raise ValueError(f"--request-rate must be a number or inf, got {text!r}") from None
    if not rate > 0:
        raise ValueError(f"--request-rate must be > 0 or inf, got {text!r}")
    return rate


def _serve_config(opts: dict[str, Any], extra: list[str]):
    """Build a validated ServeConfig from the command's options (ValueError on bad input)."""
    from ferry.bench.metrics import parse_goodput
    from ferry.bench.serving import ServeConfig

    # The lengths left out take their defaults, which run_serve may fit to the server.
    fit_to_server = tuple(key for key in (*SERVE_LEN_DEFAULTS, "output_len") if opts[key] is None)
    opts = {**opts, **{key: opts[key] if opts[key] is not None else default
                       for key, default in SERVE_LEN_DEFAULTS.items()}}
    dataset = DatasetOptions(
        name=opts["dataset"], num_prompts=opts["num_prompts"], input_len=opts["input_len"],
        output_len=opts["output_len"], range_ratio=opts["range_ratio"],
        dataset_path=opts["dataset_path"], prefix_len=opts["prefix_len"],
        num_prefixes=opts["num_prefixes"], long_fraction=opts["long_fraction"],
        long_input_len=opts["long_input_len"], seed=opts["seed"])
    extra_body = {}
    if opts["extra_body"]:
        try:
            extra_body = json.loads(opts["extra_body"])
        except json.JSONDecodeError as exc:
            raise ValueError(f"--extra-body is not valid JSON: {exc}") from None
        if not isinstance(extra_body, dict):
            raise ValueError("--extra-body must be a JSON object, e.g. '{\"top_k\": 1}'")
    return ServeConfig(
        base_url=opts["base_url"], endpoint=opts["endpoint"], model=opts["model"],
        dataset=dataset, tokenizer=opts["tokenizer"],
        request_rate=_parse_rate(opts["request_rate"]), burstiness=opts["burstiness"],
        max_concurrency=opts["max_concurrency"], warmup=opts["warmup"],
        timeout=opts["timeout"], max_duration=opts["max_duration"],
        temperature=opts["temperature"], ignore_eos=opts["ignore_eos"], extra_body=extra_body,
        api_key=opts["api_key"], goodput=parse_goodput(_goodput_items(opts["goodput"], extra)),
        label=opts["label"], fit_to_server=fit_to_server)


class _Bar:
    """A rich progress bar on stderr, fed by the load generator's (done, total) hook."""

    def __init__(self, enabled: bool) -> None:
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(),
                                 console=Console(stderr=True), disable=not enabled)

    def __enter__(self) -> "_Bar":
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()

    def hook(self, description: str):
        task = self.progress.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            self.progress.update(task, completed=done, total=total)
        return update


# ------------------------------------------------------------------ serve
@bench_app.command(context_settings=_EXTRA_ARGS)
def serve(ctx: typer.Context,
          base_url: BaseUrl = "http://127.0.0.1:8000", endpoint: Endpoint = "/v1/completions",
          model: Model = None, tokenizer: Tokenizer = None, dataset: Dataset = "random",
          num_prompts: NumPrompts = 100, input_len: ServeInputLen = None,
          output_len: ServeOutputLen = None, range_ratio: RangeRatio = 0.0,
          dataset_path: DatasetPath = None, prefix_len: ServePrefixLen = None,
          num_prefixes: NumPrefixes = 4, long_fraction: LongFraction = 0.1,
          long_input_len: ServeLongInputLen = None, request_rate: RequestRate = "inf",
          burstiness: Burstiness = 1.0, max_concurrency: MaxConcurrency = None,
          seed: Seed = 0, warmup: Warmup = 0, timeout: Timeout = 300.0,
          max_duration: MaxDuration = None, temperature: Temperature = 0.0,
          ignore_eos: IgnoreEos = True, extra_body: ExtraBody = None, api_key: ApiKey = None,
          goodput: Goodput = None, label: Label = None,
          result_json: Annotated[Optional[Path], typer.Option(
              help="Write the summary and every request's timings here")] = None,
          plot: Annotated[Optional[Path], typer.Option(
              help="Write latency CDFs and throughput over time to this PNG")] = None,
          no_progress: NoProgress = False) -> None:
    """Drive an OpenAI-compatible server with streaming requests and report latency/throughput."""
    from ferry.bench.plots import plot_serve
    from ferry.bench.report import print_serve_report
    from ferry.bench.serving import run_serve

    opts = dict(locals())
    try:
        config = _serve_config(opts, list(ctx.args))
        with _Bar(not no_progress) as bar:
            result = asyncio.run(run_serve(config, bar.hook("requests")))
    except ValueError as exc:
        raise fail(str(exc)) from None
    except KeyboardInterrupt:
        raise fail("interrupted; no results written", code=130) from None
    print_serve_report(result, Console())
    write_outputs(result, result_json, plot, plot_serve)
    if result["summary"]["completed"] == 0:
        raise fail("no request succeeded (see the reasons above)", code=1)


# ------------------------------------------------------------------ sweep
@bench_app.command(context_settings=_EXTRA_ARGS)
def sweep(ctx: typer.Context,
          concurrencies: Annotated[Optional[str], typer.Option(
              help="Sweep these max concurrencies (request rate inf), e.g. 1,4,16")] = None,
          request_rates: Annotated[Optional[str], typer.Option(
              help="Sweep these request rates (Poisson), e.g. 1,2,4,inf")] = None,
          base_url: BaseUrl = "http://127.0.0.1:8000", endpoint: Endpoint = "/v1/completions",
          model: Model = None, tokenizer: Tokenizer = None, dataset: Dataset = "random",
          num_prompts: NumPrompts = 100, input_len: ServeInputLen = None,
          output_len: ServeOutputLen = None, range_ratio: RangeRatio = 0.0,
          dataset_path: DatasetPath = None, prefix_len: ServePrefixLen = None,
          num_prefixes: NumPrefixes = 4, long_fraction: LongFraction = 0.1,
          long_input_len: ServeLongInputLen = None, burstiness: Burstiness = 1.0,
          max_concurrency: MaxConcurrency = None, seed: Seed = 0, warmup: Warmup = 0,
          timeout: Timeout = 300.0, max_duration: MaxDuration = None,
          temperature: Temperature = 0.0, ignore_eos: IgnoreEos = True,
          extra_body: ExtraBody = None, api_key: ApiKey = None, goodput: Goodput = None,
          label: Label = None,
          result_json: Annotated[Optional[Path], typer.Option(
              help="Write the sweep (every point's summary) here")] = None,
          result_dir: Annotated[Optional[Path], typer.Option(
              help="Also write each point's full serve JSON into this directory")] = None,
          plot: Annotated[Optional[Path], typer.Option(
              help="Write throughput vs p99 latency curves to this PNG")] = None,
          no_progress: NoProgress = False) -> None:
    """Run `serve` at several concurrencies or request rates: the throughput/latency curve."""
    from ferry.bench.plots import plot_curves
    from ferry.bench.report import print_serve_report
    from ferry.bench.sweep import parse_loads, run_sweep

    opts = dict(locals())
    opts["request_rate"] = "inf"
    try:
        if (concurrencies is None) == (request_rates is None):
            raise ValueError("give exactly one of --concurrencies or --request-rates")
        mode = "concurrency" if concurrencies else "rate"
        loads = parse_loads(concurrencies or request_rates or "", mode)
        config = _serve_config(opts, list(ctx.args))
        console = Console()
        with _Bar(not no_progress) as bar:
            result = asyncio.run(run_sweep(config, mode, loads, result_dir,
                                           on_point=lambda r: print_serve_report(r, console),
                                           progress_factory=bar.hook))
    except ValueError as exc:
        raise fail(str(exc)) from None
    except KeyboardInterrupt:
        raise fail("interrupted; no sweep file written (see --result-dir for finished points)",
                   code=130) from None
    _print_sweep(result)
    write_outputs(result, result_json, None, None)
    if plot is not None:
        plot_curves([result], [result["label"]], plot)
        Console().print(f"plot written to {plot}")


def _print_sweep(result: dict[str, Any]) -> None:
    from rich.table import Table

    from ferry.bench.report import fmt

    table = Table(title=f"Sweep over {result['mode']}: {result['label']}", title_justify="left")
    for col in ({"concurrency": "conc."}.get(result["mode"], result["mode"]), "ok", "failed", "req/s", "out tok/s", "p99 TTFT ms",
                "p99 TPOT ms", "p99 E2E ms"):
        table.add_column(col, justify="right")
    for p in result["points"]:
        s = p["summary"]
        table.add_row(str(p["load"]), fmt(s["completed"]), fmt(s["failed"]),
                      fmt(s["request_throughput"]), fmt(s["output_throughput"]),
                      fmt(s["ttft_ms"]["p99"]), fmt(s["tpot_ms"]["p99"]), fmt(s["e2el_ms"]["p99"]))
    Console().print(table)


# ------------------------------------------------------------------ compare
@bench_app.command()
def compare(files: Annotated[list[Path], typer.Argument(help="serve or sweep result JSONs")],
            labels: Annotated[Optional[str], typer.Option(
                help="Comma-separated names, one per file (default: each file's label)")] = None,
            plot: Annotated[Optional[Path], typer.Option(
                help="Draw every file's throughput vs p99 latency on one PNG")] = None) -> None:
    """Side-by-side table of result files with ratios to the first one."""
    from ferry.bench.compare import compare_tables, default_labels
    from ferry.bench.plots import plot_curves
    from ferry.bench.report import load_result

    try:
        results = [load_result(f) for f in files]
        names = ([x.strip() for x in labels.split(",")] if labels
                 else default_labels(results, [str(f) for f in files]))
        tables = compare_tables(results, names)
    except ValueError as exc:
        raise fail(str(exc)) from None
    console = Console()
    for table in tables:
        console.print(table)
    if plot is not None:
        plot_curves(results, names, plot)
        console.print(f"plot written to {plot}")


register_offline_commands(bench_app)


if __name__ == "__main__":
    bench_app()
