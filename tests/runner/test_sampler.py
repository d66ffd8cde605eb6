"""Sampler tests: each property is checked against a plain PyTorch / Python reference."""
from __future__ import annotations

import math

import pytest
import torch

from ferry.runner.sampler import Sampler, SamplingRow
from ferry.sampling_params import SamplingParams

VOCAB = 12


def make_request(params: SamplingParams, prompt=(1, 2, 3), output=(), eos=()) -> SamplingRow:
    tokens = list(prompt) + list(output)
    return SamplingRow(params, tokens, len(tokens), len(prompt), tuple(eos))


def sample_tokens(logits, rows, generators):
    """``Sampler.sample`` with the tokens as a list (one host sync)."""
    tokens, logprobs = Sampler().sample(logits, rows, generators)
    return tokens.tolist(), logprobs


def sample(logits, params_list, generators=None, **kwargs):
    requests = [make_request(p) for p in params_list]
    generators = generators if generators is not None else [None] * len(requests)
    return sample_tokens(logits, requests, generators, **kwargs)


def random_logits(rows: int, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


# ---------------------------------------------------------------- greedy and its limits
def test_greedy_equals_argmax():
    logits = random_logits(7)
    tokens, logprobs = sample(logits, [SamplingParams(temperature=0.0)] * 7)
    assert tokens == logits.argmax(dim=-1).tolist()
    assert logprobs == [None] * 7


def test_greedy_ties_go_to_the_first_index_like_hf():
    """HF's greedy is argmax, which returns the first of tied maxima; so must we."""
    logits = torch.zeros(3, VOCAB)
    logits[0, [7, 3, 11]] = 5.0
    logits[1, [VOCAB - 1, VOCAB - 2]] = 1.0
    tokens, _ = sample(logits, [SamplingParams(temperature=0.0)] * 3)
    assert tokens == [3, VOCAB - 2, 0]


def test_greedy_rows_in_a_mixed_batch_take_argmax():
    torch.manual_seed(0)
    logits = random_logits(6)
    params = [SamplingParams(temperature=0.0 if i % 2 == 0 else 1.5) for i in range(6)]
    tokens, _ = sample(logits, params)
    expected = logits.argmax(dim=-1).tolist()
    assert [tokens[i] for i in (0, 2, 4)] == [expected[i] for i in (0, 2, 4)]


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1e-3),
    SamplingParams(temperature=1.0, top_k=1),
    SamplingParams(temperature=1.0, top_p=1e-6),
    SamplingParams(temperature=2.0, min_p=1.0),
], ids=["temperature-to-zero", "top-k-1", "top-p-tiny", "min-p-1"])
def test_limits_that_equal_greedy(params):
    torch.manual_seed(1)
    logits = random_logits(200, seed=1)
    tokens, _ = sample(logits, [params] * 200)
    assert tokens == logits.argmax(dim=-1).tolist()


# ---------------------------------------------------------------- distributions
def reference_distribution(logits: torch.Tensor, temperature: float, top_k: int,
                           top_p: float) -> list[float]:
    """softmax(logits / T), then top-k, then top-p, written as a plain loop."""
    probs = torch.softmax(logits.double() / temperature, dim=-1).tolist()
    ranked = sorted(range(len(probs)), key=lambda t: -probs[t])
    kept = ranked[:top_k] if top_k > 0 else ranked
    mass = sum(probs[t] for t in kept)
    renormed = {t: probs[t] / mass for t in kept}
    nucleus, total = [], 0.0
    for t in kept:
        nucleus.append(t)
        total += renormed[t]
        if total >= top_p:
            break
    mass = sum(renormed[t] for t in nucleus)
    return [renormed[t] / mass if t in nucleus else 0.0 for t in range(len(probs))]


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, -1, 1.0), (0.7, 4, 1.0),
                                                     (1.3, -1, 0.8), (0.8, 5, 0.85)])
def test_sampled_frequencies_match_reference(temperature, top_k, top_p):
    torch.manual_seed(2)
    draws = 20000
    logits = torch.tensor([1.0, 0.2, 2.0, -1.0, 1.5, 0.0, 0.8, -0.5])
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    tokens, _ = sample(logits.expand(draws, -1).clone(), [params] * draws)
    counts = torch.bincount(torch.tensor(tokens), minlength=len(logits)).tolist()
    expected = reference_distribution(logits, temperature, top_k, top_p)
    chi_square = 0.0
    for count, p in zip(counts, expected):
        if p == 0.0:
            assert count == 0, "a token outside top-k/top-p was sampled"
        else:
            chi_square += (count - draws * p) ** 2 / (draws * p)
    # Degrees of freedom <= 7; the 1e-6 quantile of chi2(7) is about 39, so this bound
    # fails only for a wrong distribution.
    assert chi_square < 45, (counts, expected)


