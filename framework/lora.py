"""LoRA pairs: a tuned model given as its base weights plus a peft adapter folder (``ModelSpec.adapter``).

Many instruction-tuned models ship as an adapter (``adapter_config.json`` + ``adapter_model.safetensors``)
for a base checkpoint. :func:`apply_adapter` loads the adapter with peft onto the already loaded base model
and merges ``W + (alpha / r) B A`` into the weights in memory (``merge_and_unload``): the result is a plain
model of the base architecture, so every probe site, the adapter's weight views and the attribution engine
work unchanged, and no merged copy is ever written to disk. In float32 the merged forward equals peft's
unmerged one to rounding (tested); in bf16/fp16 merging rounds ``W + BA`` once to that dtype, as a merged
checkpoint would.

A tokenizer saved in the adapter folder (adapters that add tokens) replaces the base tokenizer, and the
embeddings are resized to it before the adapter loads.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("tuneshift")


def adapter_folder(path: str) -> Path:
    """The adapter folder, checked: it must hold ``adapter_config.json``."""
    from tuneshift.loading import ModelLoadError

    folder = Path(path).expanduser()
    if not (folder / "adapter_config.json").is_file():
        raise ModelLoadError(f"adapter {path!r} is not a peft adapter folder (no adapter_config.json); give the "
                             "folder that `PeftModel.save_pretrained` wrote")
    return folder


def apply_adapter(model: Any, tokenizer: Any, path: str) -> tuple[Any, Any]:
    """``(model with the adapter merged in memory, tokenizer)``; ``model`` is the loaded base model."""
    from tuneshift.loading import ModelLoadError

    folder = adapter_folder(path)
    try:
        from peft import PeftModel
    except ImportError as err:  # pragma: no cover - peft is a dependency
        raise ModelLoadError("LoRA adapters need peft: pip install peft") from err
    config = json.loads((folder / "adapter_config.json").read_text())
    if (folder / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)  # padding side and pad token: set by load_model
        if len(tokenizer) != model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
    try:
        peft_model = PeftModel.from_pretrained(model, str(folder), is_trainable=False)
    except (ValueError, KeyError, RuntimeError) as err:
        raise ModelLoadError(f"adapter {path!r} does not fit the base model ({err}); its base is "
                             f"{config.get('base_model_name_or_path')!r}") from err
    merged = peft_model.merge_and_unload()
    merged.eval().requires_grad_(False)
    log.info("merged LoRA adapter %s (r=%s) in memory", folder, config.get("r"))
    return merged, tokenizer


__all__ = ["adapter_folder", "apply_adapter"]
