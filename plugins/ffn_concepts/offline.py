"""The rule engine of the offline annotator: the three annotation steps from shipped word lists alone.

Deterministic, instant, no model. Its rules, in order (``share`` = fraction of the words that fit)::

    step 1, concept (first rule whose share >= min_share, default 0.5; else "cannot tell"):
        a task word list        -> the task name, e.g. "coding"            (resources/task_*.txt)
        English function words  -> "function words"                        (resources/function_words.txt)
        a shared affix          -> "words with suffix -ing"                (resources/affixes.txt)
        a WordNet hypernym      -> "kinds of <hypernym>"                   (resources/lexicon.tsv.gz)
        a WordNet lexname       -> "<lexname>", e.g. "noun.food"
        a shared ending/onset   -> "words ending in -ight" / "words starting with st-" (not a listed affix)
    step 2, tasks: every task whose list holds >= task_share of the words (default 0.2), plus the named
        task, plus the tasks of the words' common lexname when one fits (resources/lexname_tasks.tsv);
        "none" if no task.
    step 3, level: syntax (function words), morphology (affix), phonology (ending/onset), else semantics.

Words are matched lower-cased. Words unknown to every list simply do not fit, so a word list other than
the builtin one (e.g. the tokenizer's) gets more "cannot tell".
"""
from __future__ import annotations

import functools
import gzip
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tuneshift.plugins.ffn_concepts.prompts import CANNOT_TELL, NO_TASK, TASKS

RESOURCES = Path(__file__).parent / "resources"


def _read_list(path: Path) -> frozenset[str]:
    return frozenset(line.strip().lower() for line in path.read_text(encoding="utf-8").splitlines()
                     if line.strip() and not line.startswith("#"))


@dataclass(frozen=True)
class Lexicon:
    """Everything the rules read, loaded once."""

    task_words: dict[str, frozenset[str]]  # task name -> words
    function_words: frozenset[str]
    suffixes: tuple[str, ...]  # longest first
    prefixes: tuple[str, ...]
    lexnames: dict[str, tuple[str, ...]]  # word -> WordNet lexnames
    hypernyms: dict[str, tuple[str, ...]]  # word -> WordNet hypernym lemmas
    lexname_tasks: dict[str, tuple[str, ...]]


