"""A Llama of a real size with random weights, saved as a local folder, for speed benchmarks on a GPU.

Timing does not depend on trained weights, so a 1B+ model built from a config measures what a user's
LLaMA/Vicuna-sized run costs without downloading anything. Shapes follow TinyLlama-1.1B (``1b``) and
LLaMA-7B (``7b``); the tokenizer is tuneshift's small offline BPE (ids < 512 of the 32,000-row embedding).

    python benchmarks/random_llama.py --size 1b --out /tmp/random-llama-1b      # prints the folder
    benchmarks/run_gpu.sh                                                        # builds it and benchmarks
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

SIZES = {  # hidden, layers, heads, kv heads, intermediate
    "1b": (2048, 22, 32, 4, 5632),
    "7b": (4096, 32, 32, 32, 11008),
    "small": (256, 4, 4, 4, 688),
}


def llama_config(size: str, tokenizer) -> LlamaConfig:
    hidden, layers, heads, kv, ff = SIZES[size]
    return LlamaConfig(vocab_size=32000, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv, intermediate_size=ff, max_position_embeddings=4096,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)


def n_parameters(size: str) -> int:
    """Parameter count without building the weights (meta device)."""
    from tuneshift.testing import tiny_tokenizer

    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(size, tiny_tokenizer()))
    return sum(p.numel() for p in model.parameters())


def build(size: str, out: Path, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write ``out`` (config, random weights in ``dtype``, tokenizer) unless it exists already."""
    from tuneshift.testing import tiny_tokenizer

    if (out / "config.json").is_file():
        return out
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(size, tokenizer)).to(dtype)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1b", choices=sorted(SIZES))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    print(build(args.size, args.out))


if __name__ == "__main__":
    main()
