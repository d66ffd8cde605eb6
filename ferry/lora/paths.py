"""Where an adapter may be loaded from over HTTP: inside ``lora_adapters_dir`` or an allow-list.

A requested path is resolved with every symlink followed; the real path must lie inside the
real adapters directory (or be one of the allowed directories, e.g. the ``lora_modules``
given at start). ``..`` components are refused outright, so a request can never name a
directory elsewhere on the machine, and a symlink out of the directory is refused too.
"""
from __future__ import annotations

import os
from pathlib import Path

from ferry.lora.adapter_config import LoRAError, LoRANotFoundError


def resolve_adapter_path(requested: str, adapters_dir: str | None,
                         allowed: tuple[str, ...] = ()) -> Path:
    """The real directory of ``requested``; :class:`LoRAError` (400) when it is not a path
    this server may read, :class:`LoRANotFoundError` (404) when nothing is there."""
    if not isinstance(requested, str) or not requested.strip() or "\x00" in requested:
        raise LoRAError("lora_path must be a non-empty path")
    given = Path(requested)
    if ".." in given.parts:
        raise LoRAError(f"lora_path {requested!r} must not contain '..'")
    allowed_real = {os.path.realpath(p) for p in allowed}
    root = os.path.realpath(adapters_dir) if adapters_dir else None
    candidate = given if given.is_absolute() or root is None else Path(root) / given
    real = os.path.realpath(candidate)
    inside = root is not None and (real == root or real.startswith(root + os.sep))
    if real == root:
        raise LoRAError(f"lora_path {requested!r} is the adapters directory itself; name one "
                        "of its subdirectories")
    if not inside and real not in allowed_real:
        where = (f"inside lora_adapters_dir ({adapters_dir})" if root is not None else
                 "inside lora_adapters_dir, and this server has none (start it with "
                 "--lora-adapters-dir DIR)")
        raise LoRAError(f"lora_path {requested!r} is not allowed: adapters are loaded only "
                        f"from {where} or from the --lora-modules paths (symlinks are followed)")
    if not os.path.isdir(real):
        raise LoRANotFoundError(f"no LoRA adapter at {requested!r}: no such directory")
    return Path(real)
