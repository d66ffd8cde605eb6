"""Command-line flags generated from the config parts' fields, so the CLI and config.yaml
never drift.

Every field ``some_key`` of every part becomes ``--some-key`` (booleans:
``--some-key/--no-some-key``), its help the field's ``description``. Values arrive as text
and are validated by the parts themselves, so a bad flag and a bad config.yaml entry get
the same message naming the key.
"""
from __future__ import annotations

import inspect
import os
import typing
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from pydantic.fields import FieldInfo

from ferry.config import ALL_PARTS, API_KEY_ENV, ConfigPart, FerryConfig, config_fields


def _presentation(field: FieldInfo) -> dict[str, Any]:
    """The field's CLI presentation (extra names, metavar, default as words), if any."""
    return (field.json_schema_extra or {}).get("cli", {})


def _shown_default(field: FieldInfo) -> str | bool:
    default = _presentation(field).get("default", field.default)
    if default is None:
        return False
    return str(default).lower() if isinstance(default, bool) else str(default)


def _aliases(name: str, field: FieldInfo) -> list[str]:
    """``--model`` for ``model_path``: the field's other accepted names, as flags."""
    choices = getattr(field.validation_alias, "choices", ())
    return ["--" + alias.replace("_", "-") for alias in choices if alias != name]


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


def config_flag_parameters(parts: dict[str, type[ConfigPart]] = ALL_PARTS,
                           ) -> list[inspect.Parameter]:
    """``inspect.Parameter``s with typer Options: ``--config`` plus one per key of
    ``parts`` (default: every part, the server's included)."""
    params = [inspect.Parameter(
        "config", inspect.Parameter.KEYWORD_ONLY, default=None,
        annotation=Annotated[Optional[Path], typer.Option(
            "--config", "-c", help="config.yaml whose keys are these flags' names with '_'; "
            "flags override it", metavar="PATH", show_default=False)])]
    return params + [_flag_parameter(name, field)
                     for name, field in config_fields(parts).items()]


def _flag_parameter(name: str, field: FieldInfo) -> inspect.Parameter:
    """``--name`` for one field: help is its description, values arrive as text."""
    flag = "--" + name.replace("_", "-")
    shown = _shown_default(field)
    if _is_bool(field.annotation):
        option = typer.Option(f"{flag}/--no-{flag[2:]}", help=field.description,
                              show_default=shown)
        annotation = Annotated[Optional[bool], option]
    else:
        cli = _presentation(field)
        option = typer.Option(flag, *_aliases(name, field), *cli.get("names", ()),
                              help=field.description, show_default=shown,
                              metavar=cli.get("metavar") or _metavar(field.annotation))
        annotation = Annotated[Optional[str], option]
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=annotation)


def with_config_flags(parts: dict[str, type[ConfigPart]] = ALL_PARTS,
                      extra: list[inspect.Parameter] = ()):
    """Decorator: give ``fn(**kwargs)`` a signature typer reads as the flags of ``parts``."""
    def decorate(fn):
        fn.__signature__ = inspect.Signature(list(extra) + config_flag_parameters(parts))
        return fn
    return decorate


def build_config(config: Path | None, flags: dict[str, Any], *,
                 use_env_api_key: bool = False) -> FerryConfig:
    """config.yaml, then ``FERRY_API_KEY``, then flags (later wins). ``ValueError`` names
    the bad key."""
    overrides = {k: v for k, v in flags.items() if v is not None}
    env_key = os.environ.get(API_KEY_ENV) if use_env_api_key else None
    if env_key and "api_key" not in overrides:
        overrides["api_key"] = env_key
    return FerryConfig.from_sources(config, **overrides)
