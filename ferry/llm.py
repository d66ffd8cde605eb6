"""The offline API: ``LLM(model=...).generate(prompts, SamplingParams(...))``."""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from ferry.checkpoint import resolve_model_dir
from ferry.config import EngineConfig
from ferry.engine.engine import Engine
from ferry.executor.in_process import InProcessExecutor
from ferry.lora.request import LoRARequest
from ferry.outputs import RequestOutput
from ferry.sampling_params import SamplingParams

Prompt = str | dict | list[int]


def build_engine(config: EngineConfig) -> Engine:
    """An Engine over the executor the config asks for: one device in this process, or
    this process as rank 0 of several (tensor/pipeline parallel, ``MultiprocessExecutor``)."""
    model_dir = resolve_model_dir(config.model.model_path, config.model.revision)
    parallel = config.parallel
    factory = _grammar_compiler_factory(config)
    if parallel.tensor_parallel_size * parallel.pipeline_parallel_size > 1:
        from ferry.executor.multiprocess import MultiprocessExecutor

        return Engine(config, MultiprocessExecutor(config, model_dir), model_dir,
                      grammar_compiler_factory=factory)
    return Engine(config, InProcessExecutor(config, model_dir), model_dir,
                  grammar_compiler_factory=factory)


def _grammar_compiler_factory(config: EngineConfig):
    """Builds the engine's grammar compiler once the tokenizer and vocabulary are known
    (the backend itself loads on the first constrained request)."""
    from ferry.structured_output import make_compiler

    def factory(tokenizer, vocab_size: int, stop_token_ids: list[int]):
        return make_compiler(config.model.structured_output_backend, tokenizer, vocab_size,
                             stop_token_ids)

    return factory


class LLM:
    """Run a model over many prompts at once with continuous batching.

    ``model`` is a local directory or a hub id (None: the bundled demo model); any
    engine config key (see docs/configuration.md) may be passed as a keyword. Server keys
    (``api_key``, ``port``, ...) are refused: they belong to ``ferry serve``.
    """

    def __init__(self, model: str | None = None, **config: Any) -> None:
        self.config = EngineConfig.from_sources(model=model, **config)
        self.engine = build_engine(self.config)
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 *, use_tqdm: bool = True, priority: Sequence[int] | None = None,
                 lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
                 debug_trace: bool = False) -> list[RequestOutput]:
        """Generate for each prompt; returns RequestOutputs in input order.

        A prompt is a string or ``{"prompt_token_ids": [...]}``. ``sampling_params`` is one
        SamplingParams for all prompts or a list with one per prompt. ``lora_request`` runs
        them with a LoRA adapter (one for all, or one per prompt, None = base model); an
        adapter given with a path is loaded first (LoRA needs ``LLM(..., enable_lora=True)``).
        ``debug_trace``: each output's ``debug_trace`` holds its attention trace (needs
        ``LLM(..., debug_trace="attention")``).
        """
        prompts = _as_prompt_list(prompts)
        params = _as_params_list(sampling_params, len(prompts))
        if debug_trace:
            params = [p.clone(debug_trace=True) for p in params]
        priorities = _as_priority_list(priority, len(prompts))
        loras = self._lora_names(lora_request, len(prompts))
        return self._run(prompts, params, priorities, use_tqdm, loras)

    def load_lora(self, name: str, path: str, *, load_inplace: bool = False) -> None:
        """Load (or with ``load_inplace``, replace) the LoRA adapter ``name`` from ``path``."""
        self._lora().load(name, path, load_inplace=load_inplace, source="python")

    def unload_lora(self, name: str) -> None:
        self._lora().unload(name)

    def _lora(self):
        if self.engine.lora is None:
            raise ValueError("LoRA serving is off: create LLM(..., enable_lora=True)")
        return self.engine.lora

    def _lora_names(self, lora_request: Any, n: int) -> list[str | None]:
        requests = (list(lora_request) if isinstance(lora_request, (list, tuple))
                    else [lora_request] * n)
        if len(requests) != n:
            raise ValueError(f"got {len(requests)} lora_requests for {n} prompts")
        names: list[str | None] = []
        for item in requests:
            if item is None:
                names.append(None)
                continue
            if not isinstance(item, LoRARequest):
                raise ValueError(f"lora_request must be a LoRARequest, got {type(item).__name__}")
            entry = self._lora().registry.get(item.lora_name)
            if item.lora_path is not None and (entry is None or entry.path != str(item.lora_path)):
                self.load_lora(item.lora_name, str(item.lora_path), load_inplace=True)
            names.append(item.lora_name)
        return names

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             *, add_generation_prompt: bool = True, use_tqdm: bool = True,
             ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them."""
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a conversation (a list of {'role', 'content'} "
                             "dicts) or a list of conversations")
        conversations = [messages] if isinstance(messages[0], dict) else messages
        prompts = [{"prompt_token_ids": self.engine.encode_chat(_check_conversation(c),
                                                                add_generation_prompt)}
                   for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _run(self, prompts: list[Prompt], params: list[SamplingParams],
             priorities: list[int | None], use_tqdm: bool,
             loras: list[str | None] | None = None) -> list[RequestOutput]:
        order: dict[str, int] = {}
        loras = loras or [None] * len(prompts)
        try:
            for index, (prompt, p, prio, lora) in enumerate(zip(prompts, params, priorities, loras)):
                request_id = f"llm-{next(self._ids)}"
                if p.structured_outputs is not None:   # a bad constraint raises here
                    self.engine.structured_output.compile_now(p.structured_outputs)
                self.engine.add_request(request_id, prompt, p, priority=prio, stream=False,
                                        lora_name=lora)
                order[request_id] = index
        except ValueError as exc:
            self.engine.abort_request(list(order))
            raise ValueError(f"prompt {len(order)}: {exc}") from None
        results: list[RequestOutput | None] = [None] * len(prompts)
        bar = tqdm(total=len(prompts), desc="Generating", disable=not use_tqdm, unit="req")
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished and out.request_id in order:
                        results[order[out.request_id]] = out
                        bar.update(1)
        finally:
            bar.close()
            self.engine.abort_request(list(order))  # frees anything left after an interrupt
        return results  # type: ignore[return-value]


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, Sequence) and prompts and all(isinstance(t, int) for t in prompts):
        raise ValueError("pass token ids as {'prompt_token_ids': [...]}, not a bare list of ints")
    if not isinstance(prompts, Sequence) or not prompts:
        raise ValueError("prompts must be a string, a {'prompt_token_ids': [...]} dict, "
                         "or a non-empty list of them")
    for i, p in enumerate(prompts):
        if not isinstance(p, (str, dict)):
            raise ValueError(f"prompt {i} must be a string or a {{'prompt_token_ids': [...]}} "
                             f"dict, got {type(p).__name__}")
    return list(prompts)


def _as_params_list(params: SamplingParams | Sequence[SamplingParams] | None,
                    n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"got {len(params)} SamplingParams for {n} prompts: pass one, "
                         f"or one per prompt")
    if not all(isinstance(p, SamplingParams) for p in params):
        raise ValueError("sampling_params must hold SamplingParams objects")
    return params


def _as_priority_list(priority: Sequence[int] | None, n: int) -> list[int | None]:
    if priority is None:
        return [None] * n
    if len(priority) != n:
        raise ValueError(f"got {len(priority)} priorities for {n} prompts")
    return list(priority)


def _check_conversation(conversation: Any) -> list[dict]:
    if not isinstance(conversation, list) or not all(
            isinstance(m, dict) and "role" in m and "content" in m for m in conversation):
        raise ValueError("each message must be a dict with 'role' and 'content'")
    return conversation
