"""Prompt datasets with instruction and context spans, and their alignment onto any tokenizer's tokens.

A :class:`Prompt` carries its text and the character spans of its instruction; everything else is context.
Spans are aligned to tokens on character offsets (``return_offsets_mapping``), each span on its own and
trimmed of white-space and ``▁"`` edge tokens (:func:`tuneshift.instructions.align_spans`), so the same
dataset works for SentencePiece, byte-level BPE, Gemma's pieces or any other fast tokenizer.

Formats (string ids for configs, see :data:`DATASETS`):

- ``builtin``: the project's own English set (``framework/builtin_prompts.jsonl``).
- ``jsonl``: one object a line: ``{"id", "prompt", "instructions": [substrings of prompt]}`` or
  ``"instruction_spans": [[start, end], ...]``, optional ``"split"``, ``"category"``, ``"reference"``.
- ``final_dataset``: the paper's ``FinalDataset.tsv`` (columns ``ID, Prompt, Response, Instruct&Context``,
  ``/n`` for newline, ``/t`` for tab); each annotated piece becomes the prompt sentence holding it
  (:mod:`tuneshift.instructions`, methods.md A.5).
"""
from __future__ import annotations

import contextlib
import csv
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tuneshift.instructions import (DataError, align_spans, annotated_spans, edge_tokens,  # noqa: F401
                                    sentence_spans, substring_span, token_surfaces)       # (re-exported)
from tuneshift.paths import ORGANISM_PROMPTS_PATH
from tuneshift.registry import Registry, RegistryError

BUILTIN_PROMPTS_PATH = Path(__file__).with_name("builtin_prompts.jsonl")


@dataclass(frozen=True)
class Prompt:
    """One prompt. ``instruction_spans`` are ``(start, end)`` character offsets into ``text``."""

    id: str
    text: str
    instruction_spans: tuple[tuple[int, int], ...]
    split: str = "default"
    category: str = ""
    reference: str | None = None

    def __post_init__(self) -> None:
        for start, end in self.instruction_spans:
            if not 0 <= start < end <= len(self.text):
                raise DataError(f"prompt {self.id!r}: instruction span ({start}, {end}) lies outside its "
                                f"{len(self.text)}-character text; spans are [start, end) character offsets")

    @property
    def instruction_text(self) -> list[str]:
        return [self.text[s:e] for s, e in self.instruction_spans]


# ---- span helpers ---------------------------------------------------------------------------------------------
def find_span(text: str, piece: str, prompt_id: str) -> tuple[int, int]:
    """Character span of ``piece`` in ``text`` (exact, else whitespace-insensitive), or a clear error."""
    return substring_span(text, piece, prompt_id)


