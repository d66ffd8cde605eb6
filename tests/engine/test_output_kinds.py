"""RequestOutputKind: DELTA outputs add up to the CUMULATIVE ones, and cost what changed.

The OutputProcessor is driven directly with chosen token sequences (multi-byte text,
stop strings spanning tokens, several tokens per step as speculative decoding gives), so
every case is exact and no model runs. The oracle is the CUMULATIVE output of the same
feed; FINAL_ONLY must give that final output too.
"""
from __future__ import annotations

import random
import tracemalloc

import pytest

from ferry.engine.detokenizer import IncrementalDetokenizer
from ferry.engine.output_processor import OutputProcessor
from ferry.outputs import CompletionOutput, RequestOutput, TokenLogprobs
from ferry.request import Request, RequestStatus
from ferry.sampling_params import RequestOutputKind, SamplingParams
from tiny_models import make_tokenizer

KINDS = tuple(RequestOutputKind)
TEXTS = [" Café 😀 says 日本語 hello, naïve 🚀 résumé! 中文 façade and the STOP sign",
         " The quick brown fox jumps over the lazy dog. Ünïcödé façade STAR then STOP.",
         " Once upon a time there was a little girl 👧🏽 who lived near the forest."]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def fake_logprobs(token_id: int, position: int) -> TokenLogprobs:
    return TokenLogprobs(token_id, -0.1 * (position % 7) - 0.01,
                         [(token_id, -0.01), ((token_id + 1) % 300, -1.5 - position % 3)])


def run(tokenizer, kind: RequestOutputKind, params: SamplingParams,
        sequences: list[list[int]], chunks: list[list[int]], prompt_ids: list[int],
        stream: bool = True) -> list[RequestOutput]:
    """Feed ``sequences[i]`` (one per child of an n-sample request) ``chunks[i][step]``
    tokens per step; a sequence ends with ``length`` after its last token. Returns every
    output collected, in order."""
    params = params.clone(output_kind=kind)
    children = [Request("u" if len(sequences) == 1 else f"u#{i}", prompt_ids, params)
                for i in range(len(sequences))]
    processor = OutputProcessor(tokenizer)
    processor.add("u", None, prompt_ids, params, children, stream=stream)
    fed = [0] * len(sequences)
    outputs: list[RequestOutput] = []
    for step in range(max(len(c) for c in chunks)):
        updated, logprobs = [], {}
        for child, seq, sizes, i in zip(children, sequences, chunks, range(len(children))):
            if child.is_finished or step >= len(sizes):
                continue
            new = seq[fed[i]:fed[i] + sizes[step]]
            logprobs[child.request_id] = [fake_logprobs(t, fed[i] + j) for j, t in enumerate(new)]
            for token in new:
                child.append_output_token(token)
            fed[i] += len(new)
            if fed[i] >= len(seq):
                child.status = RequestStatus.FINISHED_LENGTH
            updated.append((child, new))
        for stopped_id in processor.process(updated, logprobs):
            next(c for c in children if c.request_id == stopped_id).status = \
                RequestStatus.FINISHED_STOPPED
        outputs.extend(processor.collect())
    assert outputs and outputs[-1].finished and not processor.has("u")
    return outputs


def concatenated(outputs: list[RequestOutput]) -> dict[int, CompletionOutput]:
    """Each completion's DELTA outputs added up (through ``RequestOutput.add_delta``)."""
    folded = RequestOutput(outputs[0].request_id, outputs[0].prompt,
                           outputs[0].prompt_token_ids, [], False)
    for output in outputs:
        folded.add_delta(RequestOutput(output.request_id, output.prompt, output.prompt_token_ids,
                                       [_copy(c) for c in output.outputs], output.finished,
                                       output.metrics))
    assert folded.finished
    return {c.index: c for c in folded.outputs}


def _copy(c: CompletionOutput) -> CompletionOutput:
    return CompletionOutput(c.index, c.text, list(c.token_ids), c.cumulative_logprob,
                            None if c.logprobs is None else list(c.logprobs), c.finish_reason,
                            c.stop_reason, c.num_generated_tokens)


