"""Tests for the demo tasks, the demo tokenizer and the shipped demo model."""

from __future__ import annotations

import pytest
import torch

from ferry.demo import DEMO_MODEL_DIR, demo_model_path
from ferry.demo.tasks import (
    TASK_KINDS,
    accuracy_by_kind,
    check,
    make_problem,
    make_problems,
    split_of,
)


def test_problems_are_deterministic():
    assert make_problems(30, 7, "train") == make_problems(30, 7, "train")
    assert make_problems(30, 7, "test") == make_problems(30, 7, "test")
    assert make_problems(30, 7, "train") != make_problems(30, 8, "train")


def test_a_prefix_is_the_same_problems():
    assert make_problems(10, 3, "train") == make_problems(40, 3, "train")[:10]


def test_splits_are_disjoint():
    train = {p.question for p in make_problems(3000, 0, "train")}
    test = {p.question for p in make_problems(600, 0, "test")}
    assert train.isdisjoint(test)
    assert all(split_of(q) == "train" for q in train)
    assert all(split_of(q) == "test" for q in test)


def test_split_is_a_function_of_the_question_only():
    # Some seeds must not move a question to the other split.
    for seed in range(3):
        for p in make_problems(50, seed, "test"):
            assert split_of(p.question) == "test"


def test_answers_are_right():
    """Recompute every answer independently from the question text."""
    for p in make_problems(300, 1, "test"):
        if p.kind == "add":
            a, b = p.question.removeprefix("What is ").removesuffix("?").split("+")
            assert int(p.answer) == int(a) + int(b)
            assert 0 <= int(a) <= 99 and 0 <= int(b) <= 99
        elif p.kind == "reverse":
            word = p.question.removeprefix("Reverse: ")
            assert p.answer == "".join(reversed(word)) and 3 <= len(word) <= 8
        else:
            word = p.question.removeprefix("Uppercase: ")
            assert p.answer == word.upper() and word.islower()


def test_problem_shape_and_kind_balance():
    problems = make_problems(9, 0, "train")
    assert [p.kind for p in problems] == list(TASK_KINDS) * 3
    for p in problems:
        assert p.messages == [{"role": "user", "content": p.question}]


def test_check_strips_whitespace_and_compares_exactly():
    p = make_problem("add", "What is 48+76?", "124")
    assert check(p, "124")
    assert check(p, "  124\n")
    assert not check(p, "1240")
    assert not check(p, "12 4")
    assert not check(p, "")


def test_accuracy_by_kind():
    add = make_problem("add", "What is 1+1?", "2")
    rev = make_problem("reverse", "Reverse: abc", "cba")
    acc = accuracy_by_kind([add, add, rev], ["2", "3", "cba"])
    assert acc == {"add": 0.5, "reverse": 1.0, "all": pytest.approx(2 / 3)}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n": -1, "seed": 0, "split": "train"}, "n must be"),
        ({"n": 3, "seed": 0, "split": "dev"}, "split must be"),
        ({"n": 3, "seed": 0, "split": "train", "kinds": ("mul",)}, "unknown task kinds"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_problems(**kwargs)


def test_demo_tokenizer_splits_digits_and_letters():
    from ferry.demo.tokenizer import build_demo_tokenizer

    tokenizer = build_demo_tokenizer(p.question + " " + p.answer for p in make_problems(300, 0, "train"))
    tokens = tokenizer.convert_ids_to_tokens(tokenizer.encode("Reverse: kitchen 348", add_special_tokens=False))
    assert tokens[-3:] == ["3", "4", "8"]
    assert tokens[-11:-4] == list("kitchen")
    text = "Any text, even ünïcode!"
    assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=True) == text


# --- the shipped model -------------------------------------------------------

needs_model = pytest.mark.skipif(
    not (DEMO_MODEL_DIR / "model.safetensors").is_file(), reason="demo model not trained yet"
)


@needs_model
def test_shipped_tokenizer_chat_template():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_model_path())
    messages = [{"role": "user", "content": "What is 348+76?"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<s><|user|>What is 348+76?<|end|><|assistant|>"
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.convert_ids_to_tokens(ids[-1]) == "<|assistant|>"
    assert tokenizer.eos_token == "<|end|>"


@needs_model
def test_shipped_model_config_and_size():
    from transformers import AutoConfig, GenerationConfig

    path = demo_model_path()
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == "llama"
    assert config.num_key_value_heads < config.num_attention_heads  # exercises GQA
    assert not config.tie_word_embeddings
    assert GenerationConfig.from_pretrained(path).eos_token_id == config.eos_token_id
    assert sum(f.stat().st_size for f in path.iterdir() if f.is_file()) <= 20 * 1024 * 1024


@needs_model
def test_shipped_model_solves_held_out_problems():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ferry.demo.evaluate import hf_greedy_answers

    torch.manual_seed(0)
    path = demo_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    problems = make_problems(21, 12345, "test")
    completions = hf_greedy_answers(model, tokenizer, problems, batch_size=21)
    right = sum(check(p, text) for p, text in zip(problems, completions))
    assert right >= 0.8 * len(problems), list(zip([p.question for p in problems], completions))


@needs_model
def test_left_padded_batch_matches_one_at_a_time():
    """Padding in hf_greedy_answers must not change what the model answers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ferry.demo.evaluate import hf_greedy_answers

    path = demo_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    problems = make_problems(6, 99, "test")  # mixed kinds, so prompt lengths differ
    batched = hf_greedy_answers(model, tokenizer, problems, batch_size=6)
    single = hf_greedy_answers(model, tokenizer, problems, batch_size=1)
    assert batched == single


def test_demo_model_path_names_the_missing_files(monkeypatch, tmp_path):
    import ferry.demo as demo

    monkeypatch.setattr(demo, "DEMO_MODEL_DIR", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        demo.demo_model_path()