@functools.lru_cache(maxsize=4)
def load_lexicon(path: str = "") -> Lexicon:
    """Load the shipped resources; ``path`` replaces ``lexicon.tsv.gz`` (same ``word<TAB>lexnames<TAB>hypernyms``)."""
    task_words = {task: _read_list(RESOURCES / f"task_{task.replace(' ', '_')}.txt") for task in TASKS}
    affixes = [line.split() for line in (RESOURCES / "affixes.txt").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    suffixes = tuple(sorted((a for kind, a in affixes if kind == "suffix"), key=len, reverse=True))
    prefixes = tuple(sorted((a for kind, a in affixes if kind == "prefix"), key=len, reverse=True))
    lex_path = Path(path).expanduser() if path else RESOURCES / "lexicon.tsv.gz"
    if not lex_path.is_file():
        raise FileNotFoundError(f"offline annotator lexicon {str(lex_path)!r} does not exist")
    opener = gzip.open if lex_path.suffix == ".gz" else open
    lexnames, hypernyms = {}, {}
    with opener(lex_path, "rt", encoding="utf-8") as handle:
        for line in handle:
            parts = line.rstrip("\n").split("\t")
            if len(parts) >= 2 and parts[1]:
                lexnames[parts[0]] = tuple(parts[1].split(","))
                hypernyms[parts[0]] = tuple(h for h in (parts[2].split(",") if len(parts) > 2 else []) if h)
    lexname_tasks = {}
    for line in (RESOURCES / "lexname_tasks.tsv").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, tasks = line.split("\t")
            lexname_tasks[name] = tuple(t.strip() for t in tasks.split(";"))
    return Lexicon(task_words, _read_list(RESOURCES / "function_words.txt"), suffixes, prefixes, lexnames,
                   hypernyms, lexname_tasks)


@dataclass(frozen=True)
class OfflineLabel:
    """The three steps' answers for one word set."""

    concept: str
    tasks: tuple[str, ...]
    level: str
    rule: str  # which rule named the concept (for audit)


def _best(counter: Counter, n: int, longest: bool = False) -> tuple[str, float]:
    """Most common key and its share of ``n``; ties go to the longest key if ``longest``, then alphabetical."""
    if not counter:
        return "", 0.0
    key, count = min(counter.items(), key=lambda kv: (-kv[1], -len(kv[0]) if longest else 0, kv[0]))
    return key, count / n


def _affix(words: Sequence[str], lex: Lexicon) -> tuple[str, float]:
    """The listed affix shared by most words (each word counts once per affix; stem >= 3 letters)."""
    counts: Counter = Counter()
    for w in words:
        counts.update({f"suffix -{a}" for a in lex.suffixes if w.endswith(a) and len(w) - len(a) >= 3})
        counts.update({f"prefix {a}-" for a in lex.prefixes if w.startswith(a) and len(w) - len(a) >= 3})
    return _best(counts, len(words), longest=True)


def _sound(words: Sequence[str], lex: Lexicon) -> tuple[str, float]:
    """A shared ending (rhyme, >= 3 letters) or onset (>= 2 letters) that is not a listed affix."""
    counts: Counter = Counter()
    affix_ends, affix_starts = set(lex.suffixes), set(lex.prefixes)
    for w in words:
        counts.update({f"ending in -{w[-k:]}" for k in (3, 4) if len(w) > k and w[-k:] not in affix_ends})
        counts.update({f"starting with {w[:k]}-" for k in (2, 3) if len(w) > k + 1 and w[:k] not in affix_starts})
    return _best(counts, len(words), longest=True)


def label_words(words: Sequence[str], lex: Lexicon, min_share: float = 0.5, task_share: float = 0.2) -> OfflineLabel:
    """Apply the three steps' rules (module docstring) to ``words``."""
    words = [w.strip().lower() for w in words if w.strip()]
    if not words:
        return OfflineLabel(CANNOT_TELL, (), "", "empty")
    n = len(words)
    task_hits = {t: sum(w in ws for w in words) / n for t, ws in lex.task_words.items()}
    tasks = [t for t in TASKS if task_hits[t] >= task_share]
    best_task = max(TASKS, key=lambda t: task_hits[t])
    func_share = sum(w in lex.function_words for w in words) / n
    affix, affix_share = _affix(words, lex)
    hyper, hyper_share = _best(Counter(h for w in words for h in set(lex.hypernyms.get(w, ()))), n)
    lexname, lexname_share = _best(Counter(x for w in words for x in set(lex.lexnames.get(w, ()))), n)
    sound, sound_share = _sound(words, lex)

    if task_hits[best_task] >= min_share:
        concept, level, rule = best_task, "semantics", "task"
        tasks = sorted(set(tasks) | {best_task}, key=TASKS.index)
    elif func_share >= min_share:
        concept, level, rule = "function words", "syntax", "function_words"
    elif affix_share >= min_share:
        concept, level, rule = f"words with {affix}", "morphology", "affix"
    elif hyper_share >= min_share or lexname_share >= min_share:
        if hyper_share >= min_share:
            concept, level, rule = f"kinds of {hyper}", "semantics", "hypernym"
        else:
            concept, level, rule = lexname, "semantics", "lexname"
        if lexname_share >= min_share:  # the words' lexicographer file says which tasks they serve
            tasks = sorted(set(tasks) | set(lex.lexname_tasks.get(lexname, ())), key=TASKS.index)
    elif sound_share >= min_share:
        concept, level, rule = f"words {sound}", "phonology", "sound"
    else:
        return OfflineLabel(CANNOT_TELL, (), "", "none")
    return OfflineLabel(concept, tuple(tasks) or (NO_TASK,), level, rule)
