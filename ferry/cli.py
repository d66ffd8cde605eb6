"""The ``ferry`` command: serve | generate | chat | bench | quantize.

``ferry serve [--config config.yaml] [--model X] [flags]`` starts the OpenAI-compatible
server; every config key is a flag (``max_num_seqs`` -> ``--max-num-seqs``) and a flag
overrides the file. Bad keys or values exit with code 2 and a message naming the key.
"""
from __future__ import annotations

import inspect
import logging
import sys
import uuid
from collections.abc import Iterator
from typing import Annotated, Any, Optional

import typer

from ferry.config import ENGINE_PARTS, FerryConfig
from ferry.sampling_params import RequestOutputKind
from ferry.server.cli_flags import build_config, with_config_flags

SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "top_k")
APP_HELP = "ferry: an LLM inference and serving engine."
# The optional extra (pyproject.toml) that provides each third-party module a command needs.
EXTRA_OF_MODULE = {"httpx": "bench", "matplotlib": "bench", "fastapi": "server",
                   "uvicorn": "server", "prometheus_client": "server", "rich": "server",
                   "starlette": "server"}

app = typer.Typer(name="ferry", help=APP_HELP,
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  rich_markup_mode=None)


def _print_version(value: bool) -> None:
    if value:
        from ferry import __version__

        typer.echo(f"ferry {__version__}")
        raise typer.Exit()


@app.callback(help=APP_HELP)
def _root(version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True,
        help="Print ferry's version and exit")] = False) -> None:
    """Only the ``--version`` option lives here; the commands are below."""


def missing_extra(exc: ImportError, default_extra: str) -> str:
    """The optional extra that provides the module ``exc`` could not import."""
    return EXTRA_OF_MODULE.get((exc.name or "").split(".")[0], default_extra)


def missing_extra_message(command: str, exc: ImportError, default_extra: str) -> str:
    """What to tell a user whose install lacks an optional extra: which one to install."""
    extra = missing_extra(exc, default_extra)
    return (f"`ferry {command}` needs the '{extra}' extra ({exc}): "
            f"pip install 'ferry[{extra}]'")


def _param(name: str, annotation: Any, default: Any, *decls: str, help: str,
           argument: bool = False, metavar: str | None = None) -> inspect.Parameter:
    info = (typer.Argument(help=help, show_default=False, metavar=metavar) if argument
            else typer.Option(*decls, help=help))
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[annotation, info])


def _sampling_parameters(default_max_tokens: int) -> list[inspect.Parameter]:
    return [
        _param("max_tokens", int, default_max_tokens, "--max-tokens",
               help="Most tokens to generate per answer"),
        _param("temperature", float, 0.0, "--temperature", "-t",
               help="Sampling temperature (0 = greedy)"),
        _param("top_p", float, 1.0, "--top-p", help="Nucleus sampling mass"),
        _param("top_k", int, -1, "--top-k", help="Sample among the k likeliest (-1: all)"),
    ]


def _fail(message: str, code: int) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _config_or_exit(kwargs: dict[str, Any], *, use_env_api_key: bool = False) -> FerryConfig:
    config_path = kwargs.pop("config", None)
    try:
        return build_config(config_path, kwargs, use_env_api_key=use_env_api_key)
    except ValueError as exc:
        _fail(str(exc), 2)


def _load_engine(config: FerryConfig, executor=None):
    """The Engine of ``config.engine``, built on ``executor``'s thread when given (the
    server's engine thread)."""
    from ferry.llm import build_engine

    try:
        if executor is not None:
            return executor.submit(build_engine, config.engine).result()
        return build_engine(config.engine)
    except (ValueError, FileNotFoundError, OSError) as exc:
        _fail(f"could not load the model: {exc}", 1)


# ---------------------------------------------------------------------------- serve
@app.command(help="Serve a model with an OpenAI-compatible HTTP API (/v1/completions, "
                  "/v1/chat/completions, /metrics, ...).")
@with_config_flags(extra=[_param("model_arg", Optional[str], None, argument=True,
                                 metavar="MODEL",
                                 help="Model directory or hub id (same as --model)")])
