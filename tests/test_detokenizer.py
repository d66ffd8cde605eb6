"""IncrementalDetokenizer tests on tokenizers trained locally (no download).

The oracle is the tokenizer's own full ``decode`` of all ids.
"""
from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ferry.engine.detokenizer import IncrementalDetokenizer
from ferry.sampling_params import SamplingParams

CORPUS = ["Hello world, café naïve résumé 😀 emoji 🚀 rocket 日本語のテキスト 中文 STOP here.",
          "The quick brown fox jumps over the lazy dog. Ünïcödé façade STAR",
          "the cat sat on the mat and the dog sat on the log, hello again"] * 3
MULTIBYTE_TEXT = " Café 😀 says 日本語 hello, naïve 🚀 résumé! 中文 façade"


# ---------------------------------------------------------------- tokenizers
@pytest.fixture(scope="module")
def byte_level() -> Tokenizer:
    """GPT-2 / Llama-3 style byte-level BPE; a small vocab leaves multi-byte chars split."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@pytest.fixture(scope="module")
def hf_byte_level(byte_level) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=byte_level, eos_token="<eos>")


@pytest.fixture(scope="module")
def metaspace() -> Tokenizer:
    """SentencePiece-like: words carry a leading '▁' that the decoder turns into a space."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=150, special_tokens=["<unk>", "<s>", "</s>"],
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@pytest.fixture(scope="module")
def llama2_style(metaspace) -> PreTrainedTokenizerFast:
    """Llama-2 style: '▁' spaces, <0xNN> byte-fallback tokens, decoder strips one space."""
    model = json.loads(metaspace.to_str())["model"]
    vocab = dict(model["vocab"])
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                           normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")


# ---------------------------------------------------------------- helpers
def encode(tokenizer, text: str) -> list[int]:
    if isinstance(tokenizer, Tokenizer):
        return tokenizer.encode(text).ids
    return tokenizer.encode(text, add_special_tokens=False)


def stream(detok: IncrementalDetokenizer, ids: list[int], chunk: int = 1):
    """Feed ids ``chunk`` at a time; return the output_text after each feed and the stop."""
    snapshots = []
    for start in range(0, len(ids), chunk):
        stop = detok.update(ids[start:start + chunk])
        snapshots.append(detok.output_text)
        if stop is not None:
            return snapshots, stop
    return snapshots, None


def assert_grows_by_appending(snapshots: list[str], final: str) -> None:
    """Shown text is never taken back: every snapshot is a prefix of the next and of final."""
    for before, after in zip(snapshots, snapshots[1:] + [final]):
        assert after.startswith(before), (before, after)


# ---------------------------------------------------------------- byte-level BPE
@pytest.mark.parametrize("wrapper", ["tokenizers", "transformers"])
def test_byte_level_never_shows_a_broken_character(byte_level, hf_byte_level, wrapper):
    tokenizer = byte_level if wrapper == "tokenizers" else hf_byte_level
    prompt = encode(tokenizer, "Prompt: the fox")
    eos = byte_level.token_to_id("<eos>")
    output = encode(tokenizer, MULTIBYTE_TEXT) + [eos]
    partial = [i for i in output if "\ufffd" in byte_level.decode([i])]
    assert partial, "the test needs tokens that are partial UTF-8 sequences"

    detok = IncrementalDetokenizer(tokenizer, prompt, SamplingParams())
    snapshots, stop = stream(detok, output)
    detok.finish()
    assert stop is None
    assert all("\ufffd" not in text for text in snapshots)
    assert detok.output_text == tokenizer.decode(output, skip_special_tokens=True)
    assert detok.output_text == MULTIBYTE_TEXT
    assert detok.token_ids == output
    assert_grows_by_appending(snapshots, detok.output_text)


@pytest.mark.parametrize("chunk", [2, 3, 7])
def test_several_ids_per_update_give_the_same_text(hf_byte_level, chunk):
    output = encode(hf_byte_level, MULTIBYTE_TEXT)
    detok = IncrementalDetokenizer(hf_byte_level, encode(hf_byte_level, "Hi"), SamplingParams())
    snapshots, _ = stream(detok, output, chunk)
    detok.finish()
    assert all("\ufffd" not in text for text in snapshots)
    assert detok.output_text == MULTIBYTE_TEXT


