"""Reproduce the paper's Tables 1 and 2 from the authors' released attributions (methods.md A.5, A.6).

Usage (console script ``tuneshift-paper-tables``, entry point :func:`main`)::

    tuneshift-paper-tables --reference ../shared/reference --out tables.json

``--reference`` holds ``datasets/FinalDataset.tsv``, ``datasets/AnnotatedDataset.tsv`` and
``attributions/ifa_llama_7b/<ID>.pkl`` (base, LLaMA-7B) and ``attributions/ifa_vicuna_7b/<ID>.pkl`` (tuned,
Vicuna-7B). Each pickle holds ``ID``, ``Input`` and ``Output`` (SentencePiece pieces such as ``▁What``,
``<0x0A>``) and ``Explain``, the matrix S already normalised with b = 0 (integers 0..10): it is only
re-thresholded here (b = 7), never normalised again.

Pickles can run code when loaded, so :class:`RestrictedUnpickler` (:mod:`.safe_pickle`) accepts builtin
containers and scalars and numpy arrays only, within an allocation budget checked before anything is built,
and refuses everything else with :class:`UnsafePickleError`.

Instruction tokens (methods.md A.5): each prompt's instruction sentences (``tuneshift.data.load_final_dataset``:
lines first, each annotated fragment replaced by the first prompt sentence holding it) are matched onto the
pieces on character offsets, each sentence on its own, and shed edge pieces that are only white space or
``▁"``: the pieces are turned back into text (``▁`` is a space, ``<0xHH>`` a byte) with each piece's span.
With these rules the released attributions give the paper's published means to 4 decimals.
"""
from __future__ import annotations

import argparse
import codecs
import csv
import difflib
import pickle
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from tuneshift.data import Prompt, load_final_dataset
from tuneshift.errors import TuneshiftError
from tuneshift.instructions import align_spans, edge_tokens
from tuneshift.plugins.saliency import density as dens
from tuneshift.plugins.saliency import stats
from tuneshift.plugins.saliency.safe_pickle import (RestrictedUnpickler, UnsafePickleError,  # noqa: F401
                                                    restricted_load)  # (re-exported)

BASE_DIR = "ifa_llama_7b"        # LLaMA-7B
TUNED_DIR = "ifa_vicuna_7b"      # Vicuna-7B v1.1
RATINGS_MODEL = "vicuna_7B"      # AnnotatedDataset.tsv `Model` whose ratings Table 1 uses (the tuned model)
SPLITS = ("self_instruct", "lima", "mtbench")


class PaperDataError(TuneshiftError, ValueError):
    """The reference data is missing or malformed; the message names the file and what was expected."""


@dataclass(frozen=True)
class ReferenceAttribution:
    """One of the authors' results. ``explain [len(inputs), len(outputs)]`` normalised with b = 0."""

    id: str
    inputs: list[str]
    outputs: list[str]
    explain: np.ndarray