def serve(**kwargs: Any) -> None:
    model_arg = kwargs.pop("model_arg", None)
    if model_arg is not None:
        if kwargs.get("model_path") not in (None, model_arg):
            _fail(f"the model is given twice: {model_arg!r} and --model "
                  f"{kwargs['model_path']!r}", 2)
        kwargs["model_path"] = model_arg
    config_path = kwargs.get("config")
    flags = {k: v for k, v in kwargs.items() if k != "config" and v is not None}
    config = _config_or_exit(kwargs, use_env_api_key=True)
    logging.basicConfig(level=config.server.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        from ferry.server.api_server import run_server
        from ferry.server.async_engine import engine_executor
        from ferry.server.reload import ConfigSource
    except ImportError as exc:
        _fail(missing_extra_message("serve", exc, "server"), 1)

    if _serves_other_ranks(config):
        from ferry.distributed.teardown import exit_process

        exit_process(_run_worker_node(config))   # not the interpreter's teardown: see there
    executor = engine_executor()   # the engine is built on the thread that will run it
    # POST /admin/reload and SIGHUP read the file again, with the same flags on top.
    source = ConfigSource(config_path, flags, use_env_api_key=True) if config_path else None
    engine = _load_engine(config, executor)
    try:
        run_server(config, engine, executor, config_source=source)
    finally:
        model_executor = getattr(engine, "executor", None)
        if model_executor is not None:
            model_executor.shutdown()   # workers of a multi-rank model stop with the server


def _serves_other_ranks(config: FerryConfig) -> bool:
    """True on a node (or torchrun rank) that does not hold rank 0: it runs model ranks
    that follow rank 0, and no HTTP server."""
    from ferry.distributed.state import layouts_from_config

    parallel = config.engine.parallel
    if parallel.tensor_parallel_size * parallel.pipeline_parallel_size == 1:
        return False
    try:
        return layouts_from_config(parallel)[0].rank != 0
    except ValueError as exc:
        _fail(str(exc), 2)


def _run_worker_node(config: FerryConfig) -> int:
    from ferry.checkpoint import resolve_model_dir
    from ferry.executor.worker_process import run_node

    model = config.engine.model
    typer.echo(f"ferry: node {config.engine.parallel.node_rank} runs model ranks for the "
               f"server at {config.engine.parallel.master_addr}", err=True)
    return run_node(config.engine, resolve_model_dir(model.model_path, model.revision))


# ---------------------------------------------------------------------------- generate
_LORA_HELP = ("Answer with this LoRA adapter: a --lora-modules name, or a subdirectory of "
              "--lora-adapters-dir")


def _select_lora(engine: Any, name: str | None) -> str | None:
    """Make adapter ``name`` available (from lora_adapters_dir if not loaded yet)."""
    if name is None:
        return None
    from pathlib import Path

    from ferry.lora.adapter_config import LoRAError

    lora = getattr(engine, "lora", None)
    if lora is None:
        _fail("--lora needs --lora-modules NAME=PATH or --lora-adapters-dir DIR", 2)
    if name in lora.registry:
        return name
    root = engine.config.lora.lora_adapters_dir
    if not root:
        _fail(f"no LoRA adapter named {name!r}: give it with --lora-modules {name}=PATH", 2)
    try:
        lora.load(name, str(Path(root) / name), source="cli")
    except LoRAError as exc:
        _fail(str(exc), 2)
    return name


def _sampling(kwargs: dict[str, Any]):
    from ferry.sampling_params import SamplingParams

    values = {key: kwargs.pop(key) for key in SAMPLING_KEYS}
    try:
        return SamplingParams(**values)
    except ValueError as exc:
        _fail(str(exc), 2)


def fit_to_context(engine: Any, prompt_ids: list[int], params: Any) -> Any:
    """``params`` with ``max_tokens`` capped at the context the prompt leaves.

    A default such as chat's 512 may equal a small model's whole context; asking for it
    would fail every message. A prompt that fills the context is left to the engine,
    whose error says so."""
    room = engine.max_model_len - len(prompt_ids)
    if room < 1 or params.max_tokens is None or params.max_tokens <= room:
        return params
    return params.clone(max_tokens=room)


def read_piped_prompt(stream: Any) -> str:
    """The prompt on standard input, without the newline that ``echo`` or a file ends
    with (the model would otherwise see it as part of the prompt)."""
    return stream.read().rstrip("\r\n")


def stream_text(engine: Any, prompt: Any, params: Any,
                lora_name: str | None = None) -> Iterator[str]:
    """Run one request on a synchronous engine, yielding its new text as it comes."""
    request_id = f"cli-{uuid.uuid4().hex}"
    extra = {"lora_name": lora_name} if lora_name is not None else {}
    engine.add_request(request_id, prompt, params.clone(output_kind=RequestOutputKind.DELTA),
                       **extra)
    finished = False
    try:
        while not finished and engine.has_unfinished_requests():
            for output in engine.step():
                if output.request_id != request_id:
                    continue
                text = output.outputs[0].text if output.outputs else ""
                if text:
                    yield text
                finished = output.finished
    finally:
        if not finished:
            engine.abort_request(request_id)


@app.command(help="Generate one answer to PROMPT and stream it to the terminal "
                  "(PROMPT '-' or omitted: read standard input).")
@with_config_flags(
    ENGINE_PARTS,
    extra=[_param("prompt", Optional[str], None, argument=True, metavar="PROMPT",
                  help="The prompt text"),
           *_sampling_parameters(128),
           _param("chat", bool, False, "--chat/--no-chat",
                  help="Wrap the prompt in the model's chat template"),
           _param("lora", Optional[str], None, "--lora", help=_LORA_HELP)])
def generate(**kwargs: Any) -> None:
    prompt = kwargs.pop("prompt", None)
    use_chat = kwargs.pop("chat")
    lora_arg = kwargs.pop("lora")
    params = _sampling(kwargs)
    if prompt in (None, "-"):
        prompt = read_piped_prompt(sys.stdin)
    if not prompt.strip():
        _fail("the prompt is empty: pass it as an argument or on standard input", 2)
    config = _config_or_exit(kwargs)
    engine = _load_engine(config)
    lora_name = _select_lora(engine, lora_arg)
    try:
        # Token ids, so that max_tokens can be fitted to the context the prompt leaves.
        source = (engine.encode_chat([{"role": "user", "content": prompt}]) if use_chat
                  else list(engine.tokenizer.encode(prompt)))
        for piece in stream_text(engine, source, fit_to_context(engine, source, params),
                                 lora_name):
            sys.stdout.write(piece)
            sys.stdout.flush()
    except ValueError as exc:
        _fail(str(exc), 2)
    sys.stdout.write("\n")


# ---------------------------------------------------------------------------- chat
@app.command(help="Chat with a model in the terminal (uses its chat template). "
                  "Type /reset to start over, /exit or Ctrl-D to leave.")
@with_config_flags(
    ENGINE_PARTS,
    extra=[*_sampling_parameters(512),
           _param("system", Optional[str], None, "--system", help="A system message"),
           _param("lora", Optional[str], None, "--lora", help=_LORA_HELP)])
def chat(**kwargs: Any) -> None:
    system = kwargs.pop("system")
    lora_arg = kwargs.pop("lora")
    params = _sampling(kwargs)
    config = _config_or_exit(kwargs)
    engine = _load_engine(config)
    lora_name = _select_lora(engine, lora_arg)
    initial = [{"role": "system", "content": system}] if system else []
    messages = list(initial)
    typer.echo(f"chatting with {engine.served_model_name} (/reset, /exit)")
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            typer.echo("")
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip() == "/reset":
            messages = list(initial)
            continue
        if not line.strip():
            continue
        reply = _reply(engine, [*messages, {"role": "user", "content": line}], params,
                       lora_name)
        if reply is not None:   # a failed turn is not kept: the next one would fail too
            messages += [{"role": "user", "content": line},
                         {"role": "assistant", "content": reply}]


def _reply(engine: Any, messages: list[dict], params: Any,
           lora_name: str | None = None) -> str | None:
    """Stream the answer to ``messages``; its text, or None when the turn failed (an
    interrupted answer keeps what was shown)."""
    sys.stdout.write("assistant> ")
    pieces = []
    try:
        prompt_ids = engine.encode_chat(messages)
        for piece in stream_text(engine, prompt_ids, fit_to_context(engine, prompt_ids, params),
                                 lora_name):
            pieces.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
    except ValueError as exc:  # e.g. the conversation outgrew the context
        sys.stdout.write("\n")
        typer.echo(f"error: {exc} (this message was dropped; /reset starts over)", err=True)
        return None
    except KeyboardInterrupt:
        pass
    sys.stdout.write("\n")
    return "".join(pieces)


def mount_bench(target: typer.Typer) -> None:
    """``ferry bench`` on ``target``; without its extra, a stand-in that says which extra
    to install (the command stays in ``ferry --help`` rather than vanishing)."""
    try:
        from ferry.bench.cli import bench_app
    except ImportError as exc:
        _mount_missing(target, "bench", missing_extra_message("bench", exc, "bench"),
                       f"Not installed: pip install 'ferry[{missing_extra(exc, 'bench')}]'")
        return
    target.add_typer(bench_app, name="bench")


def _mount_missing(target: typer.Typer, name: str, message: str, help: str) -> None:
    """A command ``name`` listed with ``help`` that takes any arguments (``--help`` too)
    and fails with ``message``."""
    def missing() -> None:
        _fail(message, 1)

    target.command(name=name, help=help, add_help_option=False,
                   context_settings={"allow_extra_args": True,
                                     "ignore_unknown_options": True})(missing)


mount_bench(app)


def mount_quantize(target: typer.Typer) -> None:
    """``ferry quantize`` (ferry/quant/quantize/cli.py)."""
    from ferry.quant.quantize.cli import quantize
    target.command(name="quantize", help="Quantize a float checkpoint (RTN, GPTQ, AWQ) into "
                   "GPTQ, AWQ or compressed-tensors layouts.")(quantize)


mount_quantize(app)


def main() -> None:
    """Entry point of the ``ferry`` console script and ``python -m ferry``."""
    app()
