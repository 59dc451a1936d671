"""Concept annotators for word sets (method C, step 3), found by string id, with an on-disk cache.

An annotator turns the top words of one direction and a seed into an :class:`Annotation` (concept or
"cannot tell", assistant tasks, linguistic level). Built-in ids (:func:`available_annotators`):

- ``offline`` (default): deterministic rules over shipped word lists and a WordNet digest
  (:mod:`tuneshift.plugins.ffn_concepts.offline`). Its seeds are honest resamples: seed s labels a deterministic
  random subset (``subsample`` of the words, default 80%, drawn by a generator seeded with s and the word
  set), so seeds can disagree where a concept holds for only about half of the words.
- ``llm_judge``: a local chat model through transformers with the few-shot prompts of
  :mod:`tuneshift.plugins.ffn_concepts.prompts`; step 1 sampled at ``temperature`` (1.0), steps 2-3 greedy.
- ``endpoint``: an OpenAI-compatible ``/chat/completions`` server (URL, key, model in the options), with a
  timeout per call and a bounded number of retries with exponential backoff.

A new annotator subclasses :class:`Annotator` with an ``id``, an ``Options`` dataclass and ``annotate``.

Caching (:class:`AnnotationCache`): one SQLite file (``annotations.sqlite``) in the cache directory, keyed by
the SHA-256 of (annotator id, its identity: prompt version, model, sampling options; the words; the seed).
Only successful annotations are cached, so a failed call is retried by the next run; a failure is recorded
in its result row (``status="failed"`` + ``error``) and never stops the run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import sqlite3
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import numpy as np

from tuneshift.plugins.ffn_concepts import prompts
from tuneshift.registry import Registry, RegistryError, validate_options
from tuneshift.plugins.ffn_concepts.offline import label_words, load_lexicon
from tuneshift.plugins.ffn_concepts.prompts import CANNOT_TELL, ParseError

OK, FAILED = "ok", "failed"


@dataclass(frozen=True)
class Annotation:
    """One direction's labels under one seed. ``tasks`` is empty and ``level`` "" when not explainable."""

    concept: str = ""
    tasks: tuple[str, ...] = ()
    level: str = ""
    status: str = OK
    error: str = ""
    raw: str = ""  # the replies (or the offline rule) that gave the labels, for audit

    @property
    def explainable(self) -> bool:
        return self.status == OK and self.concept != CANNOT_TELL

    @staticmethod
    def failed(error: str, raw: str = "") -> "Annotation":
        return Annotation(status=FAILED, error=error[:500], raw=raw[:2000])

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @staticmethod
    def from_json(text: str) -> "Annotation":
        data = json.loads(text)
        data["tasks"] = tuple(data["tasks"])
        return Annotation(**data)


class AnnotatorError(ValueError):
    """An annotator id or its options are wrong; the message says which and lists the valid ones."""


Item = tuple[tuple[str, ...], int]  # (words, seed)


@dataclass
class NoOptions:
    """Options of an annotator that has none."""


class Annotator:
    """Base class: labels word sets. Subclasses set ``id`` and ``Options`` and implement :meth:`annotate`."""

    id: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    cacheable: ClassVar[bool] = True  # cheap deterministic annotators may skip the cache

    def __init__(self, options: Any = None):
        self.options = options if options is not None else self.Options()
        self.calls = 0  # annotate() calls made (the cache test counts them)

    def identity(self) -> dict:
        """Everything besides the words and the seed that determines the labels (part of the cache key)."""
        return dataclasses.asdict(self.options)

    def annotate(self, words: tuple[str, ...], seed: int) -> Annotation:
        """Label one word set; errors may be raised (the caller records them) or returned as failed."""
        raise NotImplementedError

    def annotate_many(self, items: Sequence[Item]) -> list[Annotation]:
        """Label several word sets; one failing item never stops the others."""
        out = []
        for words, seed in items:
            self.calls += 1
            try:
                out.append(self.annotate(words, seed))
            except Exception as err:  # noqa: BLE001 -- recorded in the row, by design
                out.append(Annotation.failed(f"{type(err).__name__}: {err}"))
        return out

    def close(self) -> None:
        """Free what the annotator holds (a loaded model)."""


