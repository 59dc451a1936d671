"""Instruction verbs vs general verbs in the heads' knowledge (method B.6-B.7).

What it is for
    After instruction tuning, do more heads know word pairs with *instruction verbs* (write, explain,
    summarize ...) than with ordinary verbs? For a verb v and head h, ``c_h(v)`` counts the pairs of the
    head's knowledge P_h that contain v. Per group of layers (8 by default), ``r_v`` is the share of heads,
    among those where ``c_h(v)`` differs between base and tuned, where the tuned count is larger; verbs whose
    count never differs in the group have no ``r_v`` and are left out (as in the paper's code). Instruction
    and general verbs are then compared by mean, std (population, ``ddof=0``), count and Welch's two-sided
    t-test.

General verbs
    WordNet verbs with at least one usage example, first lemma lower-cased, English stop words and the
    instruction verbs removed, the 3,000 most frequent by ``wordfreq`` (ties by the word). A frozen list ships
    in ``resources/general_verbs.tsv``; rebuild it (needs ``wordfreq`` and Debian ``wordnet-base``) with::

        python -m tuneshift.plugins.head_relations.verbs --build [--wordnet-dir /usr/share/wordnet] [--n 3000]
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

RESOURCES = Path(__file__).parent / "resources"
GENERAL_VERBS_PATH = RESOURCES / "general_verbs.tsv"
STOP_WORDS_PATH = RESOURCES / "stopwords_en.txt"

INSTRUCTION_VERBS: tuple[str, ...] = (
    "act", "analyze", "clarify", "classify", "compose", "correct", "create", "demonstrate", "describe", "design",
    "detect", "develop", "edit", "estimate", "evaluate", "explain", "find", "follow", "format", "generate",
    "give", "have", "help", "identify", "interpret", "make", "output", "predict", "recommend", "repeat",
    "retrieve", "revise", "say", "solve", "summarize", "tell", "translate", "write",
)

_QUOTED = re.compile(r'"([^"]*)"')


# ---- word lists -----------------------------------------------------------------------------------------------
def load_stop_words() -> frozenset[str]:
    """The English stop words (NLTK's 179-word list, frozen in ``resources/stopwords_en.txt``)."""
    lines = STOP_WORDS_PATH.read_text(encoding="utf-8").splitlines()
    return frozenset(line.strip() for line in lines if line.strip() and not line.startswith("#"))


def wordnet_verbs_with_examples(wordnet_dir: str | Path = "/usr/share/wordnet") -> list[str]:
    """First lemma (lower-cased, underscores kept as WordNet writes them) of each verb synset with a usage
    example (a double-quoted sentence in the gloss), in file order, duplicates kept."""
    path = Path(wordnet_dir) / "data.verb"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: apt-get install wordnet-base, or pass --wordnet-dir")
    lemmas = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.startswith(" ") or "|" not in line:  # licence header
                continue
            head, gloss = line.split("|", 1)
            if _QUOTED.search(gloss):
                lemmas.append(head.split()[4].lower())
    return lemmas


def build_general_verbs(n: int = 3000, wordnet_dir: str | Path = "/usr/share/wordnet",
                        exclude: Iterable[str] = INSTRUCTION_VERBS) -> list[tuple[str, float]]:
    """The ``n`` most frequent general verbs with their ``wordfreq`` frequency (ties broken by the word)."""
    from wordfreq import word_frequency

    excluded = set(exclude) | load_stop_words()
    verbs = sorted(set(wordnet_verbs_with_examples(wordnet_dir)) - excluded)
    scored = [(v, word_frequency(v, "en")) for v in verbs]
    scored.sort(key=lambda vf: (-vf[1], vf[0]))
    return scored[:n]


def load_general_verbs(source: str = "builtin", n: int | None = None) -> list[str]:
    """General verbs, most frequent first: ``builtin`` (the frozen list) or a ``verb[<TAB>freq]`` file."""
    path = GENERAL_VERBS_PATH if source == "builtin" else Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"general-verb list {str(path)!r} does not exist; use 'builtin' or a file with "
                                "one verb per line")
    verbs = [line.split("\t")[0].strip() for line in path.read_text(encoding="utf-8").splitlines()
             if line.strip() and not line.startswith("#")]
    return verbs[:n] if n else verbs


