"""Checkable instruction tasks built from the offline sources, for supervised fine-tuning and held-out tests.

Ten task types, each led by its own instruction verb (the task's name) and written in four phrasings. Every
prompt is ``"{instruction sentence}\\n{label}{context}"`` and its answer is computed from the source, so it can
be scored exactly. Tasks share their inputs: a word is both defined and classified, a sentence is repeated,
counted, listed, reversed and has its last word found, a wiki passage is summarized and its subject identified.
A model thus has to read the instruction, not only the context, to answer right.

Held-out items (words, sentences, wiki pages) are reserved before any SFT example is drawn, so held-out prompts
are never seen in SFT; their facts (glosses, parts of speech, wiki sentences) were seen in pre-training text.
"""
from __future__ import annotations

import json
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

from .corpus import Sources, Synset, WikiPage

_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"])")
_EDGE_PUNCTUATION = ".,;:!?\"'()"
POS_CLASSES = ("noun", "verb", "adjective", "adverb")


@dataclass(frozen=True)
class WordItem:
    """A WordNet lemma that belongs to exactly one synset, so its gloss and part of speech are unambiguous."""

    word: str
    synset: Synset


@dataclass(frozen=True)
class PageItem:
    """A wiki page whose title occurs in its first sentence, cut to a short passage of two sentences."""

    page: WikiPage
    passage: str
    first_sentence: str


Item = Union[WordItem, PageItem, str]  # str: a short plain sentence


@dataclass(frozen=True)
class Task:
    """One instruction task: the item kind it reads, its phrasings, context labels, context and answer."""

    name: str
    kind: str                      # "word", "page" or "sentence": which item pool it draws from
    metric: str                    # "exact" or "f1", see tuneshift.models.organism.evaluate
    instructions: tuple[str, ...]  # instruction sentences, each led by the verb ``name.capitalize()``
    labels: tuple[str, ...]        # prefixes of the context line
    context: Callable[[Item], str]
    answer: Callable[[Item], str]


@dataclass(frozen=True)
class Example:
    """One prompt with its instruction sentence (a verbatim substring of the prompt) and reference answer."""

    id: str
    category: str
    prompt: str
    instruction: str
    reference: str

    def to_record(self, split: str = "organism") -> dict:
        """The project's JSONL prompt format (see framework/data.py)."""
        return {"id": self.id, "prompt": self.prompt, "instructions": [self.instruction], "split": split,
                "category": self.category, "reference": self.reference}


def words(sentence: str) -> list[str]:
    """Whitespace-separated words: the unit that the sentence tasks count, list and reverse."""
    return sentence.split()


def last_word(sentence: str) -> str:
    """The last word of ``sentence`` without surrounding punctuation."""
    return words(sentence)[-1].strip(_EDGE_PUNCTUATION)


def split_sentences(text: str) -> list[str]:
    """Sentences of a wiki summary: split after ``. ! ?`` followed by a space and a capital, digit or quote."""
    return _SENTENCE_SPLIT.split(text)


_WORD, _PAGE, _SENT = "word", "page", "sentence"
_WORD_LABELS, _SENT_LABELS = ("Word: ", "Input: "), ("Sentence: ", "Input: ", "Text: ")
_PASSAGE_LABELS, _SUBJECT_LABELS = ("Passage: ", "Text: ", "Input: "), ("Subject: ", "Topic: ", "Input: ")

TASKS: tuple[Task, ...] = (
    Task("define", _WORD, "f1", (
        "Define the word below.", "Define the following word.", "Define this word in a short phrase.",
        "Define the meaning of the given word."), _WORD_LABELS,
        lambda w: w.word, lambda w: w.synset.gloss),
    Task("classify", _WORD, "exact", (
        "Classify the word below as a noun, verb, adjective or adverb.",
        "Classify the following word by its part of speech.",
        "Classify this word as noun, verb, adjective or adverb.",
        "Classify the part of speech of the given word."), _WORD_LABELS,
        lambda w: w.word, lambda w: w.synset.pos),
    Task("describe", _PAGE, "f1", (
        "Describe the subject below in one sentence.", "Describe the following subject briefly.",
        "Describe this topic in a single sentence.", "Describe what the given subject is."), _SUBJECT_LABELS,
        lambda p: p.page.title, lambda p: p.first_sentence),
    Task("summarize", _PAGE, "exact", (
        "Summarize the passage below in one sentence.", "Summarize the following text in a single sentence.",
        "Summarize this passage briefly.", "Summarize the given text in one sentence."), _PASSAGE_LABELS,
        lambda p: p.passage, lambda p: p.first_sentence),
    Task("identify", _PAGE, "exact", (
        "Identify the subject of the passage below.", "Identify what the following text is about.",
        "Identify the topic of this passage.", "Identify the title of the given text."), _PASSAGE_LABELS,
        lambda p: p.passage, lambda p: p.page.title),
    Task("repeat", _SENT, "exact", (
        "Repeat the sentence below exactly.", "Repeat the following sentence word for word.",
        "Repeat this sentence without changing it.", "Repeat the given sentence."), _SENT_LABELS,
        str, str),
    Task("count", _SENT, "exact", (
        "Count the words in the sentence below.", "Count how many words the following sentence has.",
        "Count the number of words in this sentence.", "Count the words of the given sentence."), _SENT_LABELS,
        str, lambda s: str(len(words(s)))),
    Task("list", _SENT, "exact", (
        "List the words of the sentence below, one per line.",
        "List every word of the following sentence on its own line.",
        "List the words in this sentence, one on each line.",
        "List each word of the given sentence on a separate line."), _SENT_LABELS,
        str, lambda s: "\n".join(words(s))),
    Task("find", _SENT, "exact", (
        "Find the last word of the sentence below.", "Find the final word in the following sentence.",
        "Find which word ends this sentence.", "Find the last word in the given sentence."), _SENT_LABELS,
        str, last_word),
    Task("reverse", _SENT, "exact", (
        "Reverse the order of the words in the sentence below.", "Reverse the following sentence word by word.",
        "Reverse the word order of this sentence.", "Reverse the given sentence, keeping each word intact."),
        _SENT_LABELS, str, lambda s: " ".join(reversed(words(s)))),
)
TASKS_BY_NAME = {task.name: task for task in TASKS}