@pytest.mark.parametrize("top_p,allowed", [(0.49, {0}), (0.51, {0, 1}), (0.79, {0, 1}),
                                           (0.81, {0, 1, 2}), (1.0, {0, 1, 2})])
def test_top_p_keeps_smallest_set_reaching_the_mass(top_p, allowed):
    torch.manual_seed(4)
    logits = torch.tensor([0.5, 0.3, 0.2]).log()
    draws = 2000
    tokens, _ = sample(logits.expand(draws, -1).clone(), [SamplingParams(top_p=top_p)] * draws)
    assert set(tokens) == allowed


def test_min_p_only_samples_allowed_tokens():
    torch.manual_seed(3)
    logits = torch.tensor([2.0, 1.8, 1.0, 0.5, 1.5, -1.0])
    probs = torch.softmax(logits, dim=-1)
    allowed = set((probs >= 0.5 * probs.max()).nonzero().flatten().tolist())
    draws = 4000
    tokens, _ = sample(logits.expand(draws, -1).clone(), [SamplingParams(min_p=0.5)] * draws)
    seen = set(tokens)
    assert seen <= allowed
    assert len(seen) > 1, "min-p should still leave several tokens to sample from"


# ---------------------------------------------------------------- seeds
def seeded_run(steps: int, logits_per_step, batch_builder) -> list[int]:
    """Tokens of the seeded request (seed 1234) over several steps."""
    generator = torch.Generator().manual_seed(1234)
    out = []
    for step in range(steps):
        logits, requests, generators, position = batch_builder(logits_per_step[step], generator)
        tokens, _ = sample_tokens(logits, requests, generators)
        out.append(tokens[position])
    return out


def test_seeded_request_gets_same_tokens_alone_or_in_a_batch():
    steps = 8
    target = SamplingParams(temperature=1.0, top_p=0.9, seed=1234)
    row_logits = [random_logits(1, 50, seed=10 + s)[0] for s in range(steps)]

    def alone(row, generator):
        return row.unsqueeze(0), [make_request(target)], [generator], 0

    other_generator = torch.Generator().manual_seed(99)

    def batched(row, generator):
        others = random_logits(3, 50, seed=int(row[0].abs().item() * 1000))
        logits = torch.stack([others[0], others[1], row, others[2]])
        requests = [make_request(SamplingParams(temperature=1.0)),
                    make_request(SamplingParams(temperature=0.7, seed=99, top_k=5)),
                    make_request(target),
                    make_request(SamplingParams(temperature=0.0))]
        return logits, requests, [None, other_generator, generator, None], 2

    torch.manual_seed(5)
    tokens_alone = seeded_run(steps, row_logits, alone)
    torch.manual_seed(6)  # a different global state must not matter either
    tokens_batched = seeded_run(steps, row_logits, batched)
    assert tokens_alone == tokens_batched


def test_different_seeds_give_different_streams():
    logits = torch.zeros(1, 1000)  # uniform: two seeds agreeing 10 times is ~1e-30
    params = SamplingParams(temperature=1.0)
    streams = []
    for seed in (1, 2):
        gen = torch.Generator().manual_seed(seed)
        streams.append([sample(logits, [params], [gen])[0][0] for _ in range(10)])
    assert streams[0] != streams[1]


# ---------------------------------------------------------------- penalties
def reference_penalties(logits: list[float], prompt: list[int], output: list[int],
                        params: SamplingParams) -> list[float]:
    """HF repetition penalty over prompt+output, OpenAI presence/frequency over output."""
    result = []
    for token, value in enumerate(logits):
        if token in prompt or token in output:
            rep = params.repetition_penalty
            value = value / rep if value > 0 else value * rep
        count = output.count(token)
        value -= params.presence_penalty * (count > 0) + params.frequency_penalty * count
        result.append(value)
    return result


def test_penalties_match_reference_formula():
    logits = random_logits(4, 10, seed=7)
    prompt, output = [1, 2, 2, 5], [5, 7, 7, 7, 3, 0]
    all_params = [
        SamplingParams(temperature=0.0, repetition_penalty=1.3, presence_penalty=0.5,
                       frequency_penalty=0.25, logprobs=10),
        SamplingParams(temperature=0.0, logprobs=10),  # no penalties: untouched
        SamplingParams(temperature=0.0, repetition_penalty=0.7, logprobs=10),
        SamplingParams(temperature=0.0, presence_penalty=-1.0, frequency_penalty=1.5, logprobs=10),
    ]
    requests = [make_request(p, prompt, output) for p in all_params]
    tokens, logprobs = sample_tokens(logits, requests, [None] * 4)
    for row, params in enumerate(all_params):
        expected = torch.tensor(reference_penalties(logits[row].tolist(), prompt, output, params))
        expected_logprobs = torch.log_softmax(expected, dim=-1)
        got = torch.zeros(10)
        for token, value in logprobs[row].top:
            got[token] = value
        torch.testing.assert_close(got, expected_logprobs, rtol=1e-5, atol=1e-5)
        assert tokens[row] == int(expected.argmax())


