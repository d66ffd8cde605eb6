"""``tools`` and ``tool_choice`` checked, and the grammar that enforces required / named.

- ``none``: no tools in the prompt, plain text.
- ``auto`` (default when tools are given): the model decides; its text is parsed.
- ``required``: the output is a JSON array of one or more ``{"name", "parameters"}`` calls
  (one only when ``parallel_tool_calls`` is false), each validated by its tool's schema.
- named (``{"type": "function", "function": {"name": X}}``): the output is the JSON
  arguments object of X, validated by its schema.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ferry.sampling_params import StructuredOutputsParams

ANY_OBJECT = {"type": "object"}


@dataclass(frozen=True)
class ToolMode:
    """What the request asked: ``kind`` none | auto | required | named; ``name`` for named."""

    kind: str
    name: str | None = None

    @property
    def constrained(self) -> bool:
        return self.kind in ("required", "named")


def check_tools(tools: list[dict[str, Any]]) -> dict[str, dict]:
    """Function name -> parameters schema; ``ValueError`` naming what is wrong."""
    found: dict[str, dict] = {}
    for index, tool in enumerate(tools):
        if tool.get("type", "function") != "function" or not isinstance(tool.get("function"), dict):
            raise ValueError(f"tools.{index}: only {{'type': 'function', 'function': {{...}}}} "
                             "tools are supported")
        function = tool["function"]
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"tools.{index}.function.name must be a non-empty string")
        if name in found:
            raise ValueError(f"tools.{index}: the function name {name!r} is used twice")
        parameters = function.get("parameters", ANY_OBJECT)
        if not isinstance(parameters, dict):
            raise ValueError(f"tools.{index}.function.parameters must be a JSON schema object")
        found[name] = parameters or ANY_OBJECT
    return found


def tool_mode(tools: list[dict] | None, tool_choice: str | dict | None) -> ToolMode:
    """The request's mode; ``ValueError`` for a choice that does not fit its tools."""
    names = check_tools(tools or [])
    if tool_choice is None:
        return ToolMode("auto" if names else "none")
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise ValueError("tool_choice must be 'none', 'auto', 'required' or "
                             "{'type': 'function', 'function': {'name': ...}}")
        if tool_choice != "none" and not names:
            raise ValueError(f"tool_choice '{tool_choice}' needs a non-empty 'tools' list")
        return ToolMode(tool_choice)
    function = tool_choice.get("function") if tool_choice.get("type") == "function" else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise ValueError("a named tool_choice is {'type': 'function', 'function': {'name': ...}}")
    if name not in names:
        raise ValueError(f"tool_choice names the function {name!r}, which is not in 'tools'")
    return ToolMode("named", name)


def tool_constraint(tools: list[dict], mode: ToolMode,
                    parallel_tool_calls: bool | None) -> StructuredOutputsParams | None:
    """The JSON schema constraint of a required / named choice (None otherwise)."""
    names = check_tools(tools or [])
    if mode.kind == "named":
        return StructuredOutputsParams(json=names[mode.name])
    if mode.kind != "required":
        return None
    calls = [{"type": "object",
              "properties": {"name": {"const": name}, "parameters": schema},
              "required": ["name", "parameters"], "additionalProperties": False}
             for name, schema in names.items()]
    item = calls[0] if len(calls) == 1 else {"anyOf": calls}
    array: dict[str, Any] = {"type": "array", "items": item, "minItems": 1}
    if parallel_tool_calls is False:
        array["maxItems"] = 1
    return StructuredOutputsParams(json=array)
