"""The real ``ferry serve`` driven with the official ``openai`` SDK.

References: Hugging Face transformers' greedy continuation (tokens), the tokenizer itself
(prompts, chat template), and the server's own non-streaming answer for streaming.
"""
from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
from ferry_server_process import API_KEY
from hf_reference import assert_greedy_matches, hf_greedy

GREEDY = {"temperature": 0.0}
EXACT = {"ignore_eos": True, "return_token_ids": True}


@pytest.fixture(scope="module")
def tokenizer(server_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(server_model_dir)


def test_models_lists_the_served_name(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"


def test_completion_matches_hf_greedy(client, server_model_dir, tokenizer):
    prompt = "The quick brown fox"
    resp = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, **GREEDY,
                                     extra_body=EXACT)
    choice = resp.choices[0]
    prompt_ids = choice.model_extra["prompt_token_ids"]
    assert prompt_ids == tokenizer.encode(prompt)
    assert_greedy_matches(choice.model_extra["token_ids"],
                          hf_greedy(str(server_model_dir), prompt_ids, 12), "completion")
    assert choice.finish_reason == "length"
    # A trailing incomplete UTF-8 sequence may be held back by the incremental detokenizer.
    reference_text = tokenizer.decode(choice.model_extra["token_ids"], skip_special_tokens=True)
    assert choice.text.rstrip("\ufffd") == reference_text.rstrip("\ufffd")
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (len(prompt_ids), 12)
    assert resp.usage.total_tokens == len(prompt_ids) + 12


def test_chat_applies_the_template_and_matches_hf(client, server_model_dir, tokenizer):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hello, how are you?"}]
    resp = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10,
                                          **GREEDY, extra_body=EXACT)
    expected_prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                    tokenize=True)
    expected_prompt = list(expected_prompt["input_ids"] if hasattr(expected_prompt, "keys")
                           else expected_prompt)
    assert resp.model_extra["prompt_token_ids"] == expected_prompt
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert_greedy_matches(choice.model_extra["token_ids"],
                          hf_greedy(str(server_model_dir), expected_prompt, 10), "chat")
    assert resp.usage.prompt_tokens == len(expected_prompt)


def test_completion_streaming_equals_non_streaming(client):
    args = dict(model="tiny", prompt="Once upon a time", max_tokens=20, **GREEDY)
    full = client.completions.create(**args)
    chunks = list(client.completions.create(**args, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == full.choices[0].finish_reason and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage


def test_chat_streaming_equals_non_streaming(client):
    args = dict(model="tiny", messages=[{"role": "user", "content": "Tell me a story"}],
                max_tokens=20, **GREEDY)
    full = client.chat.completions.create(**args)
    chunks = list(client.chat.completions.create(**args, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == \
        full.choices[0].finish_reason
    assert chunks[-1].usage == full.usage


def test_n_with_seed_is_reproducible(client):
    args = dict(model="tiny", prompt="Numbers:", max_tokens=10, n=3, temperature=1.0, seed=7)
    first = client.completions.create(**args)
    second = client.completions.create(**args)
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert [c.index for c in sorted(first.choices, key=lambda c: c.index)] == [0, 1, 2]
    assert texts == [c.text for c in sorted(second.choices, key=lambda c: c.index)]
    assert len(set(texts)) > 1, "the n samples should be different draws"


def test_chat_n_with_seed_streams_every_choice(client):
    args = dict(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
                n=2, temperature=1.0, seed=3)
    full = client.chat.completions.create(**args)
    texts = {0: "", 1: ""}
    for chunk in client.chat.completions.create(**args, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == {c.index: c.message.content for c in full.choices}


def test_48_concurrent_requests_all_succeed_and_match_hf(server, server_model_dir):
    async def run() -> list:
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, timeout=120,
                                    max_retries=0)
        async with client:
            return await asyncio.gather(*(
                client.completions.create(model="tiny", prompt=f"Story {i}: the", max_tokens=6,
                                          **GREEDY, extra_body=EXACT) for i in range(48)))

    responses = asyncio.run(run())
    assert len(responses) == 48
    for resp in responses[::6]:  # HF on a sample keeps the test fast; all 48 succeeded
        choice = resp.choices[0]
        reference = hf_greedy(str(server_model_dir), choice.model_extra["prompt_token_ids"], 6)
        assert_greedy_matches(choice.model_extra["token_ids"], reference, "concurrent")


def test_stop_string_cuts_the_text(client):
    args = dict(model="tiny", prompt="Paris is the capital of", max_tokens=24, **GREEDY)
    text = client.completions.create(**args).choices[0].text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop.strip(), f"need a visible stop string from {text!r}"
    choice = client.completions.create(**args, stop=[stop]).choices[0]
    assert choice.text == text[:text.index(stop)]
    assert choice.finish_reason == "stop"


def test_completion_logprobs(client):
    resp = client.completions.create(model="tiny", prompt="Hello", max_tokens=5, logprobs=3,
                                     **GREEDY, extra_body={"ignore_eos": True})
    logprobs = resp.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 5
    for chosen, top in zip(logprobs.token_logprobs, logprobs.top_logprobs):
        assert 1 <= len(top) <= 3
        assert chosen == pytest.approx(max(top.values()), abs=1e-5)  # greedy picks the top-1
        assert chosen <= 0


def test_chat_logprobs(client):
    resp = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, **GREEDY,
        logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = resp.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-5)
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob


def test_max_completion_tokens_penalties_and_user(client):
    resp = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_completion_tokens=5,
        presence_penalty=0.5, frequency_penalty=0.5, user="alice", temperature=0.7,
        top_p=0.9, extra_body={"ignore_eos": True, "top_k": 20, "repetition_penalty": 1.1})
    assert resp.usage.completion_tokens == 5
    assert resp.choices[0].finish_reason == "length"


def test_batched_token_id_prompts_with_n(client, tokenizer):
    prompts = [tokenizer.encode("Hello world"), tokenizer.encode("Machine learning")]
    resp = client.completions.create(model="tiny", prompt=prompts, n=2, max_tokens=4,
                                     temperature=1.0, seed=1, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in resp.choices) == [0, 1, 2, 3]
    assert resp.usage.prompt_tokens == sum(len(p) for p in prompts)
    assert resp.usage.completion_tokens == 16


def test_echo_prepends_the_prompt(client):
    plain = client.completions.create(model="tiny", prompt="Hello", max_tokens=4, **GREEDY)
    echoed = client.completions.create(model="tiny", prompt="Hello", max_tokens=4, echo=True,
                                       **GREEDY)
    assert echoed.choices[0].text == "Hello" + plain.choices[0].text


def test_tokenize_detokenize_health_version(server, auth, tokenizer):
    text = "The weather is nice"
    tokens = httpx.post(f"{server.url}/tokenize", json={"prompt": text}, headers=auth,
                        timeout=10).json()
    assert tokens["tokens"] == tokenizer.encode(text) and tokens["count"] == len(tokens["tokens"])
    back = httpx.post(f"{server.url}/detokenize", json={"tokens": tokens["tokens"]},
                      headers=auth, timeout=10)
    assert back.json()["prompt"] == tokenizer.decode(tokens["tokens"])
    assert httpx.get(f"{server.url}/health", timeout=10).json() == {"status": "ok"}
    import ferry

    assert httpx.get(f"{server.url}/version", timeout=10).json() == {"version": ferry.__version__}