def as_tuple(c: CompletionOutput) -> tuple:
    logprobs = None if c.logprobs is None else [(e.token_id, e.logprob, e.top) for e in c.logprobs]
    return (c.index, c.text, list(c.token_ids), c.cumulative_logprob, logprobs,
            c.finish_reason, c.stop_reason, c.num_generated_tokens)


def random_chunks(rng: random.Random, length: int) -> list[int]:
    sizes = []
    while sum(sizes) < length:
        sizes.append(rng.choice([1, 1, 1, 2, 3, 5]))
    return sizes


CASES = [   # (the first completion's text, the params); the others cycle through TEXTS
    (0, dict()),
    (1, dict(logprobs=2)),
    (0, dict(stop=["語 hel"], logprobs=1)),                  # spans a multi-byte char and tokens
    (0, dict(stop=["STOP", "never"], include_stop_str_in_output=True)),
    (1, dict(stop=["STOP"])),                               # "STAR" / "ST" held back, released
    (1, dict(stop=["e t", "lazy", "fox"], logprobs=0)),     # the earliest one wins
    (0, dict(stop=["😀"])),
    (2, dict(stop=["👧🏽 w"], include_stop_str_in_output=True)),
    (2, dict(skip_special_tokens=False)),
]


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("n", [1, 3])
def test_delta_outputs_add_up_to_the_cumulative_output(tokenizer, case, n):
    first_text, settings = CASES[case]
    params = SamplingParams(max_tokens=500, **settings)
    rng = random.Random(case * 10 + n)
    eos = tokenizer.eos_token_id
    sequences = [tokenizer.encode(TEXTS[(first_text + i) % len(TEXTS)], add_special_tokens=False)
                 + ([eos] if params.skip_special_tokens is False else []) for i in range(n)]
    assert any("\ufffd" in tokenizer.decode([t]) for seq in sequences for t in seq), \
        "the case needs tokens that split a multi-byte character"
    chunks = [random_chunks(rng, len(seq)) for seq in sequences]
    prompt = tokenizer.encode("Prompt: the fox", add_special_tokens=False)

    cumulative = run(tokenizer, RequestOutputKind.CUMULATIVE, params, sequences, chunks, prompt)
    delta = run(tokenizer, RequestOutputKind.DELTA, params, sequences, chunks, prompt)
    final_only = run(tokenizer, RequestOutputKind.FINAL_ONLY, params, sequences, chunks, prompt)

    expected = [as_tuple(c) for c in cumulative[-1].outputs]
    assert [as_tuple(c) for c in concatenated(delta).values()] == expected
    assert len(final_only) == 1 and [as_tuple(c) for c in final_only[0].outputs] == expected
    # Every cumulative output is a prefix of the final one; the deltas give each of them.
    for before, after in zip(cumulative, cumulative[1:]):
        for b, a in zip(before.outputs, after.outputs):
            assert a.text.startswith(b.text) and a.token_ids[:len(b.token_ids)] == b.token_ids
    assert all("\ufffd" not in c.text for o in delta for c in o.outputs)
    if params.stop:
        assert cumulative[-1].outputs[0].finish_reason == "stop"
    # The last DELTA output lists every completion, so it counts all their tokens.
    assert sorted(c.index for c in delta[-1].outputs) == list(range(n))
    assert [c.num_generated_tokens for c in delta[-1].outputs] == \
        [len(c.token_ids) for c in cumulative[-1].outputs]


def test_stream_false_gives_only_the_final_output_whatever_the_kind(tokenizer):
    seq = tokenizer.encode(TEXTS[0], add_special_tokens=False)
    for kind in KINDS:
        outputs = run(tokenizer, kind, SamplingParams(max_tokens=500), [seq], [[2] * len(seq)],
                      [], stream=False)
        assert len(outputs) == 1 and outputs[0].outputs[0].text == TEXTS[0]


def test_delta_outputs_list_only_completions_that_advanced(tokenizer):
    seq = tokenizer.encode(TEXTS[2], add_special_tokens=False)
    short, long_ = seq[:4], seq
    outputs = run(tokenizer, RequestOutputKind.DELTA, SamplingParams(max_tokens=500),
                  [short, long_], [[1] * len(short), [1] * len(long_)], [])
    after_short_ended = outputs[len(short):-1]
    assert after_short_ended and all([c.index for c in o.outputs] == [1]
                                     for o in after_short_ended)
    assert outputs[-1].outputs[0].text == "" and outputs[-1].outputs[0].token_ids == []


