"""Build ``lexicon.tsv.gz`` (the offline annotator's WordNet digest) from a local WordNet 3.0 database.

Run once by a maintainer (the output ships with tuneshift, so annotation never depends on the machine)::

    python -m tuneshift.plugins.ffn_concepts.resources.build_lexicon /usr/share/wordnet

For each word of the builtin word list (``framework/resources/words_en.tsv``) it writes one line::

    word <TAB> lexname,lexname,... <TAB> hypernym,hypernym,...

- lexnames: WordNet lexicographer files (``noun.food``, ``verb.motion`` ...) of the word's first
  ``SENSES`` senses in each part of speech, parts of speech ordered by tagged-sense count (most used first).
- hypernyms: first lemma of the hypernym synsets, up to ``DEPTH`` levels above the first sense of each part
  of speech (``dog`` -> ``canine``, ``domestic animal``, ``carnivore``, ``animal``).

Inflected forms are reduced to WordNet base forms with the database's exception lists and the standard
detachment rules (WordNet's "morphy"). WordNet 3.0 is (c) Princeton University, under the WordNet licence
(see ``WORDNET_LICENSE``), which allows redistribution with its notice.
"""
from __future__ import annotations

import gzip
import sys
from pathlib import Path

LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive "
    "noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process noun.quantity "
    "noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change verb.cognition "
    "verb.communication verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion "
    "verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()
POS = {"noun": "n", "verb": "v", "adj": "a", "adv": "r"}
RULES = {
    "noun": [("s", ""), ("ses", "s"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"),
             ("men", "man"), ("ies", "y")],
    "verb": [("s", ""), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""), ("ing", "e"), ("ing", "")],
    "adj": [("er", ""), ("est", ""), ("er", "e"), ("est", "e")],
    "adv": [],
}
SENSES = 2
DEPTH = 3


def read_index(wn: Path, pos: str) -> dict[str, tuple[int, list[int]]]:
    """lemma -> (tagged sense count, synset offsets in sense order)."""
    out = {}
    for line in (wn / f"index.{pos}").read_text(encoding="latin-1").splitlines():
        if line.startswith(" "):
            continue
        f = line.split()
        n_syn, n_ptr = int(f[2]), int(f[3])
        tagged = int(f[5 + n_ptr])
        out[f[0]] = (tagged, [int(x) for x in f[6 + n_ptr:6 + n_ptr + n_syn]])
    return out


def read_data(wn: Path, pos: str) -> dict[int, tuple[str, str, list[int]]]:
    """synset offset -> (lexname, first lemma, hypernym offsets of the same part of speech)."""
    out = {}
    for line in (wn / f"data.{pos}").read_text(encoding="latin-1").splitlines():
        if line.startswith(" "):
            continue
        f = line.split(" | ")[0].split()
        offset, lexnum, n_words = int(f[0]), int(f[1]), int(f[3], 16)
        lemma = f[4].split("(")[0].replace("_", " ").lower()
        i = 4 + 2 * n_words
        n_ptr = int(f[i])
        hyps = [int(f[i + 1 + 4 * k + 1]) for k in range(n_ptr)
                if f[i + 1 + 4 * k] in ("@", "@i") and f[i + 1 + 4 * k + 2] == POS[pos][0]]
        out[offset] = (LEXNAMES[lexnum], lemma, hyps)
    return out


def base_forms(word: str, pos: str, index: dict, exc: dict) -> list[str]:
    forms = [word] if word in index else []
    forms += [b for b in exc.get(word, []) if b in index]
    for suffix, repl in RULES[pos]:
        if word.endswith(suffix) and len(word) > len(suffix) + 1:
            cand = word[: len(word) - len(suffix)] + repl
            if cand in index and cand not in forms:
                forms.append(cand)
    return forms


def build(wn: Path, words: list[str]) -> list[str]:
    indexes = {p: read_index(wn, p) for p in POS}
    datas = {p: read_data(wn, p) for p in POS}
    excs = {}
    for p in POS:
        exc: dict[str, list[str]] = {}
        for line in (wn / f"{p}.exc").read_text(encoding="latin-1").splitlines():
            f = line.split()
            exc.setdefault(f[0], []).extend(f[1:])
        excs[p] = exc
    lines = []
    for word in words:
        per_pos = []
        for p in POS:
            for form in base_forms(word, p, indexes[p], excs[p])[:1]:
                tagged, offsets = indexes[p][form]
                per_pos.append((tagged, p, offsets))
        per_pos.sort(key=lambda t: -t[0])
        lexnames: list[str] = []
        hypernyms: list[str] = []
        for _, p, offsets in per_pos:
            data = datas[p]
            for off in offsets[:SENSES]:
                if data[off][0] not in lexnames:
                    lexnames.append(data[off][0])
            frontier = [offsets[0]]
            for _ in range(DEPTH):
                frontier = [h for off in frontier for h in data[off][2]]
                for off in frontier:
                    if data[off][1] not in hypernyms:
                        hypernyms.append(data[off][1])
        if lexnames:
            lines.append(f"{word}\t{','.join(lexnames)}\t{','.join(hypernyms)}")
    return lines


def main(wordnet_dir: str = "/usr/share/wordnet") -> None:
    root = Path(__file__).resolve().parents[3]
    words = [ln.split("\t")[0] for ln in (root / "framework/resources/words_en.tsv").read_text().splitlines() if ln]
    lines = build(Path(wordnet_dir), words)
    out = Path(__file__).with_name("lexicon.tsv.gz")
    with gzip.GzipFile(out, "wb", mtime=0) as handle:  # mtime=0: byte-identical rebuilds
        handle.write(("\n".join(lines) + "\n").encode())
    print(f"{len(lines)} of {len(words)} words -> {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main(*sys.argv[1:])