def test_finish_drops_an_incomplete_final_character(hf_byte_level):
    output = encode(hf_byte_level, " ok 😀")
    complete = next(n for n in range(len(output), 0, -1)
                    if hf_byte_level.decode(output[:n]) == " ok")
    cut = output[:-1]  # ends inside the emoji's bytes
    assert len(cut) > complete
    detok = IncrementalDetokenizer(hf_byte_level, [], SamplingParams())
    detok.update(cut)
    detok.finish()
    assert detok.output_text == " ok "


def test_special_tokens_follow_skip_special_tokens(hf_byte_level):
    eos = hf_byte_level.eos_token_id
    output = encode(hf_byte_level, " hello") + [eos] + encode(hf_byte_level, " world")
    for skip in (True, False):
        detok = IncrementalDetokenizer(hf_byte_level, [], SamplingParams(skip_special_tokens=skip))
        stream(detok, output)
        detok.finish()
        assert detok.output_text == hf_byte_level.decode(output, skip_special_tokens=skip)
    assert "<eos>" in hf_byte_level.decode(output, skip_special_tokens=False)


def test_decodes_a_small_window_not_the_whole_sequence(hf_byte_level):
    class CountingTokenizer:
        def __init__(self):
            self.longest = 0

        def decode(self, ids, skip_special_tokens):
            self.longest = max(self.longest, len(ids))
            return hf_byte_level.decode(ids, skip_special_tokens=skip_special_tokens)

    counting = CountingTokenizer()
    output = encode(hf_byte_level, MULTIBYTE_TEXT * 8)
    prompt = encode(hf_byte_level, "a long prompt " * 20)
    detok = IncrementalDetokenizer(counting, prompt, SamplingParams())
    stream(detok, output)
    detok.finish()
    assert detok.output_text == MULTIBYTE_TEXT * 8
    assert len(output) > 150 and counting.longest <= 16


# ---------------------------------------------------------------- stop strings
def test_stop_string_spanning_tokens_is_found_and_trimmed(hf_byte_level):
    text = " the fox said 日本語 hello and more text after"
    output = encode(hf_byte_level, text)
    stop = "語 hel"  # spans a multi-byte character and several tokens
    detok = IncrementalDetokenizer(hf_byte_level, [], SamplingParams(stop=[stop, "never"]))
    snapshots, found = stream(detok, output)
    assert found == stop
    assert detok.finished
    assert detok.output_text == " the fox said 日本"
    assert len(snapshots) < len(output), "it should stop at the token completing the stop"
    assert_grows_by_appending(snapshots, detok.output_text)


def test_include_stop_str_in_output(hf_byte_level):
    output = encode(hf_byte_level, " please STOP here now")
    params = SamplingParams(stop="STOP", include_stop_str_in_output=True)
    detok = IncrementalDetokenizer(hf_byte_level, [], params)
    snapshots, found = stream(detok, output)
    assert found == "STOP"
    assert detok.output_text == " please STOP"
    assert_grows_by_appending(snapshots, detok.output_text)


def test_earliest_of_several_stop_strings_wins(hf_byte_level):
    output = encode(hf_byte_level, " one two three")
    detok = IncrementalDetokenizer(hf_byte_level, [], SamplingParams(stop=["three", "e t"]))
    detok.update(output)  # all at once: both stops are in the same new text
    assert detok.output_text == " on"


def test_hold_back_never_shows_a_prefix_that_becomes_a_stop(hf_byte_level):
    # "STAR" starts like "STOP" and is released; the later "STOP" is never shown.
    text = " a STAR then ST and STOP tail"
    output = encode(hf_byte_level, text)
    detok = IncrementalDetokenizer(hf_byte_level, [], SamplingParams(stop="STOP"))
    snapshots, found = stream(detok, output)
    assert found == "STOP"
    assert detok.output_text == " a STAR then ST and "
    assert_grows_by_appending(snapshots, detok.output_text)
    assert any(s.endswith(" a STAR") for s in snapshots), "text that is no stop is released"
    assert not any(s.endswith("S") or s.endswith("ST") or s.endswith("STO") for s in snapshots)