def test_penalties_only_count_tokens_of_their_own_request():
    logits = torch.zeros(2, 6)
    params = SamplingParams(temperature=0.0, frequency_penalty=1.0, logprobs=6)
    requests = [make_request(params, prompt=[0], output=[1, 1]),
                make_request(params, prompt=[0], output=[2])]
    _, logprobs = sample_tokens(logits, requests, [None, None])
    first = dict(logprobs[0].top)
    second = dict(logprobs[1].top)
    assert first[2] == pytest.approx(first[3]) and first[1] < first[2]
    assert second[1] == pytest.approx(second[3]) and second[2] < second[1]


# ---------------------------------------------------------------- logprobs
def test_logprobs_equal_log_softmax_of_logits():
    torch.manual_seed(8)
    logits = random_logits(3, 30, seed=8)
    params = [SamplingParams(temperature=0.8, top_k=3, logprobs=5),
              SamplingParams(temperature=0.0, logprobs=0),
              SamplingParams(temperature=1.0)]
    tokens, logprobs = sample(logits, params)
    reference = torch.log_softmax(logits.double(), dim=-1)
    first = logprobs[0]
    assert first.token_id == tokens[0]
    assert first.logprob == pytest.approx(reference[0, tokens[0]].item(), abs=1e-5)
    top_values, top_ids = reference[0].topk(5)
    assert [t for t, _ in first.top] == top_ids.tolist()
    assert [v for _, v in first.top] == pytest.approx(top_values.tolist(), abs=1e-5)
    assert logprobs[1].top == [] and logprobs[1].token_id == tokens[1]
    assert logprobs[1].logprob == pytest.approx(reference[1].max().item(), abs=1e-5)
    assert logprobs[2] is None


# ---------------------------------------------------------------- min_tokens
def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    logits = torch.tensor([[0.0, 5.0, 4.0, 3.0, 1.0]] * 2)  # 1 is EOS, 2 a stop id
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[2])
    early = make_request(params, prompt=[0], output=[4], eos=(1,))
    done = make_request(params, prompt=[0], output=[4, 4], eos=(1,))
    tokens, _ = sample_tokens(logits, [early, done], [None, None])
    assert tokens == [3, 1]


def test_min_tokens_without_eos_ids_masks_only_stop_ids():
    logits = torch.tensor([[0.0, 5.0, 6.0, 3.0]])
    params = SamplingParams(temperature=0.0, min_tokens=1, stop_token_ids=[2, 999])
    tokens, _ = sample(logits, [params])
    assert tokens == [1]


def test_min_tokens_reads_eos_from_the_request_when_not_passed():
    logits = torch.tensor([[0.0, 5.0, 6.0, 3.0]])
    request = make_request(SamplingParams(temperature=0.0, min_tokens=1), eos=(2,))
    tokens, _ = sample_tokens(logits, [request], [None])
    assert tokens == [1]


# ---------------------------------------------------------------- contract details
def test_input_logits_are_not_modified():
    logits = random_logits(2)
    before = logits.clone()
    params = SamplingParams(temperature=0.9, top_k=3, min_p=0.1, repetition_penalty=1.5,
                            min_tokens=5, stop_token_ids=[0])
    sample(logits, [params, params])
    assert torch.equal(logits, before)


def test_empty_batch():
    assert sample_tokens(torch.zeros(0, VOCAB), [], []) == ([], [])


@pytest.mark.parametrize("build", [
    lambda: (torch.zeros(VOCAB), [make_request(SamplingParams())], [None]),
    lambda: (torch.zeros(2, VOCAB), [make_request(SamplingParams())], [None]),
    lambda: (torch.zeros(1, VOCAB), [make_request(SamplingParams())], []),
], ids=["1-D logits", "row count", "generator count"])
def test_bad_inputs_raise_value_error(build):
    logits, requests, generators = build()
    with pytest.raises(ValueError):
        Sampler().sample(logits, requests, generators)


def test_probabilities_are_finite_for_extreme_logits():
    logits = torch.tensor([[1e4, -1e4, 0.0, float("-inf")]])
    tokens, logprobs = sample(logits, [SamplingParams(temperature=0.5, logprobs=2)])
    assert tokens == [0]
    assert math.isfinite(logprobs[0].logprob)