def test_add_delta_folds_any_grouping_of_deltas(tokenizer):
    """What the server's queue does when its reader fell behind: fold the deltas queued."""
    seqs = [tokenizer.encode(t, add_special_tokens=False) for t in TEXTS[:2]]
    params = SamplingParams(max_tokens=500, logprobs=1, stop=["STOP"])
    rng = random.Random(0)
    chunks = [random_chunks(rng, len(s)) for s in seqs]
    delta = run(tokenizer, RequestOutputKind.DELTA, params, seqs, chunks, [])
    expected = [as_tuple(c) for c in concatenated(delta).values()]
    for _ in range(5):
        groups, i = [], 0
        while i < len(delta):
            size = rng.randint(1, 4)
            group = [RequestOutput(o.request_id, o.prompt, o.prompt_token_ids,
                                   [_copy(c) for c in o.outputs], o.finished)
                     for o in delta[i:i + size]]
            head = group[0]
            for later in group[1:]:
                head.add_delta(later)
            groups.append(head)
            i += size
        assert [as_tuple(c) for c in concatenated(groups).values()] == expected


def test_sampling_params_refuse_a_bad_output_kind():
    with pytest.raises(ValueError, match="output_kind"):
        SamplingParams(output_kind="delta")
    assert SamplingParams().output_kind == RequestOutputKind.CUMULATIVE


# ---------------------------------------------------------------- cost per step
class _Counting:
    """Records the length of every text the detokenizer searches for stop strings."""

    def __init__(self, monkeypatch) -> None:
        self.longest = 0
        for name in ("_find_stop", "_held_back_length"):
            inner = getattr(IncrementalDetokenizer, name)
            monkeypatch.setattr(IncrementalDetokenizer, name, self._wrap(inner))

    def _wrap(self, inner):
        def counted(detok, text):
            self.longest = max(self.longest, len(text))
            return inner(detok, text)
        return counted


def step_allocations(tokenizer, kind: RequestOutputKind, length: int, params: SamplingParams
                     ) -> list[int]:
    """Bytes allocated (peak) by each step's process + collect, one token per step, while
    a completion grows to ``length`` tokens."""
    params = params.clone(output_kind=kind, max_tokens=length + 1)
    prompt = tokenizer.encode("Prompt:", add_special_tokens=False)
    request = Request("u", prompt, params)
    processor = OutputProcessor(tokenizer)
    processor.add("u", None, prompt, params, [request])
    pattern = tokenizer.encode(" the cat 日本語 said hello, ", add_special_tokens=False)
    per_step = []
    for position in range(length):
        token = pattern[position % len(pattern)]
        request.append_output_token(token)
        logprobs = {"u": [fake_logprobs(token, position)]}
        tracemalloc.start()
        tracemalloc.reset_peak()
        processor.process([(request, [token])], logprobs)
        outputs = processor.collect()
        per_step.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        del outputs
    return per_step


def test_delta_step_cost_does_not_grow_with_the_output_length(tokenizer, monkeypatch):
    """Counted, not timed: the bytes a step allocates (the elements it copies into the
    output) and the longest text a stop-string search reads, at 64 and 1024 tokens."""
    params = SamplingParams(stop=["STOP", "never here"], logprobs=2)
    counting = _Counting(monkeypatch)
    delta = step_allocations(tokenizer, RequestOutputKind.DELTA, 1024, params)
    cumulative = step_allocations(tokenizer, RequestOutputKind.CUMULATIVE, 1024, params)
    early, late = (sorted(delta[40:64])[12], sorted(delta[-24:])[12])      # medians
    assert late <= early * 1.25 + 256, (early, late)
    # The oracle that this measures copies: a cumulative step at 1024 tokens copies ~16x
    # the tokens, logprobs and text of one at 64.
    c_early, c_late = sorted(cumulative[40:64])[12], sorted(cumulative[-24:])[12]
    assert c_late > 6 * c_early, (c_early, c_late)
    longest_stop = len("never here")
    assert 0 < counting.longest <= longest_stop - 1 + 40   # held tail + one token's text