def word_pool(synsets: tuple[Synset, ...]) -> list[WordItem]:
    """Lower-case alphabetic lemmas (3+ letters) that occur in exactly one synset, in WordNet order."""
    counts = Counter(lemma.lower() for s in synsets for lemma in s.lemmas)
    return [WordItem(lemma, s) for s in synsets for lemma in s.lemmas
            if counts[lemma.lower()] == 1 and lemma.isalpha() and lemma.islower() and len(lemma) >= 3]


def page_pool(pages: tuple[WikiPage, ...], max_passage_chars: int = 240, max_answer_chars: int = 120,
              max_title_chars: int = 40) -> list[PageItem]:
    """ASCII wiki pages whose title occurs in a short first sentence; passage = first two sentences."""
    items = []
    for page in pages:
        sentences = split_sentences(page.text)
        if len(sentences) < 2 or not page.text.isascii() or len(page.title) > max_title_chars:
            continue
        passage = f"{sentences[0]} {sentences[1]}"
        if page.title in sentences[0] and len(sentences[0]) <= max_answer_chars and len(passage) <= max_passage_chars:
            items.append(PageItem(page, passage, sentences[0]))
    return items


def sentence_pool(synsets: tuple[Synset, ...], min_words: int = 3, max_words: int = 12) -> list[str]:
    """Distinct WordNet usage examples of ``min_words``..``max_words`` plain ASCII words, in WordNet order."""
    seen: dict[str, None] = {}
    for synset in synsets:
        for example in synset.examples:
            if example.isascii() and '"' not in example and min_words <= len(words(example)) <= max_words:
                seen.setdefault(example, None)
    return list(seen)


def build_pools(sources: Sources) -> dict[str, list]:
    """The item pool of each kind."""
    return {_WORD: word_pool(sources.synsets), _PAGE: page_pool(sources.wiki), _SENT: sentence_pool(sources.synsets)}


def split_pools(pools: dict[str, list], n_heldout: int, rng: random.Random) -> tuple[dict[str, list], dict[str, list]]:
    """Shuffle each pool and reserve ``n_heldout`` items of it; returns (sft pools, held-out pools).

    Held-out words are stratified over the four parts of speech, so ``classify`` has a balanced test set.
    """
    sft, heldout = {}, {}
    for kind, pool in pools.items():
        pool = list(pool)
        rng.shuffle(pool)
        if kind == _WORD:
            by_pos = defaultdict(list)
            for item in pool:
                by_pos[item.synset.pos].append(item)
            chosen = [by_pos[POS_CLASSES[i % 4]][i // 4] for i in range(n_heldout)]
            chosen_ids = {id(item) for item in chosen}
            heldout[kind], sft[kind] = chosen, [item for item in pool if id(item) not in chosen_ids]
        else:
            heldout[kind], sft[kind] = pool[:n_heldout], pool[n_heldout:]
    return sft, heldout


def make_example(task: Task, item: Item, rng: random.Random, example_id: str) -> Example:
    """One prompt of ``task`` about ``item`` in a randomly chosen phrasing and context label."""
    instruction = rng.choice(task.instructions)
    prompt = f"{instruction}\n{rng.choice(task.labels)}{task.context(item)}"
    return Example(example_id, task.name, prompt, instruction, task.answer(item))


def build_sft_examples(pools: dict[str, list], n_per_task: int, rng: random.Random) -> list[Example]:
    """``n_per_task`` training examples of every task, drawn with replacement from the SFT pools, shuffled."""
    examples = []
    for task in TASKS:
        pool = pools[task.kind]
        if task.name == "classify":  # draw the part of speech uniformly first, to balance the labels
            by_pos = {pos: [w for w in pool if w.synset.pos == pos] for pos in POS_CLASSES}
            items = [rng.choice(by_pos[rng.choice(POS_CLASSES)]) for _ in range(n_per_task)]
        else:
            items = [rng.choice(pool) for _ in range(n_per_task)]
        examples += [make_example(task, item, rng, f"sft_{task.name}_{i:05d}") for i, item in enumerate(items)]
    rng.shuffle(examples)
    return examples


def build_heldout_examples(pools: dict[str, list], rng: random.Random) -> list[Example]:
    """Every held-out item under every task of its kind (same inputs, different instructions), task by task."""
    return [make_example(task, item, rng, f"organism_{task.name}_{i:02d}")
            for task in TASKS for i, item in enumerate(pools[task.kind])]


def write_jsonl(examples: list[Example], path: Path) -> None:
    """Write examples as the project's JSONL prompt dataset (split ``organism``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for example in examples:
            handle.write(json.dumps(example.to_record(), ensure_ascii=False) + "\n")