def load_attribution(path: str | Path) -> ReferenceAttribution:
    """Read and validate one attribution pickle (restricted unpickler)."""
    path = Path(path)
    if not path.is_file():
        raise PaperDataError(f"attribution file {str(path)!r} does not exist")
    try:
        obj = restricted_load(path.read_bytes())
    except UnsafePickleError as err:
        raise type(err)(f"{path}: {err}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError) as err:
        raise PaperDataError(f"{path}: truncated or not a pickle ({type(err).__name__}: {str(err)[:120]}); the "
                             "attribution files are the authors' pickles, copy them again") from None
    if not isinstance(obj, dict) or not {"ID", "Input", "Output", "Explain"} <= set(obj):
        raise PaperDataError(f"{path}: expected a dict with keys ID, Input, Output, Explain; got "
                             f"{type(obj).__name__} {sorted(obj) if isinstance(obj, dict) else ''}")
    inputs, outputs = list(obj["Input"]), list(obj["Output"])
    if not all(isinstance(t, str) for t in inputs + outputs):
        raise PaperDataError(f"{path}: Input and Output must be lists of token strings")
    explain = np.asarray(obj["Explain"], dtype=np.float64)
    if not outputs and explain.size == 0:
        explain = np.zeros((len(inputs), 0))  # the authors store an empty response as shape (0,)
    if explain.shape != (len(inputs), len(outputs)):
        raise PaperDataError(f"{path}: Explain has shape {explain.shape}, expected (len(Input), len(Output)) = "
                             f"({len(inputs)}, {len(outputs)})")
    return ReferenceAttribution(str(obj["ID"]), inputs, outputs, explain)


# ---- pieces to text and instruction tokens --------------------------------------------------------------------
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def pieces_to_text(pieces: Sequence[str]) -> tuple[str, np.ndarray, np.ndarray]:
    """Text of SentencePiece ``pieces`` and each piece's ``[start, end)`` character span in it.

    ``▁`` is a space; byte pieces (``<0x0A>``, or the UTF-8 bytes of one character split over several
    pieces) are decoded incrementally, and every byte piece spans the character it belongs to.
    """
    parts: list[str] = []
    starts, ends = np.zeros(len(pieces), dtype=np.int64), np.zeros(len(pieces), dtype=np.int64)
    pos, pending = 0, []
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def emit(text: str, owners: list[int]) -> None:
        nonlocal pos
        starts[owners], ends[owners] = pos, pos + len(text)
        parts.append(text)
        pos += len(text)

    for i, piece in enumerate(pieces):
        byte = _BYTE_PIECE.fullmatch(piece)
        if byte is None and pending:  # a character left incomplete: whatever the decoder makes of it
            emit(decoder.decode(b"", final=True), pending)
            pending = []
        if byte is None:
            emit(piece.replace("\u2581", " "), [i])
            continue
        pending.append(i)
        text = decoder.decode(bytes([int(byte.group(1), 16)]))
        if text:
            emit(text, pending)
            pending = []
    if pending:
        emit(decoder.decode(b"", final=True), pending)
    return "".join(parts), starts, ends


def _char_map(source: str, target: str) -> np.ndarray:
    """Position in ``target`` of each character of ``source`` (-1 where it has none), plus the end."""
    mapping = np.full(len(source) + 1, -1, dtype=np.int64)
    if target.startswith(" ") and target[1:] == source:  # SentencePiece's dummy prefix space
        mapping[:] = np.arange(len(source) + 1) + 1
        return mapping
    if target == source:
        mapping[:] = np.arange(len(source) + 1)
        return mapping
    for a, b, size in difflib.SequenceMatcher(None, source, target, autojunk=False).get_matching_blocks():
        mapping[a:a + size] = np.arange(b, b + size)
    mapping[-1] = len(target)
    return mapping


def instruction_mask(prompt: Prompt, pieces: Sequence[str]) -> np.ndarray:
    """Bool mask over ``pieces``: the instruction pieces of ``prompt`` (methods.md A.5). ``[n_pieces]``

    Each instruction span is carried into the text rebuilt from the pieces, then aligned on its own by
    :func:`tuneshift.instructions.align_spans`: the pieces overlapping it, minus edge pieces that are only
    white space (``▁``, ``<0x0A>``) or ``▁"``.
    """
    text, starts, ends = pieces_to_text(pieces)
    mapping = _char_map(prompt.text, text)
    spans = []
    for s, e in prompt.instruction_spans:
        inside = mapping[s:e][mapping[s:e] >= 0]
        if inside.size == 0:
            raise PaperDataError(f"prompt {prompt.id!r}: instruction {prompt.text[s:e][:60]!r} is not in the "
                                 "text reconstructed from the attribution's Input pieces")
        spans.append((int(inside.min()), int(inside.max()) + 1))
    surfaces = [text[a:b] for a, b in zip(starts, ends)]
    return align_spans(starts, ends, spans, edge_tokens(surfaces), prompt.id, text)


# ---- scores and tables ----------------------------------------------------------------------------------------
def load_ratings(path: str | Path, model: str | None = RATINGS_MODEL) -> pd.DataFrame:
    """Ratings as columns ``id`` and ``rating`` (int), from either layout:

    - ``AnnotatedDataset.tsv``: columns ``File`` (``<ID>.pkl``), ``Model``, ``Rating``;
    - a TSV (``.tsv``/``.txt``) or CSV with columns ``id`` and ``rating`` (and optionally ``model``).

    With ``model`` only rows whose model column equals it are kept (None or "": all rows).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise PaperDataError(f"ratings file {str(path)!r} does not exist")
    csv.field_size_limit(1 << 30)
    delimiter = "\t" if path.suffix.lower() in (".tsv", ".txt") else ","
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter, quoting=csv.QUOTE_NONE)
        fields = set(reader.fieldnames or ())
        if {"File", "Model", "Rating"} <= fields:
            id_col, model_col, rating_col = "File", "Model", "Rating"
        elif {"id", "rating"} <= fields:
            id_col, model_col, rating_col = "id", "model" if "model" in fields else None, "rating"
        else:
            raise PaperDataError(f"{path}: expected columns File, Model, Rating (AnnotatedDataset.tsv) or id, "
                                 f"rating; found {sorted(fields)}")
        if model and model_col is None:
            raise PaperDataError(f"{path}: no model column to select {model!r} from")
        try:
            rows = [(r[id_col].strip().removesuffix(".pkl"), int(float(r[rating_col]))) for r in reader
                    if not model or r[model_col] == model]
        except (TypeError, ValueError) as err:
            raise PaperDataError(f"{path}: a rating is not a number ({err})") from err
    if not rows:
        raise PaperDataError(f"{path}: no ratings" + (f" for model {model!r}" if model else ""))
    return pd.DataFrame(rows, columns=["id", "rating"])


def score_reference(attr: ReferenceAttribution, prompt: Prompt, b: float = 7.0, p: float = 4.0) -> dict:
    """One prompt's score from the authors' matrix (threshold only, no second normalisation)."""
    mask = instruction_mask(prompt, attr.inputs)
    return {"id": prompt.id, "split": prompt.split, "n_response": len(attr.outputs),
            "n_instruction": int(mask.sum()), "score": dens.score_matrix(attr.explain, mask, b, p),
            "profile": dens.decile_profile(dens.density(dens.threshold(attr.explain, b), p))}


def select_prompts(prompts: Sequence[Prompt], limit_per_split: int | None) -> list[Prompt]:
    """The first ``limit_per_split`` prompts of each split (all when None), in dataset order."""
    if not limit_per_split:
        return list(prompts)
    seen: dict[str, int] = {}
    chosen = []
    for prompt in prompts:
        if seen.get(prompt.split, 0) < limit_per_split:
            chosen.append(prompt)
            seen[prompt.split] = seen.get(prompt.split, 0) + 1
    return chosen


def reference_scores(reference: Path, model_dir: str, prompts: Sequence[Prompt], b: float, p: float) -> pd.DataFrame:
    root = reference / "attributions" / model_dir
    if not root.is_dir():
        raise PaperDataError(f"attribution folder {str(root)!r} does not exist")
    rows = [score_reference(load_attribution(root / f"{pr.id}.pkl"), pr, b, p) for pr in prompts]
    return pd.DataFrame(rows)


def paper_scores(reference: str | Path, b: float = 7.0, p: float = 4.0, limit_per_split: int | None = None,
                 base_dir: str = BASE_DIR, tuned_dir: str = TUNED_DIR, ratings_model: str = RATINGS_MODEL,
                 ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Per-prompt scores of the base and the tuned model (columns id, split, score, n_response,
    n_instruction, profile) and the ratings of ``ratings_model``, from the reference data."""
    reference = Path(reference).expanduser()
    prompts = select_prompts(load_final_dataset(reference / "datasets" / "FinalDataset.tsv"), limit_per_split)
    ratings = load_ratings(reference / "datasets" / "AnnotatedDataset.tsv", ratings_model)
    return (reference_scores(reference, base_dir, prompts, b, p), reference_scores(reference, tuned_dir, prompts, b, p),
            ratings)


def tables_from_scores(base: pd.DataFrame, tuned: pd.DataFrame, ratings: pd.DataFrame) -> tuple[dict, pd.DataFrame]:
    """``({"table1": ..., "table2": ...}, decile table)``: Table 1 on the tuned model's ratings."""
    order = lambda table: {k: table[k] for k in sorted(table, key=lambda s: (SPLITS + (s,)).index(s))}  # noqa: E731
    tables = {"table1": order(stats.table1(tuned, ratings)), "table2": order(stats.table2(base, tuned))}
    deciles = stats.decile_table({"base": np.stack(base["profile"].to_list()),
                                  "tuned": np.stack(tuned["profile"].to_list())})
    return tables, deciles


def paper_tables(reference: str | Path, b: float = 7.0, p: float = 4.0, limit_per_split: int | None = None,
                 **dirs: str) -> tuple[dict, pd.DataFrame]:
    """``({"table1": ..., "table2": ...}, decile table)`` from the reference data under ``reference``."""
    return tables_from_scores(*paper_scores(reference, b, p, limit_per_split, **dirs))


def format_tables(tables: dict) -> str:
    """Human-readable Tables 1 and 2."""
    lines = ["Table 1: instruction importance, followed vs not followed (tuned model; Welch, unfollowed < followed)",
             f"{'split':<14}{'followed':>10}{'n':>6}{'unfollowed':>12}{'n':>6}{'p':>12}"]
    for split, r in tables["table1"].items():
        lines.append(f"{split:<14}{r['followed_mean']:>10.4f}{r['n_followed']:>6}{r['unfollowed_mean']:>12.4f}"
                     f"{r['n_unfollowed']:>6}{r['p']:>12.3g}")
    lines += ["", "Table 2: instruction importance, base vs tuned (Welch, base < tuned)",
              f"{'split':<14}{'base':>10}{'tuned':>10}{'n':>6}{'p':>12}"]
    for split, r in tables["table2"].items():
        lines.append(f"{split:<14}{r['base_mean']:>10.4f}{r['tuned_mean']:>10.4f}{r['n']:>6}{r['p']:>12.3g}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point of ``tuneshift-paper-tables``."""
    parser = argparse.ArgumentParser(prog="tuneshift-paper-tables", description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", required=True, type=Path,
                        help="folder with datasets/ and attributions/ (the authors' released data)")
    parser.add_argument("--out", type=Path, help="write the tables as JSON here")
    parser.add_argument("--b", type=float, default=7.0, help="sparsification threshold b (paper: 7)")
    parser.add_argument("--p", type=float, default=4.0, help="density norm exponent p (paper: 4)")
    parser.add_argument("--limit-per-split", type=int, default=None,
                        help="use only the first N prompts of each split (quick checks)")
    parser.add_argument("--deciles", action="store_true",
                        help="also print the density profile over prompt position and add it to the JSON")
    parser.add_argument("--plots", type=Path, help="write score_distribution.png and density_profile.png here")
    args = parser.parse_args(argv)
    if not 0 <= args.b < 10:
        parser.error(f"--b {args.b:g}: the threshold must lie in [0, 10) (scores are 0..10; the paper uses 7)")
    if args.p <= 1:
        parser.error(f"--p {args.p:g}: the density exponent must be > 1 (the paper uses 4)")
    if args.limit_per_split is not None and args.limit_per_split < 1:
        parser.error(f"--limit-per-split {args.limit_per_split}: give a positive number of prompts per split")
    try:
        base, tuned, ratings = paper_scores(args.reference, args.b, args.p, args.limit_per_split)
        tables, deciles = tables_from_scores(base, tuned, ratings)
    except (TuneshiftError, OSError) as err:
        print(f"tuneshift-paper-tables: error: {err}", file=sys.stderr)
        return 2
    try:
        _write_outputs(args, base, tuned, tables, deciles)
    except OSError as err:
        print(f"tuneshift-paper-tables: error: cannot write the outputs (--out, --plots): {err.strerror}: "
              f"{err.filename!r}", file=sys.stderr)
        return 2
    return 0


def _write_outputs(args: argparse.Namespace, base: pd.DataFrame, tuned: pd.DataFrame, tables: dict,
                   deciles: pd.DataFrame) -> None:
    print(format_tables(tables))
    payload = dict(tables)
    if args.deciles:
        print("\nMean normalised density by relative prompt position (decile)")
        print(deciles.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        payload["deciles"] = deciles.to_dict(orient="list")
    if args.plots is not None:
        from tuneshift.plugins.saliency import views

        views.score_distribution_png(args.plots / "score_distribution.png", {"LLaMA-7B": base, "Vicuna-7B": tuned},
                                     f"instruction scores from the released attributions (b = {args.b:g})")
        views.density_profile_png(args.plots / "density_profile.png",
                                  deciles.rename(columns={"base": "LLaMA-7B", "tuned": "Vicuna-7B"}),
                                  "importance density over relative prompt position")
    if args.out is not None:
        from tuneshift.results import atomic_write_json

        atomic_write_json(Path(args.out), payload)


if __name__ == "__main__":
    raise SystemExit(main())
