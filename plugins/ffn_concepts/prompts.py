"""Few-shot chat prompts for the three annotation steps of method C, and the parsers of their replies.

The wording and the examples are tuneshift's own (the paper's prompts are not reproduced); the steps are
the paper's: (1) a concept shared by more than half of the words, or "cannot tell"; (2) the assistant tasks
the concept serves (multi-label, or none); (3) the concept's linguistic level.

Each step is a list of chat messages (``{"role", "content"}``): a system message, worked examples as
user/assistant turns, then the query. Every reply starts with a fixed marker (``Concept:``, ``Tasks:``,
``Level:``) so parsing is strict: a reply without its marker is a failure, recorded, never guessed at.
:data:`PROMPT_VERSION` hashes every template, so editing a prompt invalidates cached annotations.
"""
from __future__ import annotations

import hashlib
import json
import re
from typing import Sequence

CANNOT_TELL = "cannot tell"
TASKS = ("daily writing", "literary writing", "professional writing", "solving math problems", "coding",
         "translation")
NO_TASK = "none"
LEVELS = ("phonology", "morphology", "syntax", "semantics")

Message = dict[str, str]


class ParseError(ValueError):
    """A reply does not have the expected form; the message quotes it."""


_CONCEPT_SYSTEM = (
    "You study what a neural network has learned. You are shown a group of words that one internal "
    "direction of the network is most aligned with. Name, in at most five words, one concept that more "
    f"than half of the words share. If no single concept covers more than half of them, say \"{CANNOT_TELL}\". "
    "Answer with one line of the form 'Concept: <concept>'."
)
_CONCEPT_EXAMPLES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("plum", "cherry", "melon", "apricot", "grape", "banana", "lime", "peach", "fig", "pear", "kiwi",
      "mango", "berry", "lemon", "olive"), "fruit"),
    (("walking", "reading", "singing", "cooking", "eating", "jumping", "thinking", "driving", "paint",
      "swimming", "writing", "sleeping", "table", "dancing", "talking"), "verbs in the -ing form"),
    (("def", "return", "import", "lambda", "class", "self", "yield", "print", "elif", "none", "except",
      "raise", "async", "river", "while"), "Python keywords"),
    (("mirror", "tax", "oval", "quietly", "gene", "saddle", "proud", "ninth", "ink", "cost", "fever",
      "jazz", "weld", "alpine", "rum"), CANNOT_TELL),
)

_TASKS_SYSTEM = (
    "You decide which tasks of an AI assistant a concept helps with. The tasks are: "
    + ", ".join(TASKS) + ". Choose every task the concept clearly serves, or 'none' if it serves none. "
    "Answer with one line of the form 'Tasks: <task>, <task>' using the task names exactly."
)
_TASKS_EXAMPLES: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("fruit", ("plum", "cherry", "melon", "apricot", "grape"), "daily writing, literary writing"),
    ("Python keywords", ("def", "return", "import", "lambda", "class"), "coding"),
    ("fractions and ratios", ("half", "third", "quarter", "ratio", "percent"), "solving math problems"),
    ("German function words", ("und", "der", "nicht", "ist", "mit"), "translation"),
    ("contracts and invoices", ("invoice", "clause", "contract", "tenant", "payment"), "professional writing"),
    ("bone names", ("femur", "tibia", "ulna", "sternum", "pelvis"), NO_TASK),
)

_LEVEL_SYSTEM = (
    "You decide at which linguistic level a concept over words operates: phonology (sounds, rhymes, "
    "letter patterns), morphology (how words are built: prefixes, suffixes, inflections), syntax "
    "(grammatical role: function words, word classes, agreement) or semantics (meaning). "
    "Answer with one line of the form 'Level: <level>'."
)
_LEVEL_EXAMPLES: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("fruit", ("plum", "cherry", "melon", "apricot", "grape"), "semantics"),
    ("verbs in the -ing form", ("walking", "reading", "singing", "cooking", "eating"), "morphology"),
    ("words rhyming with -ight", ("night", "light", "fight", "might", "sight"), "phonology"),
    ("prepositions", ("of", "in", "under", "through", "with"), "syntax"),
)


def _word_line(words: Sequence[str]) -> str:
    return "Words: " + ", ".join(words)