ANNOTATORS: Registry[type[Annotator]] = Registry(
    "annotator", group="tuneshift.annotators",
    how_to_add="An annotator subclasses Annotator and is registered with @ANNOTATORS.register (or the "
               "tuneshift.annotators entry-point group).")


def available_annotators() -> list[str]:
    return ANNOTATORS.available()


def build_annotator(annotator_id: str, options: dict | None = None) -> Annotator:
    """Instantiate annotator ``annotator_id`` with ``options`` validated against its ``Options`` dataclass."""
    try:
        cls = ANNOTATORS.get(annotator_id)
    except RegistryError as err:
        raise AnnotatorError(str(err)) from None
    return cls(validate_options(cls.Options, options or {}, f"annotator {annotator_id!r}", AnnotatorError))


# ---- cache ----------------------------------------------------------------------------------------------------
def cache_key(annotator: Annotator, words: Sequence[str], seed: int) -> str:
    payload = json.dumps({"annotator": annotator.id, "identity": annotator.identity(), "words": list(words),
                          "seed": seed}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


class AnnotationCache:
    """Successful annotations in ``<directory>/annotations.sqlite`` (key -> Annotation JSON)."""

    def __init__(self, directory: str | Path):
        self.path = Path(directory).expanduser() / "annotations.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as con:
            con.execute("CREATE TABLE IF NOT EXISTS annotations (key TEXT PRIMARY KEY, annotator TEXT, "
                        "value TEXT, created REAL)")

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=60)

    def get_many(self, keys: Sequence[str]) -> dict[str, Annotation]:
        found: dict[str, Annotation] = {}
        with self._connect() as con:
            for start in range(0, len(keys), 500):
                chunk = list(keys[start:start + 500])
                rows = con.execute(f"SELECT key, value FROM annotations WHERE key IN ({','.join('?' * len(chunk))})",
                                   chunk).fetchall()
                found.update({k: Annotation.from_json(v) for k, v in rows})
        return found

    def put_many(self, annotator_id: str, entries: dict[str, Annotation]) -> None:
        now = time.time()
        with self._connect() as con:
            con.executemany("INSERT OR REPLACE INTO annotations VALUES (?, ?, ?, ?)",
                            [(k, annotator_id, a.to_json(), now) for k, a in entries.items() if a.status == OK])


@dataclass
class AnnotationStats:
    cached: int = 0
    annotated: int = 0
    failed: int = 0


def annotate_word_sets(annotator: Annotator, word_sets: Sequence[tuple[str, ...]], seeds: Sequence[int],
                       cache: AnnotationCache | None,
                       progress: Callable[[int, int], None] | None = None,
                       chunk: int = 256) -> tuple[list[list[Annotation]], AnnotationStats]:
    """Annotate every word set under every seed; ``[n_sets][n_seeds]`` annotations and counts.

    Cached entries are read first; the rest go to ``annotator.annotate_many`` in chunks, and each chunk's
    successes are written to the cache at once (an interrupted run keeps what it paid for).
    """
    items: list[Item] = [(tuple(words), seed) for words in word_sets for seed in seeds]
    use_cache = cache is not None and annotator.cacheable
    keys = [cache_key(annotator, w, s) for w, s in items] if use_cache else []
    results: dict[int, Annotation] = {}
    stats = AnnotationStats()
    if use_cache:
        hits = cache.get_many(keys)  # type: ignore[union-attr]
        results = {i: hits[k] for i, k in enumerate(keys) if k in hits}
        stats.cached = len(results)
    todo = [i for i in range(len(items)) if i not in results]
    for start in range(0, len(todo), chunk):
        part = todo[start:start + chunk]
        try:
            labels = annotator.annotate_many([items[i] for i in part])
        except Exception as err:  # noqa: BLE001 -- a broken annotator fails its rows, not the run
            labels = [Annotation.failed(f"{type(err).__name__}: {err}")] * len(part)
        results.update(zip(part, labels))
        if use_cache:
            cache.put_many(annotator.id, {keys[i]: a for i, a in zip(part, labels)})  # type: ignore[union-attr]
        if progress is not None:
            progress(start + len(part), len(todo))
    stats.annotated = len(todo)
    stats.failed = sum(a.status == FAILED for a in results.values())
    n_seeds = len(seeds)
    ordered = [results[i] for i in range(len(items))]
    return [ordered[j * n_seeds:(j + 1) * n_seeds] for j in range(len(word_sets))], stats


