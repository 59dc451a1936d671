"""How good are the offline ``ppmi`` word vectors of method B? (No GloVe file exists offline to compare with.)

Measures, for the default vectors (wiki + fortunes + WordNet glosses) and for vectors built without the
WordNet glosses (so that the WordNet-based checks are not circular):

- coverage: the share of a word list that has a vector (words without one never pass the filter);
- WordNet synonyms (two single-word lemmas of one synset) and hypernyms (a noun's first lemma and its
  hypernym's): ROC AUC of their cosine against random word pairs, and the share of each kind of pair that
  passes the co-occurrence filter ``sim > tau(a), sim > tau(c)`` with tau over the 3,000 most frequent words;
- nearest neighbours of sample words.

    python benchmarks/eval_head_relations_similarity.py [--words builtin|PATH] [--pairs 3000]

Builds (and caches under ~/.cache/tuneshift) each set of vectors on first use, ~30-60 s each.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import torch

from tuneshift.words import load_word_list
from tuneshift.plugins.head_relations.similarity import make_backend, thresholds

WORDNET = Path("/usr/share/wordnet")
SAMPLE_WORDS = ("write", "explain", "summarize", "translate", "code", "king", "river", "happy", "music", "doctor")


def wordnet_pairs() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(synonym pairs, hypernym pairs) of single-word lower-case lemmas."""
    synonyms, hypernyms, first = [], [], {}
    lines = {}
    for pos in ("noun", "verb", "adj", "adv"):
        for line in (WORDNET / f"data.{pos}").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith(" ") or "|" not in line:
                continue
            fields = line.split("|", 1)[0].split()
            n = int(fields[3], 16)
            lemmas = [re.sub(r"\(.*\)$", "", w).lower() for w in fields[4:4 + 2 * n:2]]
            lemmas = [w for w in lemmas if re.fullmatch(r"[a-z]+", w)]
            first[(pos, fields[0])] = lemmas[0] if lemmas else None
            lines[(pos, fields[0])] = fields
            synonyms += [(a, b) for i, a in enumerate(lemmas) for b in lemmas[i + 1:] if a != b]
    for (pos, offset), fields in lines.items():
        if pos != "noun" or first[(pos, offset)] is None:
            continue
        n = int(fields[3], 16)
        p_cnt = int(fields[4 + 2 * n])
        ptrs = fields[5 + 2 * n:5 + 2 * n + 4 * p_cnt]
        for sym, target, tpos in zip(ptrs[::4], ptrs[1::4], ptrs[2::4]):
            if sym == "@" and tpos == "n" and first.get(("noun", target)):
                hypernyms.append((first[(pos, offset)], first[("noun", target)]))
    return synonyms, hypernyms


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(a positive pair scores above a negative one), ties counted half (Mann-Whitney)."""
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([pos, neg]))
    return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def evaluate(label: str, backend, words: tuple[str, ...], n_pairs: int, rng: np.random.Generator) -> None:
    vecs = backend.lookup(words)
    v = torch.from_numpy(vecs.vectors).double()
    tau = thresholds(v, torch.from_numpy(vecs.present), 3000, 1.96).numpy()
    index = {w: i for i, w in enumerate(words)}
    known = np.flatnonzero(vecs.present)
    print(f"\n== {label}: {vecs.present.mean():.1%} of {len(words)} words have a vector "
          f"(top 3,000: {vecs.present[:3000].mean():.1%}, top 10,000: {vecs.present[:10000].mean():.1%})")
    synonyms, hypernyms = wordnet_pairs()
    rand = np.stack([rng.choice(known, n_pairs), rng.choice(known, n_pairs)], 1)
    rand = rand[rand[:, 0] != rand[:, 1]]
    sims_rand = (vecs.vectors[rand[:, 0]] * vecs.vectors[rand[:, 1]]).sum(1)
    pass_rand = np.mean((sims_rand > tau[rand[:, 0]]) & (sims_rand > tau[rand[:, 1]]))
    print(f"{'pairs':<28}{'n':>7}{'mean cos':>10}{'AUC vs random':>15}{'pass filter':>13}")
    print(f"{'random':<28}{len(rand):>7}{sims_rand.mean():>10.3f}{'0.5':>15}{pass_rand:>13.1%}")
    for name, pairs in (("WordNet synonyms", synonyms), ("WordNet noun->hypernym", hypernyms)):
        ids = np.array([(index[a], index[b]) for a, b in set(pairs) if a in index and b in index], dtype=np.int64)
        ids = ids[vecs.present[ids[:, 0]] & vecs.present[ids[:, 1]]]
        if len(ids) > n_pairs:
            ids = ids[rng.choice(len(ids), n_pairs, replace=False)]
        sims = (vecs.vectors[ids[:, 0]] * vecs.vectors[ids[:, 1]]).sum(1)
        passed = np.mean((sims > tau[ids[:, 0]]) & (sims > tau[ids[:, 1]]))
        print(f"{name:<28}{len(ids):>7}{sims.mean():>10.3f}{auc(sims, sims_rand):>15.3f}{passed:>13.1%}")
    print("nearest neighbours (among the word list):")
    for word in SAMPLE_WORDS:
        if word in index and vecs.present[index[word]]:
            sims = vecs.vectors @ vecs.vectors[index[word]]
            best = [words[i] for i in np.argsort(-sims)[1:9]]
            print(f"  {word:<10} {', '.join(best)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--words", default="builtin")
    parser.add_argument("--pairs", type=int, default=3000)
    args = parser.parse_args()
    words = load_word_list(args.words).words
    rng = np.random.default_rng(0)
    evaluate("ppmi, default corpus (wiki + fortunes + WordNet glosses)", make_backend("ppmi"), words, args.pairs,
             rng)
    evaluate("ppmi without WordNet glosses (wiki + fortunes): the WordNet checks are not circular",
             make_backend("ppmi", sources=["wiki", "fortunes"]), words, args.pairs, rng)


if __name__ == "__main__":
    main()