def concept_messages(words: Sequence[str]) -> list[Message]:
    """Step 1: name the shared concept or say it cannot be told."""
    msgs: list[Message] = [{"role": "system", "content": _CONCEPT_SYSTEM}]
    for ex_words, concept in _CONCEPT_EXAMPLES:
        msgs += [{"role": "user", "content": _word_line(ex_words)},
                 {"role": "assistant", "content": f"Concept: {concept}"}]
    return msgs + [{"role": "user", "content": _word_line(words)}]


def tasks_messages(words: Sequence[str], concept: str) -> list[Message]:
    """Step 2: the assistant tasks served by ``concept`` (multi-label, or none)."""
    msgs: list[Message] = [{"role": "system", "content": _TASKS_SYSTEM}]
    for ex_concept, ex_words, tasks in _TASKS_EXAMPLES:
        msgs += [{"role": "user", "content": f"Concept: {ex_concept}\n{_word_line(ex_words)}"},
                 {"role": "assistant", "content": f"Tasks: {tasks}"}]
    return msgs + [{"role": "user", "content": f"Concept: {concept}\n{_word_line(words)}"}]


def level_messages(words: Sequence[str], concept: str) -> list[Message]:
    """Step 3: the linguistic level of ``concept``."""
    msgs: list[Message] = [{"role": "system", "content": _LEVEL_SYSTEM}]
    for ex_concept, ex_words, level in _LEVEL_EXAMPLES:
        msgs += [{"role": "user", "content": f"Concept: {ex_concept}\n{_word_line(ex_words)}"},
                 {"role": "assistant", "content": f"Level: {level}"}]
    return msgs + [{"role": "user", "content": f"Concept: {concept}\n{_word_line(words)}"}]


PROMPT_VERSION = hashlib.sha256(json.dumps(
    [concept_messages(["<w>"]), tasks_messages(["<w>"], "<c>"), level_messages(["<w>"], "<c>")]
).encode()).hexdigest()[:16]


def render_plain(messages: Sequence[Message]) -> str:
    """Messages as plain text, for a tokenizer without a chat template (ends with ``Assistant:``)."""
    names = {"system": "System", "user": "User", "assistant": "Assistant"}
    return "\n\n".join(f"{names.get(m['role'], m['role'])}: {m['content']}" for m in messages) + "\n\nAssistant:"


def _after_marker(reply: str, marker: str) -> str:
    match = re.search(rf"{marker}\s*:\s*(.+)", reply, flags=re.IGNORECASE)
    if match is None:
        raise ParseError(f"reply has no '{marker}:' line: {reply[:120]!r}")
    return match.group(1).strip().strip("\"'`*. ")


def parse_concept(reply: str) -> str:
    """``"Concept: fruit"`` -> ``"fruit"``; any mention of cannot tell -> :data:`CANNOT_TELL`."""
    value = _after_marker(reply, "Concept")
    if CANNOT_TELL in value.lower() or "can't tell" in value.lower():
        return CANNOT_TELL
    if not value or len(value) > 80:
        raise ParseError(f"concept must be 1-80 characters, got {value!r}")
    return value


_TASK_STEMS = (("daily", "daily writing"), ("literar", "literary writing"), ("creative", "literary writing"),
               ("professional", "professional writing"), ("math", "solving math problems"),
               ("cod", "coding"), ("programm", "coding"), ("translat", "translation"))


def parse_tasks(reply: str) -> tuple[str, ...]:
    """``"Tasks: coding, translation"`` -> canonical task names in :data:`TASKS` order, or ``("none",)``."""
    value = _after_marker(reply, "Tasks").lower()
    found = {task for stem, task in _TASK_STEMS if stem in value}
    if found:
        return tuple(t for t in TASKS if t in found)
    if re.search(r"\bnone\b", value):
        return (NO_TASK,)
    raise ParseError(f"no known task in {value!r}; expected some of {', '.join(TASKS)} or none")


_LEVEL_STEMS = (("phon", "phonology"), ("sound", "phonology"), ("rhym", "phonology"), ("morph", "morphology"),
                ("affix", "morphology"), ("inflect", "morphology"), ("synta", "syntax"), ("grammar", "syntax"),
                ("semant", "semantics"), ("meaning", "semantics"))


def parse_level(reply: str) -> str:
    """``"Level: syntax"`` -> ``"syntax"`` (the first level named; "grammar", "sound", "meaning"... map too)."""
    value = _after_marker(reply, "Level").lower()
    hits = [(value.find(stem), level) for stem, level in _LEVEL_STEMS if stem in value]
    if not hits:
        raise ParseError(f"no linguistic level in {value!r}; expected one of {', '.join(LEVELS)}")
    return min(hits)[1]
