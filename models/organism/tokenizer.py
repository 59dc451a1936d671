"""The organism's byte-level BPE tokenizer, trained offline, and its chat template.

BOS convention (the Llama one): ``tokenizer(text)`` prepends ``<|bos|>`` through the post-processor, and the
chat template starts with ``{{ bos_token }}``. Therefore

- a raw prompt: ``tokenizer(prompt)`` gives ``[bos, ...]``, as both models saw at pre-training;
- a chat prompt: ``tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)``
  (which tokenizes with ``add_special_tokens=False``) or ``tokenizer(rendered_text, add_special_tokens=False)``;
  tokenizing the rendered text with the default ``add_special_tokens=True`` gives a double BOS;
- tools that must not see an automatic BOS (inseq, ``docs/environment.md`` gotcha 9) load the tokenizer with
  ``AutoTokenizer.from_pretrained(path, add_bos_token=False)`` and put BOS in the text themselves.

Chat format: ``<|bos|><|user|>{prompt}<|eos|><|assistant|>{response}<|eos|>``; generation stops at ``<|eos|>``.
"""
from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD, USER, ASSISTANT = "<|bos|>", "<|eos|>", "<|pad|>", "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = (BOS, EOS, PAD, USER, ASSISTANT)

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['user', 'assistant'] %}"
    "{{ raise_exception('only user and assistant roles are supported') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|eos|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` and wrap it as a transformers tokenizer with the chat template.

    Byte-level BPE (no prefix space, GPT-2 style) covers any input string, so no ``<unk>`` is needed.
    Training is deterministic for a given text order.
    """
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                        extra_special_tokens={"user_token": USER, "assistant_token": ASSISTANT},
                                        add_bos_token=True, add_eos_token=False, model_max_length=512)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def render_chat(tokenizer: PreTrainedTokenizerFast, prompt: str, response: str | None = None) -> str:
    """The chat text of one user turn, followed by the assistant's ``response`` or, if None, by the
    generation prompt ``<|assistant|>`` that a model completes."""
    messages = [{"role": "user", "content": prompt}]
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=response is None)