def distinct_spans(spans: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Sorted distinct spans. Spans are never merged: each is aligned and trimmed on its own (A.5)."""
    return tuple(sorted(set(spans)))


# ---- loaders --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _utf8(path: Path) -> Iterator[None]:
    """Turn a decoding error while reading ``path`` into a :class:`DataError` naming the file and the byte."""
    try:
        yield
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}); "
                        "save the file as UTF-8") from None


def _read_text(path: Path) -> str:
    with _utf8(path):
        return path.read_text(encoding="utf-8")


def _field(row: dict, key: str, kind: type | tuple[type, ...], where: str, what: str, default=None):
    """``row[key]`` when it has the type ``kind``, ``default`` when absent, else an error naming the field."""
    value = row.get(key, default)
    if value is default:
        return value
    if isinstance(value, bool) or not isinstance(value, kind):
        raise DataError(f'{where}: "{key}" must be {what}, got {type(value).__name__} {json.dumps(value)[:60]}')
    return value


def _jsonl_spans(row: dict, text: str, pid: str, where: str) -> list[tuple[int, int]]:
    """Instruction spans of one JSONL row, from ``instruction_spans`` or ``instructions`` (validated)."""
    if "instruction_spans" in row:
        spans = row["instruction_spans"]
        ok = isinstance(spans, list) and all(
            isinstance(s, list) and len(s) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in s)
            for s in spans)
        if not ok:
            raise DataError(f'{where}: "instruction_spans" must be a list of [start, end] character offsets, got '
                            f"{json.dumps(spans)[:80]}")
        return [(s[0], s[1]) for s in spans]
    pieces = row.get("instructions", [])
    if not isinstance(pieces, list) or not all(isinstance(p, str) for p in pieces):
        hint = ' (a single instruction is ["..."])' if isinstance(pieces, str) else ""
        raise DataError(f'{where}: "instructions" must be a list of strings, each a substring of the prompt, got '
                        f"{json.dumps(pieces)[:80]}{hint}")
    return [find_span(text, piece, pid) for piece in pieces]


def _jsonl_prompt(line: str, where: str, default_split: str) -> Prompt:
    """One JSONL line as a :class:`Prompt`, every field checked (the message names the line and the field)."""
    expected = '{"id": ..., "prompt": ..., "instructions": [...]}'
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: not valid JSON ({err.msg} at column {err.colno}); each line holds one object "
                        f"{expected}") from None
    if not isinstance(row, dict):
        raise DataError(f"{where}: each line must be a JSON object {expected}, got a {type(row).__name__}")
    for key in ("id", "prompt"):
        if key not in row:
            raise DataError(f'{where}: no "{key}" field; each line needs at least {expected}')
    pid = _field(row, "id", (str, int), where, "a string (or integer) id")
    text = _field(row, "prompt", str, where, "a string")
    if not text.strip():
        raise DataError(f"{where}: prompt {str(pid)!r} is empty; give the prompt text")
    split = _field(row, "split", str, where, "a string", default_split)
    category = _field(row, "category", str, where, "a string", "")
    reference = _field(row, "reference", str, where, "a string or null")
    spans = _jsonl_spans(row, text, str(pid), where)
    return Prompt(str(pid), text, distinct_spans(spans), split, category, reference)


def _no_duplicates(prompts: Sequence[Prompt], path: str | Path, places: Sequence[str]) -> None:
    """Prompt ids key every result table: each may occur once. ``places``: where each prompt is ("line 3")."""
    seen: dict[str, str] = {}
    for prompt, place in zip(prompts, places):
        if prompt.id in seen:
            raise DataError(f"{path}: the prompt id {prompt.id!r} on {place} is already used on {seen[prompt.id]}; "
                            "prompt ids must be unique (they key every result table)")
        seen[prompt.id] = place


def load_jsonl(path: str | Path, default_split: str = "default") -> list[Prompt]:
    """Prompts from a JSONL file (format in the module docstring)."""
    path = _existing(path)
    prompts, lines = [], []
    for line_no, line in enumerate(_read_text(path).splitlines(), 1):
        if line.strip():
            prompts.append(_jsonl_prompt(line, f"{path}:{line_no}", default_split))
            lines.append(f"line {line_no}")
    _no_duplicates(prompts, path, lines)
    return prompts


def _final_dataset_split(prompt_id: str) -> str:
    if prompt_id.startswith("user_oriented"):
        return "self_instruct"
    return prompt_id.split("_")[0]  # lima, mtbench


def decode_tsv_escapes(text: str) -> str:
    """FinalDataset/AnnotatedDataset write ``/n`` for a newline and ``/t`` for a tab."""
    return text.replace("/n", "\n").replace("/t", "\t")


def load_final_dataset(path: str | Path) -> list[Prompt]:
    """The paper's ``FinalDataset.tsv``, instruction sentences resolved by the authors' rule (methods.md A.5,
    :func:`tuneshift.instructions.annotated_spans`)."""
    path = _existing(path)
    csv.field_size_limit(1 << 30)
    prompts, lines = [], []
    with _utf8(path), path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        missing = {"ID", "Prompt", "Instruct&Context"} - set(reader.fieldnames or ())
        if missing:
            raise DataError(f"{path}: missing columns {sorted(missing)}; expected the FinalDataset.tsv layout "
                            "ID, Prompt, Response, Instruct&Context")
        for row in reader:
            if row["Prompt"] is None or row["Instruct&Context"] is None:
                raise DataError(f"{path}:{reader.line_num}: too few tab-separated columns; expected ID, Prompt, "
                                "Response, Instruct&Context")
            pid, text = row["ID"], decode_tsv_escapes(row["Prompt"])
            spans = annotated_spans(text, decode_tsv_escapes(row["Instruct&Context"]), pid)
            prompts.append(Prompt(pid, text, spans, _final_dataset_split(pid)))
            lines.append(f"line {reader.line_num}")
    _no_duplicates(prompts, path, lines)
    return prompts


def _existing(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if path.is_dir():
        raise DataError(f"dataset path {str(path)!r} is a folder, not a file; set data.path to the data file")
    if not path.is_file():
        raise DataError(f"dataset file {str(path)!r} does not exist; give an existing path (relative paths are "
                        "resolved from the directory you run tuneshift in)")
    return path


@dataclass(frozen=True)
class DatasetFormat:
    """A dataset format id: how to read a file of it, and the file read when the config gives no path."""

    load: Callable[[str | Path], list[Prompt]]
    default_path: Path | None = None


DATASETS: Registry[DatasetFormat] = Registry(
    "dataset format", group="tuneshift.datasets",
    how_to_add="Register one with tuneshift.data.DATASETS.register('mine', DatasetFormat(load=my_loader)).")
DATASETS.register("builtin", DatasetFormat(lambda path: load_jsonl(path, "builtin"), BUILTIN_PROMPTS_PATH))
DATASETS.register("organism", DatasetFormat(lambda path: load_jsonl(path, "organism"), ORGANISM_PROMPTS_PATH))
DATASETS.register("jsonl", DatasetFormat(load_jsonl))
DATASETS.register("final_dataset", DatasetFormat(load_final_dataset))


def load_prompts(fmt: str, path: str | None = None, limit: int | None = None,
                 splits: Sequence[str] | None = None, ids: Sequence[str] | None = None) -> list[Prompt]:
    """Load a dataset by format id, optionally filtered by split or id and cut to the first ``limit`` prompts."""
    try:
        dataset = DATASETS.get(fmt)
    except RegistryError as err:
        raise DataError(str(err)) from None
    if limit is not None and (isinstance(limit, bool) or int(limit) < 1):
        raise DataError(f"data.limit={limit!r}: give a positive number of prompts, or null for all of them")
    path = path if path is not None else dataset.default_path
    if path is None:
        raise DataError(f"data.format={fmt!r} reads a file: set data.path=/path/to/your/file")
    prompts = dataset.load(path)
    if not prompts:
        raise DataError(f"the dataset file {str(path)!r} holds no prompts (it is empty); give a file with at least "
                        "one prompt")
    if len({p.id for p in prompts}) != len(prompts):
        _no_duplicates(prompts, path, [f"prompt {i + 1}" for i in range(len(prompts))])
    return _select(prompts, limit, splits, ids)


def _select(prompts: list[Prompt], limit: int | None, splits: Sequence[str] | None,
            ids: Sequence[str] | None) -> list[Prompt]:
    """Filter by split and id (every name given must exist), then the first ``limit`` prompts."""
    if splits:
        present = sorted({p.split for p in prompts})
        unknown = [s for s in splits if s not in present]
        if unknown:
            raise DataError(f"data.splits: no prompt has split {', '.join(map(repr, unknown))}; this dataset's "
                            f"splits: {', '.join(present)}")
        prompts = [p for p in prompts if p.split in splits]
    if ids:
        present_ids = {p.id for p in prompts}
        unknown = [i for i in ids if i not in present_ids]
        if unknown:
            shown = ", ".join(map(repr, unknown[:5])) + (" ..." if len(unknown) > 5 else "")
            raise DataError(f"data.ids: no prompt (of the selected splits) has id {shown}; check the ids against "
                            "the data file")
        prompts = [p for p in prompts if p.id in set(ids)]
    return prompts[:limit] if limit else prompts


# ---- alignment onto tokens ------------------------------------------------------------------------------------
@dataclass
class EncodedPrompt:
    """A prompt as a model sees it. Index tensors are over the model input (template and BOS included).

    ``input_ids``          # [n_prompt_tokens]
    ``instruction_mask``   # [n_prompt_tokens] bool, instruction tokens (A.5: overlapping a span, edges trimmed)
    ``content_mask``       # [n_prompt_tokens] bool, tokens overlapping the user's prompt text
    ``response_ids``       # [n_response_tokens] or None until a response is generated or given
    ``stop_id``            the token that ended a generated response (None: cut at max_new_tokens, or given)
    """

    prompt: Prompt
    input_ids: torch.Tensor
    instruction_mask: torch.Tensor
    content_mask: torch.Tensor
    tokens: list[str]
    response_ids: torch.Tensor | None = None
    response_text: str | None = None
    stop_id: int | None = None
    extras: dict = field(default_factory=dict)

    @property
    def n_prompt(self) -> int:
        return int(self.input_ids.numel())

    @property
    def n_response(self) -> int:
        return 0 if self.response_ids is None else int(self.response_ids.numel())


def render_prompt(tokenizer, text: str, chat_template: bool) -> tuple[str, int, bool]:
    """The model input string for ``text``, where ``text`` starts in it, and whether BOS must be prepended.

    With ``chat_template`` the tokenizer's template is applied (it brings its own BOS if any); without, the raw
    prompt is used and BOS is prepended when the model has one (the paper's protocol: ``BOS, x``).
    """
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("chat_template=true but this tokenizer has no chat template; set chat_template=false "
                            "for base models")
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                 add_generation_prompt=True)
        return rendered, rendered.index(text), False
    return text, 0, tokenizer.bos_token_id is not None


def encode_prompt(tokenizer, prompt: Prompt, chat_template: bool = False) -> EncodedPrompt:
    """Tokenize ``prompt`` (with template or BOS) and mark its instruction tokens on character offsets."""
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("span alignment needs a fast tokenizer (offset mapping); load it with use_fast=True")
    rendered, shift, add_bos = render_prompt(tokenizer, prompt.text, chat_template)
    enc = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    if add_bos and (not ids or ids[0] != tokenizer.bos_token_id):
        ids, offsets = [tokenizer.bos_token_id] + ids, [(0, 0)] + offsets
    starts = np.array([s for s, _ in offsets], dtype=np.int64) - shift   # [n_tokens], prompt coordinates
    ends = np.array([e for _, e in offsets], dtype=np.int64) - shift
    tokens = tokenizer.convert_ids_to_tokens(ids)
    edges = edge_tokens(token_surfaces(tokenizer, tokens))
    instruction = align_spans(starts, ends, prompt.instruction_spans, edges, prompt.id, prompt.text)
    content = (ends > starts) & (starts < len(prompt.text)) & (ends > 0)
    return EncodedPrompt(prompt, torch.tensor(ids), torch.from_numpy(instruction), torch.from_numpy(content),
                         tokens)


def left_pad(sequences: Sequence[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad 1-D id tensors: ``input_ids [B, T]``, ``attention_mask [B, T]``, ``position_ids [B, T]``.

    Position ids count real tokens only, so a padded row computes what it would alone.
    """
    width = max(int(s.numel()) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - seq.numel():] = seq
        mask[row, width - seq.numel():] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions
