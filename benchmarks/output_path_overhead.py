"""Host time of the output path per step, at output length 64 and 1024: does it grow?

The output path is what runs after the forward for every stream, every step: the engine's
OutputProcessor (append the token, detokenize, stop strings, build the RequestOutput) and
the server's SSE chunk (``serving_completions._delta_choice`` and the JSON). No model runs:
B streams get one token per step until they hold 4096, with logprobs and a stop string
that never matches, and each step is timed in this thread's CPU time (a shared machine
takes the core away now and then; CPU time does not count those gaps). A cost that grows
with the output length shows as a higher figure at 1024 (and 4096) than at 64.

It runs against whichever ferry is on ``PYTHONPATH`` (the same script for before and
after): a tree with ``RequestOutputKind`` streams DELTA outputs, as its server does; an
older tree has only cumulative outputs, which its server diffed against what it had sent.

    python benchmarks/output_path_overhead.py [--streams 16] [--length 4096] [--json out.json]
    PYTHONPATH=/path/to/older/ferry python benchmarks/output_path_overhead.py   # before
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

from ferry import sampling_params
from ferry.engine.output_processor import OutputProcessor
from ferry.outputs import TokenLogprobs
from ferry.request import Request, RequestStatus
from ferry.sampling_params import SamplingParams
from ferry.server import serving_completions
from ferry.server.protocol import CompletionRequest
from ferry.server.serving_common import DeltaTracker, chunk_writer

VOCAB = 8000


def build_tokenizer(vocab: int = VOCAB):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")   # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


class _State:
    """What ``_delta_choice`` reads of the server's state: token texts for logprobs."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self._cache = tokenizer, {}

    def token_text(self, token_id: int) -> str:
        if token_id not in self._cache:
            self._cache[token_id] = self.tokenizer.decode([token_id])
        return self._cache[token_id]


def stream_kind():
    """The output kind a stream asks for (None: a tree without kinds, cumulative only)."""
    kinds = getattr(sampling_params, "RequestOutputKind", None)
    return None if kinds is None else kinds.DELTA


def measure(tokenizer, streams: int, length: int) -> list[tuple[float, float]]:
    """(engine, server) CPU seconds of every step."""
    kind = stream_kind()
    extra = {} if kind is None else {"output_kind": kind}
    params = SamplingParams(max_tokens=length, logprobs=1, stop=["never appears"], **extra)
    processor = OutputProcessor(tokenizer)
    rng = random.Random(0)
    requests = []
    for i in range(streams):
        prompt = [rng.randrange(3, VOCAB) for _ in range(32)]
        request = Request(f"r{i}", prompt, params)
        processor.add(request.request_id, None, prompt, params, [request])
        requests.append(request)
    body = CompletionRequest(model="m", prompt="x", stream=True, logprobs=1)
    state, trackers = _State(tokenizer), {}
    chunk = chunk_writer("text_completion", "cmpl-1", "m", False)
    steps = []
    for position in range(length):
        updated, logprobs = [], {}
        for request in requests:
            token = rng.randrange(3, VOCAB)
            request.append_output_token(token)
            if position == length - 1:
                request.status = RequestStatus.FINISHED_LENGTH
            updated.append((request, [token]))
            logprobs[request.request_id] = [TokenLogprobs(token, -1.0, [(token, -1.0)])]
        start = time.thread_time()
        processor.process(updated, logprobs)
        outputs = processor.collect()
        engine_done = time.thread_time()
        for index, output in enumerate(outputs):
            for completion in output.outputs:
                choice = serving_completions._delta_choice(state, body, trackers, index,
                                                            output, completion)
                if choice is not None:
                    chunk([choice])
        steps.append((engine_done - start, time.thread_time() - engine_done))
    return steps


def at(steps: list[tuple[float, float]], length: int) -> dict[str, float]:
    """Median microseconds per step over the 64 steps up to output length ``length``."""
    window = steps[max(0, length - 64):length]
    engine = statistics.median(s[0] for s in window) * 1e6
    server = statistics.median(s[1] for s in window) * 1e6
    return {"engine_us": engine, "server_us": server, "total_us": engine + server}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    kind = "delta" if stream_kind() is not None else "cumulative"
    steps = measure(build_tokenizer(), args.streams, args.length)
    rows = [{"outputs": kind, "length": length, **at(steps, length)}
            for length in sorted({64, min(1024, args.length), args.length})]
    print(f"{args.streams} streams, {kind} outputs, CPU per step (median us): the engine's output "
          "building, the server's SSE chunks")
    print(f"{'length':>7}{'engine':>10}{'server':>10}{'total':>10}{'us/stream':>11}")
    for row in rows:
        print(f"{row['length']:>7}{row['engine_us']:>10.0f}{row['server_us']:>10.0f}"
              f"{row['total_us']:>10.0f}{row['total_us'] / args.streams:>11.1f}")
    if args.json:
        args.json.write_text(json.dumps({"benchmark": "output_path_overhead",
                                         "streams": args.streams, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
