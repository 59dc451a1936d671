"""Scorers: how an answer to a prompt with a ``reference`` is scored (exact match, token F1, per-task metrics,
the log-probability of the reference).

What it is for
    A causal test asks "how much does the task score drop with X ablated". The scorer says what the task score
    is. Text scorers score a generated answer against ``Prompt.reference``; the ``logprob`` scorer is
    teacher-forced (the mean log-probability of the reference tokens and the stop token given the prompt),
    computed by :mod:`tuneshift.evaluation`. Scorers are found by id in :data:`SCORERS`.

Ids::

    exact      1.0 if the answer equals the reference after stripping the text and each of its lines (case,
               punctuation and line breaks count: a ``list`` answer is not a ``repeat`` answer)
    f1         SQuAD token F1 (lower case, punctuation removed, bag of words)
    organism   the model organism's held-out task score: ``f1`` for the recall tasks ``define`` and
               ``describe``, ``exact`` for the other eight (``Prompt.category`` is the task); the organism's
               recipe (``tuneshift.models.organism.evaluate``) scores with these same functions
    logprob    mean log p(reference tokens + stop token | prompt), teacher-forced

Canonical pattern::

    from tuneshift.scoring import SCORERS, TaskScorer
    SCORERS.get("organism").score("3", "3", "count")        # 1.0
    SCORERS.register("mine", TaskScorer("mine", {"poem": "f1"}, default="exact"))
"""
from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Mapping

from tuneshift.registry import Registry

_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_lines(text: str) -> str:
    """Strip the text and each of its lines; drop empty lines."""
    return "\n".join(line.strip() for line in text.strip().splitlines() if line.strip())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 if the answer equals the reference up to surrounding white space of the text and its lines."""
    return float(normalize_lines(prediction) == normalize_lines(reference))


def f1_tokens(text: str) -> list[str]:
    """Lower-cased words with punctuation removed."""
    return _PUNCTUATION.sub(" ", text.lower()).split()


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of word precision and recall over the bags of words (1.0 if both are empty)."""
    pred, ref = f1_tokens(prediction), f1_tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    overlap = sum((Counter(pred) & Counter(ref)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


METRICS: dict[str, Callable[[str, str], float]] = {"exact": exact_match, "f1": token_f1}


@dataclass(frozen=True)
class Scorer:
    """A scorer id. ``kind="text"`` scores generated answers (:meth:`score`); ``kind="logprob"`` is teacher-forced."""

    name: str
    kind: str = "text"
    description: str = ""

    def score(self, prediction: str, reference: str, category: str = "") -> float:
        raise NotImplementedError(f"scorer {self.name!r} ({self.kind}) does not score text")


@dataclass(frozen=True)
class TextScorer(Scorer):
    """One metric (``exact`` or ``f1``) for every prompt."""

    metric: str = "exact"

    def score(self, prediction: str, reference: str, category: str = "") -> float:
        return METRICS[self.metric](prediction, reference)


@dataclass(frozen=True)
class TaskScorer(Scorer):
    """A metric per task (``Prompt.category``), ``default`` for the others."""

    metrics: Mapping[str, str] = field(default_factory=dict)
    default: str = "exact"

    def metric_of(self, category: str) -> str:
        return self.metrics.get(category, self.default)

    def score(self, prediction: str, reference: str, category: str = "") -> float:
        return METRICS[self.metric_of(category)](prediction, reference)


SCORERS: Registry[Scorer] = Registry(
    "scorer", group="tuneshift.scorers",
    how_to_add="Register one with tuneshift.scoring.SCORERS.register('mine', TaskScorer('mine', {...})) or a "
               "Scorer subclass whose score(prediction, reference, category) returns a float.")
SCORERS.register("exact", TextScorer("exact", metric="exact", description="exact match after stripping lines"))
SCORERS.register("f1", TextScorer("f1", metric="f1", description="SQuAD token F1"))
ORGANISM_METRICS = {"define": "f1", "describe": "f1"}  # the recall tasks; the other eight are exact match
SCORERS.register("organism", TaskScorer("organism", metrics=ORGANISM_METRICS, default="exact",
                                        description="the model organism's held-out task score"))
SCORERS.register("logprob", Scorer("logprob", kind="logprob",
                                   description="mean log-probability of the reference and stop token"))


__all__ = ["METRICS", "ORGANISM_METRICS", "SCORERS", "Scorer", "TaskScorer", "TextScorer", "exact_match",
           "f1_tokens", "normalize_lines", "token_f1"]