def test_finish_releases_held_back_text(hf_byte_level):
    output = encode(hf_byte_level, " last word ST")
    detok = IncrementalDetokenizer(hf_byte_level, [], SamplingParams(stop="STOP"))
    stream(detok, output)
    assert detok.output_text == " last word "
    detok.finish()
    assert detok.output_text == " last word ST"
    detok.finish()  # idempotent
    assert detok.output_text == " last word ST"
    with pytest.raises(RuntimeError):
        detok.update([1])


# ---------------------------------------------------------------- SentencePiece style
@pytest.mark.parametrize("name", ["metaspace", "llama2_style"])
def test_sentencepiece_style_keeps_the_leading_space(request, name):
    tokenizer = request.getfixturevalue(name)
    prompt_text, output_text = "the cat sat", " on the mat, hello again ñ 🦀 한 café"
    full = encode(tokenizer, prompt_text + output_text)
    prompt = encode(tokenizer, prompt_text)
    assert full[:len(prompt)] == prompt
    output = full[len(prompt):]
    detok = IncrementalDetokenizer(tokenizer, prompt, SamplingParams())
    snapshots, _ = stream(detok, output)
    detok.finish()
    expected = tokenizer.decode(full, skip_special_tokens=True)[len(tokenizer.decode(prompt)):]
    assert detok.output_text == expected
    assert detok.output_text.startswith(" on the mat")
    assert all("\ufffd" not in text for text in snapshots)
    assert_grows_by_appending(snapshots, detok.output_text)


def test_sentencepiece_style_without_prompt_matches_plain_decode(metaspace):
    output = encode(metaspace, "hello world again")
    detok = IncrementalDetokenizer(metaspace, [], SamplingParams())
    stream(detok, output)
    detok.finish()
    assert detok.output_text == metaspace.decode(output) == "hello world again"


# ---------------------------------------------------------------- unstreamed requests
@pytest.mark.parametrize("tokenizer_name", ["hf_byte_level", "llama2_style"])
def test_unstreamed_completion_is_decoded_once_with_the_streamed_text(request, tokenizer_name):
    """stream=False without stop strings decodes only at finish(): same text, and nothing
    decoded before (the tokenizer is never called per token)."""
    tokenizer = request.getfixturevalue(tokenizer_name)
    output = encode(tokenizer, MULTIBYTE_TEXT)
    prompt = encode(tokenizer, "a prompt")
    streamed = IncrementalDetokenizer(tokenizer, prompt, SamplingParams())
    stream(streamed, output)
    streamed.finish()

    calls = []

    class Counting:
        def decode(self, ids, skip_special_tokens):
            calls.append(len(ids))
            return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    lazy = IncrementalDetokenizer(Counting(), prompt, SamplingParams(), stream=False)
    for token in output:
        assert lazy.update([token]) is None
    assert calls == []
    lazy.finish()
    assert lazy.output_text == streamed.output_text
    assert len(calls) == 2


def test_unstreamed_completion_with_a_stop_string_still_stops(hf_byte_level):
    output = encode(hf_byte_level, " the fox said hello and more")
    detok = IncrementalDetokenizer(hf_byte_level, [], SamplingParams(stop=["said"]), stream=False)
    _, stop = stream(detok, output)
    assert stop == "said" and detok.output_text == " the fox "


def test_fast_decoder_gives_the_tokenizers_own_text(hf_byte_level, llama2_style):
    from ferry.engine.detokenizer import fast_decoder

    for tokenizer in (hf_byte_level, llama2_style):
        ids = encode(tokenizer, MULTIBYTE_TEXT + " <eos>")
        for skip in (True, False):
            assert fast_decoder(tokenizer)(ids, skip) == tokenizer.decode(ids, skip_special_tokens=skip)
    hf_byte_level.clean_up_tokenization_spaces = True      # the wrapper's own post-processing
    try:
        ids = encode(hf_byte_level, "a , b .")
        assert fast_decoder(hf_byte_level)(ids, True) == hf_byte_level.decode(ids, skip_special_tokens=True)
    finally:
        hf_byte_level.clean_up_tokenization_spaces = False
