"""Tiny random-weight HF checkpoints (with a real tokenizer) for everyone's tests.

``make_tiny_model("qwen2", tmp_dir)`` writes config.json, model.safetensors,
generation_config.json and a byte-level BPE tokenizer with a chat template, all loadable
with ``AutoTokenizer`` / ``AutoModelForCausalLM.from_pretrained(dir)``. Deterministic: the
same arch and overrides give the same weights.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

ARCHS = ("llama", "llama3", "mistral", "qwen2", "qwen3")

SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
TOKENIZER_VOCAB_SIZE = 384
INIT_STD = 0.15   # large enough that logits are not near-ties
SEED = 1234

_TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a
single step. To be or not to be, that is the question. All that glitters is not gold.
Hello world! How are you today? I am fine, thank you, and you? The weather is nice and the
sun is shining over the green hills. Once upon a time there was a little girl who lived in a
village near the forest. She liked to read books about dragons, castles, kings and queens.
Machine learning models predict the next token from the previous tokens. The engine serves
many requests at the same time, and each request generates text one token after another.
Paris is the capital of France. Berlin is the capital of Germany. Rome is the capital of
Italy. Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Questions, answers, stories and poems.
"""


def _base_config(arch: str, vocab_size: int, special_ids: dict[str, int]) -> Any:
    """The transformers config of a tiny model of the given arch (GQA 4/2 heads, hidden 64)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-6, initializer_range=INIT_STD, bos_token_id=special_ids["<s>"],
                  eos_token_id=special_ids["</s>"], pad_token_id=special_ids["<pad>"])
    if arch == "llama":
        return LlamaConfig(**common, tie_word_embeddings=False)
    if arch == "llama3":
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        return LlamaConfig(**common, tie_word_embeddings=False, rope_scaling=rope)
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=8, tie_word_embeddings=False)
    if arch == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=True, use_sliding_window=False)
    if arch == "qwen3":
        return Qwen3Config(**common, head_dim=32, tie_word_embeddings=False)
    raise ValueError(f"unknown tiny arch {arch!r}; choose from {ARCHS}")


def make_tokenizer(vocab_size: int = TOKENIZER_VOCAB_SIZE):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with special tokens and a chat template.

    Its ``len()`` is the model vocab size to use (the text may not fill ``vocab_size``).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator([_TRAINING_TEXT] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", chat_template=CHAT_TEMPLATE,
                                   additional_special_tokens=SPECIAL_TOKENS[3:])


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Seeded weights: N(0, INIT_STD) matrices and biases, norms around 1."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if "norm" in name:
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(INIT_STD * noise)


def make_tiny_model(arch: str, path: Path, **overrides: Any) -> Path:
    """Write a tiny random ``arch`` checkpoint + tokenizer into ``path``; returns ``path``.

    ``overrides`` are config attributes (e.g. num_hidden_layers=3, sliding_window=4); the
    special key ``max_shard_size`` (e.g. "20KB") saves a sharded checkpoint with an index.
    """
    from transformers import AutoModelForCausalLM, GenerationConfig
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    max_shard_size = overrides.pop("max_shard_size", None)
    tokenizer = make_tokenizer()
    special_ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS}
    config = _base_config(arch, len(tokenizer), special_ids)
    for key, value in overrides.items():
        setattr(config, key, value)
    config.architectures = [type(config).__name__.replace("Config", "ForCausalLM")]
    config.dtype = "float32"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize(model, SEED)
    model.generation_config = GenerationConfig(
        bos_token_id=special_ids["<s>"], pad_token_id=special_ids["<pad>"],
        eos_token_id=[special_ids["</s>"], special_ids["<|end|>"]])
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, safe_serialization=True, **save_kwargs)
    tokenizer.save_pretrained(path)
    return path


def make_sharded(path: Path, arch: str = "llama", **overrides: Any) -> Path:
    """Like ``make_tiny_model`` but split into several shards with model.safetensors.index.json."""
    return make_tiny_model(arch, path, max_shard_size="20KB", **overrides)