# ---- statistics -----------------------------------------------------------------------------------------------
def word_counts(knowledge: pd.DataFrame, words: Iterable[str]) -> pd.DataFrame:
    """``c_h(v)``: rows ``layer, head, word, count`` for each head and each of ``words`` in some pair of its
    knowledge (columns ``layer, head, word_a, word_b``, one row per pair). Absent rows mean a count of 0."""
    wanted = set(words)
    ends = pd.concat([knowledge[["layer", "head", "word_a"]].rename(columns={"word_a": "word"}),
                      knowledge[["layer", "head", "word_b"]].rename(columns={"word_b": "word"})])
    ends = ends[ends["word"].isin(wanted)]
    return ends.groupby(["layer", "head", "word"]).size().rename("count").reset_index()


def verb_shares(base_counts: pd.DataFrame, tuned_counts: pd.DataFrame, layer_group: int = 8) -> pd.DataFrame:
    """``r_v`` per (group, verb): rows ``group, word, share, n_heads`` where ``n_heads`` is the number of heads
    of the group whose count differs between base and tuned and ``share`` the fraction with tuned > base."""
    merged = pd.merge(base_counts, tuned_counts, on=["layer", "head", "word"], how="outer",
                      suffixes=("_base", "_tuned")).fillna({"count_base": 0, "count_tuned": 0})
    merged = merged[merged["count_base"] != merged["count_tuned"]]
    merged = merged.assign(group=merged["layer"] // layer_group,
                           up=(merged["count_tuned"] > merged["count_base"]).astype(float))
    out = merged.groupby(["group", "word"])["up"].agg(share="mean", n_heads="size").reset_index()
    return out.astype({"group": int, "n_heads": int})


def compare_verb_sets(shares: pd.DataFrame, instruction: Sequence[str], general: Sequence[str],
                      groups: Iterable[int]) -> pd.DataFrame:
    """Per group: mean, std (ddof=0), count of ``r_v`` over instruction and over general verbs, and Welch's
    two-sided p-value (NaN when a side has fewer than 2 verbs). One row per (group, verb_set)."""
    from scipy.stats import ttest_ind

    rows = []
    for group in groups:
        in_group = shares[shares["group"] == group]
        sides = {name: in_group.loc[in_group["word"].isin(set(verbs)), "share"].to_numpy(float)
                 for name, verbs in (("instruction", instruction), ("general", general))}
        a, b = sides["instruction"], sides["general"]
        if len(a) >= 2 and len(b) >= 2:
            test = ttest_ind(a, b, equal_var=False)
            t_stat, p_value = float(test.statistic), float(test.pvalue)
        else:
            t_stat = p_value = float("nan")
        for name, values in sides.items():
            rows.append({"group": int(group), "verb_set": name, "mean": float(np.mean(values)) if len(values) else
                         float("nan"), "std": float(np.std(values)) if len(values) else float("nan"),
                         "count": int(len(values)), "t": t_stat, "p_welch": p_value})
    return pd.DataFrame(rows, columns=["group", "verb_set", "mean", "std", "count", "t", "p_welch"])


def _main() -> None:
    parser = argparse.ArgumentParser(description="Build the frozen general-verb list of method B.6.")
    parser.add_argument("--build", action="store_true", help="write resources/general_verbs.tsv")
    parser.add_argument("--wordnet-dir", default="/usr/share/wordnet")
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--out", default=str(GENERAL_VERBS_PATH))
    args = parser.parse_args()
    if not args.build:
        parser.error("nothing to do: pass --build")
    verbs = build_general_verbs(args.n, args.wordnet_dir)
    header = ("# General verbs (method B.6): WordNet verbs with a usage example, first lemma lower-cased, stop "
              "words and the 38 instruction verbs removed,\n# the most frequent by wordfreq (ties by word). "
              "Built by: python -m tuneshift.plugins.head_relations.verbs --build\n")
    Path(args.out).write_text(header + "".join(f"{v}\t{f:.3e}\n" for v, f in verbs), encoding="utf-8")
    print(f"wrote {len(verbs)} verbs to {args.out}")


if __name__ == "__main__":
    _main()
