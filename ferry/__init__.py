"""ferry: an open LLM inference and serving engine."""
from __future__ import annotations

__version__ = "0.1.0"

# First, before anything imports torch: libgomp reads its wait policy when it is loaded.
from ferry.openmp_env import set_wait_policy_defaults  # noqa: E402

set_wait_policy_defaults()

# Large per-step tensors reuse freed heap memory instead of faulting in fresh pages.
from ferry.malloc_tuning import tune_malloc  # noqa: E402

tune_malloc()

from ferry.outputs import CompletionOutput, RequestOutput  # noqa: E402
from ferry.lora.request import LoRARequest  # noqa: E402
from ferry.sampling_params import RequestOutputKind, SamplingParams  # noqa: E402


def __getattr__(name: str):
    # LLM pulls in torch and the model code: import it only when asked for, so that
    # `ferry --help` and the bench client stay light.
    if name == "LLM":
        from ferry.llm import LLM
        return LLM
    raise AttributeError(f"module 'ferry' has no attribute {name!r}")


__all__ = ["LLM", "LoRARequest", "SamplingParams", "RequestOutputKind", "RequestOutput",
           "CompletionOutput", "__version__"]
