"""Shared pytest fixtures: tiny random HF checkpoints, built once per session."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

# Without a GPU, Triton kernels run in its interpreter; it must be set before the first
# `import triton` anywhere in the session.
if not any(Path(dev).exists() for dev in ("/dev/nvidia0", "/dev/kfd")):
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))  # so tests can `import tiny_models`

from tiny_models import make_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Callable[..., Path]:
    """Factory: ``tiny_model_dir("qwen2", num_hidden_layers=3) -> Path``, cached per session.

    Returned directories are shared between tests: treat them as read-only (copy before
    modifying).
    """
    cache: dict[tuple, Path] = {}

    def build(arch: str, **overrides: Any) -> Path:
        key = (arch, tuple(sorted((k, repr(v)) for k, v in overrides.items())))
        if key not in cache:
            cache[key] = make_tiny_model(arch, tmp_path_factory.mktemp(f"tiny_{arch}"), **overrides)
        return cache[key]

    return build