# ---- three-step protocol shared by the chat annotators ----------------------------------------------------------
def three_steps(words: Sequence[str], ask: Callable[[list[dict[str, str]], bool], str]) -> Annotation:
    """Run the paper's three steps through ``ask(messages, sample)``.

    A reply that does not parse, or a call that raises (HTTP error after the retries, timeout), gives a
    failed row naming the step; nothing is raised."""
    replies: list[str] = []
    step = 1
    try:
        replies.append(ask(prompts.concept_messages(words), True))
        concept = prompts.parse_concept(replies[-1])
        if concept == CANNOT_TELL:
            return Annotation(concept, (), "", OK, "", replies[-1])
        step = 2
        replies.append(ask(prompts.tasks_messages(words, concept), False))
        tasks = prompts.parse_tasks(replies[-1])
        step = 3
        replies.append(ask(prompts.level_messages(words, concept), False))
        level = prompts.parse_level(replies[-1])
    except ParseError as err:
        return Annotation.failed(f"step {step}: {err}", "\n---\n".join(replies))
    except Exception as err:  # noqa: BLE001 -- a failed call is recorded, not fatal
        return Annotation.failed(f"step {step}: {type(err).__name__}: {err}", "\n---\n".join(replies))
    return Annotation(concept, tasks, level, OK, "", "\n---\n".join(replies))


# ---- offline -------------------------------------------------------------------------------------------------
@dataclass
class OfflineOptions:
    subsample: float = 0.8  # share of the words each seed sees (1.0: every seed sees all, seeds agree)
    min_share: float = 0.5  # a concept must fit at least this share of the words, else "cannot tell"
    task_share: float = 0.2  # a task is served when its word list holds at least this share
    lexicon: str = ""  # path replacing the shipped WordNet digest (word<TAB>lexnames<TAB>hypernyms)


@ANNOTATORS.register
class OfflineAnnotator(Annotator):
    """Deterministic rules over shipped word lists (see :mod:`tuneshift.plugins.ffn_concepts.offline`)."""

    id = "offline"
    Options = OfflineOptions
    cacheable = False  # recomputing is as cheap as a cache lookup

    def __init__(self, options: OfflineOptions | None = None):
        super().__init__(options)
        if not 0 < self.options.subsample <= 1:
            raise AnnotatorError(f"offline annotator: subsample must be in (0, 1], got {self.options.subsample}")
        self.lexicon = load_lexicon(self.options.lexicon)

    def subsample(self, words: tuple[str, ...], seed: int) -> tuple[str, ...]:
        """The seed's deterministic subset of ``words`` (original order kept)."""
        n_keep = max(1, round(self.options.subsample * len(words)))
        if n_keep >= len(words):
            return words
        rng = np.random.default_rng([seed, zlib.crc32("\x1f".join(words).encode())])
        keep = np.sort(rng.choice(len(words), size=n_keep, replace=False))
        return tuple(words[i] for i in keep)

    def annotate(self, words: tuple[str, ...], seed: int) -> Annotation:
        label = label_words(self.subsample(words, seed), self.lexicon, self.options.min_share,
                            self.options.task_share)
        return Annotation(label.concept, label.tasks, label.level, OK, "", f"rule={label.rule}")


