"""Tiny random models of every supported family and offline tokenizers, for tests and the smoke default.

Nothing here downloads anything: the tokenizer is a byte-level BPE trained in about a second on the
built-in prompts, and each model is built from a config with random weights (seeded). Two more tokenizers
mimic the other families' pieces (LLaMA's SentencePiece, Gemma's) for the instruction-alignment tests.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
import transformers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|eos|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def _training_text() -> list[str]:
    from tuneshift.data import BUILTIN_PROMPTS_PATH

    rows = [json.loads(line) for line in BUILTIN_PROMPTS_PATH.read_text().splitlines() if line.strip()]
    words = "the of and to in is was for on that with as by at from it an be this are or which".split()
    return [r["prompt"] for r in rows] + [" ".join(words[i:] + words[:i]) for i in range(len(words))]


@functools.lru_cache(maxsize=4)
def tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE (no BOS added automatically) with a chat template; any text encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_training_text(), trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>",
                                 pad_token="<|pad|>", padding_side="left")
    hf.chat_template = CHAT_TEMPLATE
    return hf


def _common(tok: PreTrainedTokenizerFast) -> dict:
    return dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)


def tiny_config(family: str, tok: PreTrainedTokenizerFast) -> transformers.PretrainedConfig:
    """A 2-layer config of ``family`` with d_model 64; grouped-query attention where the family has it."""
    c = _common(tok)
    llama_like = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, **c)
    if family == "llama":
        return transformers.LlamaConfig(**llama_like, tie_word_embeddings=True)
    if family == "mistral":
        return transformers.MistralConfig(**llama_like, sliding_window=None)
    if family == "qwen2":
        return transformers.Qwen2Config(**llama_like, tie_word_embeddings=True)
    if family == "gemma":
        return transformers.GemmaConfig(**llama_like, head_dim=16)
    if family == "gemma2":
        return transformers.Gemma2Config(**llama_like, head_dim=16, query_pre_attn_scalar=16)
    if family == "gemma3":
        return transformers.Gemma3TextConfig(**llama_like, head_dim=16, query_pre_attn_scalar=16,
                                             sliding_window=8)
    if family == "phi3":
        return transformers.Phi3Config(**llama_like)
    if family == "gpt2":
        return transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **c)
    if family == "gpt_neox":
        return transformers.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, max_position_embeddings=256, rotary_pct=0.5,
                                          **c)
    raise ValueError(f"no tiny config for family {family!r}; known: {', '.join(TINY_FAMILIES)}")


TINY_FAMILIES = ("llama", "mistral", "qwen2", "gemma", "gemma2", "gemma3", "phi3", "gpt2", "gpt_neox")


def tiny_model(family: str = "llama", seed: int = 0, attn_implementation: str = "eager") -> torch.nn.Module:
    """A random tiny causal LM of ``family`` in eval mode, fp32, on CPU."""
    tok = tiny_tokenizer()
    cfg = tiny_config(family, tok)
    cfg._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation)
    gain_centre = 0.0 if family.startswith("gemma") else 1.0  # Gemma stores gains as offsets from 1
    with torch.no_grad():  # random gains and biases, so a test sees a wrong gain, offset or bias
        for name, p in model.named_parameters():
            if p.ndim == 1:
                is_gain = name.endswith("weight") and ("norm" in name or ".ln_" in name)
                p.copy_(torch.randn_like(p) * 0.1 + (gain_centre if is_gain else 0.0))
    return model.eval()


def save_tiny_model(path: str | Path, family: str = "llama", seed: int = 0) -> Path:
    """Write a tiny model and its tokenizer to ``path`` (a local folder any loader accepts)."""
    path = Path(path)
    tiny_model(family, seed).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


# ---- tokenizers of the other families' kinds (instruction-token alignment tests) ------------------------------
_STYLE_CORPUS = [
    'Rewrite the quote below in plain words. Keep it under 20 words, and name the speaker.',
    'Answer this question: "What is 2 + 2?" Then explain your answer in 3 steps.',
    'Input: "Time is money," he said. Output: the answer is 4. She said "hello" and left.',
    'Summarize the text. Translate the sentence into French. List 5 ideas for a party.',
]


def _piece_split():
    """Pieces as SentencePiece vocabularies have them: ``▁`` + letters, ``▁`` + punctuation (``▁"``), one
    digit, a bare ``▁``, a run of white space (``\n\n``); BPE never merges across these."""
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Split(Regex("\u2581?\\p{L}+|\u2581?[^\\p{L}\\p{N}\\s\u2581]+|\\p{N}|\u2581|\\s+"),
                                behavior="isolated")


def _style_tokenizer(normalizer, pre_tokenizer, decoder, newline_piece: bool,
                     vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-fallback BPE trained in well under a second on the built-in prompts plus a few sentences with
    quotes, digits and ``Input:``/``Output:`` labels (so that ``▁"``, a bare ``▁`` and ``\n\n`` occur)."""
    from tokenizers import Tokenizer, models, trainers

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre_tokenizer, decoder
    byte_pieces = [f"<0x{i:02X}>" for i in range(256)]
    corpus = _training_text() + _STYLE_CORPUS * 20
    if newline_piece:  # Gemma keeps "\n" and "\n\n" as pieces; LLaMA's SentencePiece falls back to <0x0A>
        corpus = [t.replace(". ", ".\n") + "\n\nOutput:" for t in corpus]
    else:
        corpus = [t.replace("\n", " ") for t in corpus]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", *byte_pieces],
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<unk>", padding_side="left")


@functools.lru_cache(maxsize=2)
def sentencepiece_tokenizer(vocab_size: int = 900) -> PreTrainedTokenizerFast:
    """A LLaMA-style SentencePiece BPE: ``▁`` word prefix (a dummy one at the start), digits split with a
    bare ``▁`` before them, byte fallback (a newline is ``<0x0A>``), and ``▁"`` as one piece."""
    from tokenizers import decoders, pre_tokenizers

    pre = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first"),
                                   _piece_split()])
    dec = decoders.Sequence([decoders.Metaspace(replacement="\u2581", prepend_scheme="first"),
                             decoders.ByteFallback(), decoders.Fuse()])
    return _style_tokenizer(None, pre, dec, newline_piece=False, vocab_size=vocab_size)


@functools.lru_cache(maxsize=2)
def gemma_style_tokenizer(vocab_size: int = 900) -> PreTrainedTokenizerFast:
    """A Gemma-style BPE: spaces normalised to ``▁`` (no dummy prefix), newlines kept as literal ``\\n`` and
    ``\\n\\n`` pieces, digits split, byte fallback; Gemma's decoder (replace ``▁``, bytes, fuse)."""
    from tokenizers import decoders, normalizers

    pre = _piece_split()
    dec = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    return _style_tokenizer(normalizers.Replace(" ", "\u2581"), pre, dec, newline_piece=True,
                            vocab_size=vocab_size)
