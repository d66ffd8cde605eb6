"""Build the demo model's own byte-level BPE tokenizer and chat template.

Design choices (why):
  - Byte-level alphabet, so any text (not only the task vocabulary) encodes.
  - Every digit and every character outside a capitalised word is its own
    pre-token, so numbers and the words to reverse are single characters:
    addition and reversal become per-character problems a small model learns
    quickly. Capitalised words ("What", "Reverse") may merge into one token.
  - ``<|end|>`` closes every chat turn and is the EOS token, so generation
    stops right after the answer.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
END_OF_TURN_TOKEN = "<|end|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, END_OF_TURN_TOKEN, *ROLE_TOKENS]

# One capitalised word, or any single character (digits, lowercase letters,
# spaces and punctuation each become their own pre-token).
PRE_TOKEN_PATTERN = r"[A-Z][a-z]+|."

# Prompt: <s><|user|>{question}<|end|><|assistant|>   Answer: {answer}<|end|>
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Roles must be system, user or assistant, got ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def build_demo_tokenizer(corpus: Iterable[str], vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``corpus`` and wrap it for transformers.

    Merges can only form inside capitalised words (see PRE_TOKEN_PATTERN), so
    the vocabulary stays small: 256 bytes, the special tokens, and the
    capitalised words of the task templates.
    """
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRE_TOKEN_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    # Plain (non-chat) encodes start with <s>, like the chat template does.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A $B",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    return _wrap(tokenizer)


def _wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=END_OF_TURN_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[EOS_TOKEN, *ROLE_TOKENS],
        padding_side="left",
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped
