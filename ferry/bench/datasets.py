"""Workloads for ``ferry bench``: the prompts to send and how many tokens to ask back.

- ``random``: random words, ``input_len``/``output_len`` each spread by ``range_ratio``.
- ``sharegpt``: first human turn and the reply's length from a local ShareGPT JSON file.
- ``prefix``: ``num_prefixes`` shared prefixes of ``prefix_len`` tokens, each followed by
  unique ``input_len``-token suffixes (measures prefix caching).
- ``mixed``: a ``long_fraction`` share of ``long_input_len``-token prompts among
  ``input_len``-token ones (measures head-of-line blocking; tags "long"/"short").
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ferry.bench.tokens import PromptMaker

DATASETS = ("random", "sharegpt", "prefix", "mixed")
# ShareGPT filters (as commonly used): drop tiny turns and very long conversations.
_SHAREGPT_MIN_LEN, _SHAREGPT_MAX_PROMPT, _SHAREGPT_MAX_TOTAL = 4, 1024, 2048


@dataclass
class SampleRequest:
    """One prompt of a workload: its token count and the number of tokens to ask for."""

    prompt: str
    prompt_len: int
    output_len: int
    tag: str | None = None


@dataclass
class DatasetOptions:
    """What to generate; validated on construction (bad values raise ``ValueError``)."""

    name: str = "random"
    num_prompts: int = 100
    input_len: int = 1024
    output_len: int | None = None      # None: 128, or the reply's length for sharegpt
    range_ratio: float = 0.0
    dataset_path: str | None = None
    prefix_len: int = 512
    num_prefixes: int = 4
    long_fraction: float = 0.1
    long_input_len: int = 4096
    seed: int = 0

    def __post_init__(self) -> None:
        if self.name not in DATASETS:
            raise ValueError(f"unknown dataset {self.name!r}; choose one of {', '.join(DATASETS)}")
        positive = {"num_prompts": self.num_prompts, "input_len": self.input_len,
                    "prefix_len": self.prefix_len, "num_prefixes": self.num_prefixes,
                    "long_input_len": self.long_input_len}
        for key, value in positive.items():
            if value < 1:
                raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {value}")
        if self.output_len is not None and self.output_len < 1:
            raise ValueError(f"--output-len must be >= 1, got {self.output_len}")
        if not 0 <= self.range_ratio < 1:
            raise ValueError(f"--range-ratio must be in [0, 1), got {self.range_ratio}")
        if not 0 <= self.long_fraction <= 1:
            raise ValueError(f"--long-fraction must be in [0, 1], got {self.long_fraction}")
        if self.name == "sharegpt" and not self.dataset_path:
            raise ValueError("the sharegpt dataset needs --dataset-path pointing to a local "
                             "ShareGPT-format JSON file (nothing is downloaded)")

    @property
    def default_output_len(self) -> int:
        return self.output_len if self.output_len is not None else 128


@dataclass
class Workload:
    """The sampled requests plus how faithful their token counts are."""

    requests: list[SampleRequest]
    token_exact: bool
    notes: list[str] = field(default_factory=list)


def longest_request(opts: DatasetOptions) -> int | None:
    """Most tokens (prompt plus output) one request of the workload may ask for; None for
    sharegpt, whose lengths come from the file."""
    if opts.name == "sharegpt":
        return None
    spread = 1 + opts.range_ratio if opts.name == "random" else 1.0
    prompt = {"random": opts.input_len * spread,
              "prefix": opts.prefix_len + opts.input_len,
              "mixed": max(opts.input_len, opts.long_input_len)}[opts.name]
    # The epsilon keeps float noise (340 * 1.2 = 408.00000000000006) from adding a token.
    return math.ceil(prompt + opts.default_output_len * spread - 1e-9)


def fit_to_context(opts: DatasetOptions, max_model_len: int, defaulted: tuple[str, ...],
                   reserve: int) -> tuple[DatasetOptions, str | None]:
    """Shrink the lengths left at their defaults (``defaulted``) so that every request fits
    a server context of ``max_model_len`` tokens, keeping ``reserve`` of them for special
    tokens and a chat template. Returns the options and a note saying what changed (or
    that the lengths given do not fit), None when they fit as they are."""
    longest = longest_request(opts)
    if longest is None or longest <= max_model_len - reserve:
        return opts, None
    fitted = dataclasses.replace(opts, **_fitted_lengths(opts, max_model_len - reserve,
                                                         defaulted))
    if longest_request(fitted) > max_model_len:
        return fitted, (f"requests of up to {longest_request(fitted)} tokens exceed the "
                        f"server's max_model_len of {max_model_len}; lower --input-len / "
                        "--output-len")
    changed = [f"{key} {before} -> {after}" for key, before, after in _lengths(opts, fitted)
               if before != after]
    if not changed:   # the lengths given fit, if tightly
        return fitted, None
    return fitted, (f"the server's max_model_len is {max_model_len}: the default lengths "
                    f"were shrunk to fit ({', '.join(changed)}); pass --input-len / "
                    "--output-len to choose")


def _lengths(before: DatasetOptions, after: DatasetOptions):
    """(name, value before, value after) of the lengths fit_to_context may change."""
    yield "input_len", before.input_len, after.input_len
    yield "output_len", before.default_output_len, after.default_output_len
    if before.name == "prefix":
        yield "prefix_len", before.prefix_len, after.prefix_len
    if before.name == "mixed":
        yield "long_input_len", before.long_input_len, after.long_input_len


def _fitted_lengths(opts: DatasetOptions, budget: int, defaulted: tuple[str, ...]
                    ) -> dict[str, int]:
    """New values for the defaulted lengths: the output an eighth of the budget at most,
    the prompt parts what is left (the prefix and its suffix in their ratio, the short and
    long prompts of ``mixed`` too)."""
    spread = 1 + opts.range_ratio if opts.name == "random" else 1.0
    out = opts.default_output_len
    changes: dict[str, int] = {}
    if "output_len" in defaulted:
        out = changes["output_len"] = max(1, min(out, budget // 8))
    room = max(int((budget - math.ceil(out * spread)) / spread), 1)
    if opts.name == "random" and "input_len" in defaulted:
        changes["input_len"] = min(opts.input_len, room)
    elif opts.name == "prefix":
        fixed = sum(getattr(opts, k) for k in ("prefix_len", "input_len") if k not in defaulted)
        scalable = sum(getattr(opts, k) for k in ("prefix_len", "input_len") if k in defaulted)
        scale = min(1.0, max(room - fixed, 0) / scalable) if scalable else 1.0
        changes.update({k: max(1, int(getattr(opts, k) * scale))
                        for k in ("prefix_len", "input_len") if k in defaulted})
    elif opts.name == "mixed":
        ratio = opts.input_len / opts.long_input_len
        if "long_input_len" in defaulted:
            changes["long_input_len"] = min(opts.long_input_len, room)
        if "input_len" in defaulted:
            long_len = changes.get("long_input_len", opts.long_input_len)
            changes["input_len"] = max(1, min(opts.input_len, room, int(long_len * ratio)))
    return changes


def build_workload(options: DatasetOptions, tokenizer: Any | None, tokenizer_note: str = "",
                   counter: Callable[[str], int] | None = None) -> Workload:
    """Sample ``options.num_prompts`` requests, reproducibly for ``options.seed``.

    Token counts come from ``tokenizer``, else from ``counter`` (e.g. the server's
    ``/tokenize``), else are approximated by words (and a note says so).
    """
    rng = random.Random(options.seed)
    maker = PromptMaker(tokenizer, rng, None if tokenizer is not None else counter)
    builders = {"random": _random, "sharegpt": _sharegpt, "prefix": _prefix, "mixed": _mixed}
    requests, notes = builders[options.name](options, maker, rng)
    if not maker.exact:
        notes.insert(0, "prompt lengths are approximate (one word per token): "
                     + (tokenizer_note or "no tokenizer"))
    elif tokenizer is None:
        notes.insert(0, "prompt lengths counted by the server's /tokenize (no local tokenizer)")
    return Workload(requests, maker.exact, notes)


def _spread(value: int, ratio: float, rng: random.Random) -> int:
    low, high = max(1, int(value * (1 - ratio))), max(1, int(value * (1 + ratio)))
    return rng.randint(low, high)


def _random(opts: DatasetOptions, maker: PromptMaker, rng: random.Random):
    out = []
    for _ in range(opts.num_prompts):
        in_len = max(_spread(opts.input_len, opts.range_ratio, rng), maker.num_special + 1)
        out_len = _spread(opts.default_output_len, opts.range_ratio, rng)
        prompt = maker.prompt(in_len)
        out.append(SampleRequest(prompt, maker.length(prompt), out_len))
    return out, []


def _prefix(opts: DatasetOptions, maker: PromptMaker, rng: random.Random):
    prefixes = [maker.words(opts.prefix_len) for _ in range(opts.num_prefixes)]
    out = []
    for i in range(opts.num_prompts):
        prefix = prefixes[i % opts.num_prefixes]
        total = maker.num_special + opts.prefix_len + opts.input_len
        prompt = maker.prompt(total, prefix=prefix)
        out.append(SampleRequest(prompt, maker.length(prompt), opts.default_output_len,
                                 tag=f"prefix{i % opts.num_prefixes}"))
    rng.shuffle(out)  # interleave the groups so that arrivals mix prefixes
    per_group = opts.num_prompts / opts.num_prefixes
    return out, [f"{opts.num_prefixes} prefixes x ~{per_group:.0f} suffixes; the best possible "
                 f"prefix-cache hit share is about "
                 f"{_best_hit_share(opts):.0%} of prompt tokens"]


def _best_hit_share(opts: DatasetOptions) -> float:
    reused = (opts.num_prompts - min(opts.num_prefixes, opts.num_prompts)) * opts.prefix_len
    return reused / (opts.num_prompts * (opts.prefix_len + opts.input_len))


def _mixed(opts: DatasetOptions, maker: PromptMaker, rng: random.Random):
    num_long = round(opts.num_prompts * opts.long_fraction)
    is_long = [True] * num_long + [False] * (opts.num_prompts - num_long)
    rng.shuffle(is_long)
    out = []
    for long in is_long:
        length = opts.long_input_len if long else opts.input_len
        prompt = maker.prompt(max(length, maker.num_special + 1))
        out.append(SampleRequest(prompt, maker.length(prompt), opts.default_output_len,
                                 tag="long" if long else "short"))
    return out, [f"{num_long} of {opts.num_prompts} prompts are long "
                 f"({opts.long_input_len} tokens vs {opts.input_len})"]


def _sharegpt(opts: DatasetOptions, maker: PromptMaker, rng: random.Random):
    pairs = load_sharegpt_pairs(opts.dataset_path)
    rng.shuffle(pairs)
    out = []
    for prompt, reply in pairs:
        prompt_len = maker.length(prompt)
        out_len = opts.output_len or maker.content_length(reply)
        if prompt_len < _SHAREGPT_MIN_LEN or out_len < _SHAREGPT_MIN_LEN:
            continue
        if prompt_len > _SHAREGPT_MAX_PROMPT or prompt_len + out_len > _SHAREGPT_MAX_TOTAL:
            continue
        out.append(SampleRequest(prompt, prompt_len, out_len))
        if len(out) == opts.num_prompts:
            return out, []
    if not out:
        raise ValueError(f"no usable conversation in {opts.dataset_path} (each needs a human "
                         f"turn and a reply of {_SHAREGPT_MIN_LEN}+ tokens, "
                         f"at most {_SHAREGPT_MAX_TOTAL} tokens together)")
    note = (f"only {len(out)} usable conversations for {opts.num_prompts} prompts: "
            f"they are reused in order")
    return [out[i % len(out)] for i in range(opts.num_prompts)], [note]


def load_sharegpt_pairs(path: str | Path) -> list[tuple[str, str]]:
    """(first human turn, first reply) of every conversation in a ShareGPT-format file.

    Accepts ``{"conversations": [{"from": "human", "value": ...}, ...]}`` entries (and the
    ``role``/``content`` spelling). Raises ``ValueError`` for a missing or malformed file.
    """
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"dataset file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"dataset file {path} is not valid JSON: {exc}") from None
    if not isinstance(data, list):
        raise ValueError(f"dataset file {path} must hold a JSON list of conversations")
    pairs = []
    for entry in data:
        if not isinstance(entry, dict):
            continue
        turns = entry.get("conversations") or entry.get("conversation") or []
        texts = [t.get("value", t.get("content")) for t in turns if isinstance(t, dict)]
        if len(texts) >= 2 and all(isinstance(t, str) for t in texts[:2]):
            pairs.append((texts[0], texts[1]))
    return pairs
