"""Where the Triton kernel tests run: compiled on a GPU when there is one, and through
Triton's interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1 before
anything imports triton on a machine without a GPU)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from ferry.kernels.triton._common import interpreter_active  # noqa: E402

DEVICES = [pytest.param("cuda", marks=pytest.mark.gpu)] if torch.cuda.is_available() else []
if interpreter_active():
    DEVICES.append("cpu")
if not DEVICES:
    raise RuntimeError("triton was imported before TRITON_INTERPRET=1 was set and there is no "
                       "GPU: run the kernel tests through pytest from the repository root")
