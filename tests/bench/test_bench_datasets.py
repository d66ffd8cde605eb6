"""Workloads: token-exact prompts (checked by re-encoding with the tokenizer), shared
prefixes, the long/short mix, ShareGPT files, and the approximate fallback."""
from __future__ import annotations

import json

import pytest
from tiny_models import make_tiny_model, make_tokenizer

from ferry.bench.datasets import DatasetOptions, build_workload, load_sharegpt_pairs
from ferry.bench.tokens import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text)["input_ids"]


@pytest.mark.parametrize("input_len", [1, 3, 17, 200])
def test_random_prompts_have_exactly_the_asked_token_count(tokenizer, input_len):
    workload = build_workload(DatasetOptions(num_prompts=5, input_len=input_len, output_len=7),
                              tokenizer)
    assert workload.token_exact and workload.notes == []
    for req in workload.requests:
        assert len(_encode(tokenizer, req.prompt)) == req.prompt_len == input_len
        assert req.output_len == 7


def test_range_ratio_spreads_lengths_within_bounds(tokenizer):
    workload = build_workload(DatasetOptions(num_prompts=40, input_len=40, output_len=20,
                                             range_ratio=0.5, seed=3), tokenizer)
    in_lens = [len(_encode(tokenizer, r.prompt)) for r in workload.requests]
    out_lens = [r.output_len for r in workload.requests]
    assert in_lens == [r.prompt_len for r in workload.requests]
    assert min(in_lens) >= 20 and max(in_lens) <= 60 and len(set(in_lens)) > 5
    assert min(out_lens) >= 10 and max(out_lens) <= 30 and len(set(out_lens)) > 5


def test_same_seed_same_workload_other_seed_other_workload(tokenizer):
    make = lambda seed: [r.prompt for r in build_workload(  # noqa: E731
        DatasetOptions(num_prompts=3, input_len=10, seed=seed), tokenizer).requests]
    assert make(1) == make(1)
    assert make(1) != make(2)


def test_prefix_dataset_shares_prefix_tokens_within_a_group(tokenizer):
    opts = DatasetOptions(name="prefix", num_prompts=8, num_prefixes=2, prefix_len=24,
                          input_len=10, output_len=4)
    workload = build_workload(opts, tokenizer)
    groups: dict[str, list[list[int]]] = {}
    for req in workload.requests:
        ids = _encode(tokenizer, req.prompt)
        assert len(ids) == req.prompt_len == 34
        groups.setdefault(req.tag, []).append(ids)
    assert sorted(groups) == ["prefix0", "prefix1"] and all(len(g) == 4 for g in groups.values())
    heads = {tag: {tuple(ids[:20]) for ids in g} for tag, g in groups.items()}
    assert all(len(h) == 1 for h in heads.values())          # one shared prefix per group
    assert heads["prefix0"] != heads["prefix1"]               # and distinct across groups
    tails = [tuple(ids[26:]) for g in groups.values() for ids in g]
    assert len(set(tails)) == 8                                # unique suffixes


def test_mixed_dataset_has_the_stated_share_of_long_prompts(tokenizer):
    opts = DatasetOptions(name="mixed", num_prompts=10, input_len=8, long_input_len=64,
                          long_fraction=0.3, output_len=2)
    requests = build_workload(opts, tokenizer).requests
    longs = [r for r in requests if r.tag == "long"]
    assert len(longs) == 3
    assert {len(_encode(tokenizer, r.prompt)) for r in longs} == {64}
    assert {len(_encode(tokenizer, r.prompt)) for r in requests if r.tag == "short"} == {8}


def test_sharegpt_file_gives_prompts_and_reply_lengths(tmp_path, tokenizer):
    convs = [{"id": str(i), "conversations": [
        {"from": "human", "value": f"Tell me about the capital of France number {i} please"},
        {"from": "gpt", "value": "Paris is the capital of France and a very nice city " * (i + 1)}]}
        for i in range(3)] + [{"id": "short", "conversations": [
            {"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}]
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(convs))
    workload = build_workload(DatasetOptions(name="sharegpt", dataset_path=str(path),
                                             num_prompts=3), tokenizer)
    reply_lens = {len(tokenizer(c["conversations"][1]["value"], add_special_tokens=False)
                      ["input_ids"]) for c in convs[:3]}
    assert {r.output_len for r in workload.requests} == reply_lens
    assert all("hi" != r.prompt for r in workload.requests)  # the tiny pair is filtered out
    assert len(load_sharegpt_pairs(path)) == 4


def test_sharegpt_errors_are_actionable(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_sharegpt_pairs(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_sharegpt_pairs(bad)
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(ValueError, match="no usable conversation"):
        build_workload(DatasetOptions(name="sharegpt", dataset_path=str(empty)), None)


def test_without_a_tokenizer_lengths_are_words_and_flagged():
    workload = build_workload(DatasetOptions(num_prompts=2, input_len=12), None, "no tokenizer")
    assert not workload.token_exact
    assert "approximate" in workload.notes[0]
    assert all(len(r.prompt.split()) == 12 for r in workload.requests)


def test_tokenizer_loads_from_a_model_dir_and_never_crashes(tmp_path):
    model_dir = make_tiny_model("qwen2", tmp_path / "m")
    tok, note = load_tokenizer(str(model_dir))
    assert tok is not None and len(tok) > 100
    tok, note = load_tokenizer("surely/not-a-cached-model-xyz")
    assert tok is None and "could not load" in note


@pytest.mark.parametrize("kwargs", [{"num_prompts": 0}, {"input_len": 0}, {"output_len": 0},
                                    {"range_ratio": 1.0}, {"long_fraction": 1.5},
                                    {"name": "other"}])
def test_bad_options_raise_value_error(kwargs):
    with pytest.raises(ValueError):
        DatasetOptions(**kwargs)


@pytest.mark.parametrize("name", ["random", "prefix", "mixed"])
def test_fit_to_context_shrinks_only_the_defaulted_lengths(name):
    from ferry.bench.datasets import fit_to_context, longest_request

    opts = DatasetOptions(name=name, num_prompts=4, input_len=1024, range_ratio=0.2)
    everything = ("input_len", "output_len", "prefix_len", "long_input_len")
    fitted, note = fit_to_context(opts, 512, everything, reserve=32)
    assert longest_request(fitted) <= 512 - 32 and "shrunk to fit" in note
    same, note = fit_to_context(opts, 512, (), reserve=32)       # all given: kept as given
    assert same == opts and "exceed the server's max_model_len of 512" in note
    roomy, note = fit_to_context(opts, 1 << 20, everything, reserve=32)
    assert roomy == opts and note is None