# ---------------------------------------------------------------- logits processors
class BiasForLogprobRequests:
    """A test processor: +10 on token 3, only for rows whose request asks for logprobs."""

    reads_output_tokens = False

    def __init__(self):
        self.calls = 0

    def __call__(self, logits, rows):
        self.calls += 1
        chosen = [i for i, row in enumerate(rows) if row.sampling_params.logprobs is not None]
        out = logits.clone()
        out[chosen, 3] += 10.0
        return out


def test_an_extra_logits_processor_runs_per_row_before_logprobs_and_filters():
    logits = random_logits(3)
    processor = BiasForLogprobRequests()
    rows = [make_request(SamplingParams(temperature=0.0, logprobs=1)),
            make_request(SamplingParams(temperature=0.0)),
            make_request(SamplingParams(temperature=1.0, top_k=1, logprobs=1))]
    tokens, logprobs = Sampler(extra_processors=[processor]).sample(logits, rows, [None] * 3)
    biased = logits.clone()
    biased[[0, 2], 3] += 10.0
    assert processor.calls == 1
    assert tokens.tolist() == biased.argmax(dim=-1).tolist()      # top_k=1 sees the bias too
    assert tokens.tolist()[1] == logits[1].argmax().item()         # not its row
    expected = torch.log_softmax(biased[0], dim=-1)[3].item()
    assert logprobs[0].logprob == pytest.approx(expected, abs=1e-5)


def test_penalties_refuse_a_placeholder_among_the_outputs():
    row = make_request(SamplingParams(temperature=0.0, presence_penalty=0.5), output=[4, -1])
    with pytest.raises(RuntimeError, match="placeholder"):
        Sampler().sample(random_logits(1), [row], [None])


def test_a_row_sees_only_its_first_num_tokens():
    """Rows of one request with drafts share a token list; each counts only its prefix."""
    params = SamplingParams(temperature=0.0, frequency_penalty=2.0)
    tokens = [0, 5, 6]                          # prompt [0], then output 5 and a draft 6
    rows = [SamplingRow(params, tokens, 2, 1), SamplingRow(params, tokens, 3, 1)]
    logits = torch.zeros(2, VOCAB)
    logits[:, 5] = logits[:, 6] = 1.5
    logits[:, 7] = 1.0          # below 5 and 6 until they are penalized
    chosen, _ = Sampler().sample(logits, rows, [None, None])
    assert chosen.tolist() == [6, 7]            # row 0 has not seen the draft 6 yet


def test_a_draw_at_the_top_of_the_cdf_never_takes_a_zero_probability_token():
    from ferry.runner.sampler import _inverse_cdf_draw
    probs = torch.tensor([[0.25, 0.75, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [1e-30, 0.0, 0.0, 0.0]])
    top = torch.full((3,), 1.0 - 2.0**-24)   # the largest float32 below 1
    assert _inverse_cdf_draw(probs, top).tolist() == [1, 1, 0]
    assert _inverse_cdf_draw(probs, torch.zeros(3)).tolist() == [0, 1, 0]


def test_infinite_logits_draw_among_themselves_and_nan_rows_still_give_a_token():
    logits = torch.tensor([[1.0, float("inf"), 0.0, float("inf")],
                           [float("nan"), 2.0, float("nan"), 1.0],
                           [float("nan")] * 4])
    params = SamplingParams(temperature=1.0)
    seen = set()
    for _ in range(40):
        tokens, _ = sample(logits.clone(), [params] * 3)
        assert tokens[0] in (1, 3) and tokens[1] in (1, 3) and 0 <= tokens[2] < 4
        seen.add(tokens[0])
    assert seen == {1, 3}


def test_a_tiny_repetition_penalty_samples_in_range():
    # the penalty divides the prompt tokens' positive logits by ~0: +inf (the server's
    # schema fuzzing found this as a 500)
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(0)).abs()
    params = SamplingParams(temperature=1.0, repetition_penalty=5e-324)
    rows = [make_request(params, prompt=(1, 2, 3)), make_request(params, prompt=(4, 5))]
    tokens, _ = sample_tokens(logits, rows, [None, None])
    assert tokens[0] in (1, 2, 3) and tokens[1] in (4, 5)


def test_logprobs_stay_finite_with_infinite_and_masked_logits():
    logits = torch.tensor([[1.0, float("inf"), float("-inf"), float("inf")]])
    params = SamplingParams(temperature=1.0, logprobs=4)
    _, logprobs = sample(logits, [params])
    values = [v for _, v in logprobs[0].top] + [logprobs[0].logprob]
    assert all(v == v and v > float("-inf") for v in values), values
    assert sorted(round(v, 4) for _, v in logprobs[0].top[:2]) == [round(-0.6931, 4)] * 2
