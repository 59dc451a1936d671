"""head_relations verb statistics (B.6-B.7) against scipy on hand data, and the verb lists."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import ttest_ind

from tuneshift.plugins.head_relations import verbs


def _knowledge(rows):
    return pd.DataFrame(rows, columns=["layer", "head", "word_a", "word_b"])


def test_counts_shares_and_welch_by_hand():
    base = _knowledge([(0, 0, "write", "essay"), (0, 1, "write", "poem"), (9, 0, "run", "fast")])
    tuned = _knowledge([(0, 0, "write", "essay"), (0, 0, "poem", "write"), (0, 1, "code", "run"),
                        (0, 2, "explain", "why"), (9, 0, "run", "fast"), (9, 0, "run", "race")])
    words = ["write", "explain", "run"]
    cb, ct = verbs.word_counts(base, words), verbs.word_counts(tuned, words)
    assert ct.set_index(["layer", "head", "word"])["count"].to_dict() == {
        (0, 0, "write"): 2, (0, 1, "run"): 1, (0, 2, "explain"): 1, (9, 0, "run"): 2}
    shares = verbs.verb_shares(cb, ct, layer_group=8).set_index(["group", "word"])
    # group 0: write differs in head 0 (1 -> 2, up) and head 1 (1 -> 0, down): share 1/2 over 2 heads
    assert shares.loc[(0, "write")].tolist() == [0.5, 2]
    assert shares.loc[(0, "explain")].tolist() == [1.0, 1]
    assert shares.loc[(0, "run")].tolist() == [1.0, 1]  # head 1: 0 -> 1
    assert shares.loc[(1, "run")].tolist() == [1.0, 1]  # layer 9 is group 1
    assert (1, "write") not in shares.index  # never differs there: no r_v (left out, as in the paper)


def test_compare_verb_sets_equals_scipy_welch():
    shares = pd.DataFrame({"group": [0] * 7 + [1] * 3,
                           "word": ["a", "b", "c", "x", "y", "z", "w", "a", "x", "y"],
                           "share": [0.9, 0.7, 0.8, 0.4, 0.5, 0.55, 0.3, 1.0, 0.2, 0.6]})
    stats = verbs.compare_verb_sets(shares, ["a", "b", "c"], ["x", "y", "z", "w"], groups=[0, 1]).set_index(
        ["group", "verb_set"])
    inst, gen = [0.9, 0.7, 0.8], [0.4, 0.5, 0.55, 0.3]
    ref = ttest_ind(inst, gen, equal_var=False)
    row = stats.loc[(0, "instruction")]
    assert row["mean"] == pytest.approx(np.mean(inst)) and row["std"] == pytest.approx(np.std(inst))
    assert row["count"] == 3 and row["p_welch"] == pytest.approx(ref.pvalue)
    assert row["t"] == pytest.approx(ref.statistic)
    assert stats.loc[(0, "general"), "count"] == 4
    assert stats.loc[(0, "general"), "std"] == pytest.approx(np.std(gen))  # population std, as np.std
    assert np.isnan(stats.loc[(1, "instruction"), "p_welch"])  # one instruction verb: no test


def test_verb_lists():
    assert len(verbs.INSTRUCTION_VERBS) == 38 == len(set(verbs.INSTRUCTION_VERBS))
    general = verbs.load_general_verbs()
    assert len(general) == 3000 == len(set(general))
    stop = verbs.load_stop_words()
    assert len(stop) == 179 and "the" in stop
    assert not set(general) & (set(verbs.INSTRUCTION_VERBS) | stop)
    assert general[:3] == ["like", "time", "get"]
    assert verbs.load_general_verbs(n=10) == general[:10]
    with pytest.raises(FileNotFoundError, match="general-verb list"):
        verbs.load_general_verbs("/no/such/verbs.txt")


def test_general_verb_builder_matches_frozen_list(tmp_path):
    pytest.importorskip("wordfreq")
    wordnet = tmp_path / "wn"
    wordnet.mkdir()
    (wordnet / "data.verb").write_text(
        "  1 This software and database is being provided\n"
        '00000001 29 v 02 Run 0 go 0 000 | move fast; "he runs"\n'
        "00000002 29 v 01 breathe 0 000 | draw air\n"  # no usage example: not a general verb
        '00000003 29 v 01 write 0 000 | put down; "write it"\n'  # an instruction verb
        '00000004 29 v 01 have 0 000 | own; "have it"\n'  # a stop word and an instruction verb
        '00000005 29 v 01 walk 0 000 | go on foot; "walk home"\n')
    assert verbs.wordnet_verbs_with_examples(wordnet) == ["run", "write", "have", "walk"]
    built = verbs.build_general_verbs(n=5, wordnet_dir=wordnet)
    assert [v for v, _ in built] == sorted(["run", "walk"], key=lambda v: -dict(built)[v])


@pytest.mark.skipif(not (verbs.Path("/usr/share/wordnet") / "data.verb").is_file(), reason="wordnet-base missing")
def test_frozen_general_verbs_are_reproducible():
    pytest.importorskip("wordfreq")
    assert [v for v, _ in verbs.build_general_verbs(n=3000)] == verbs.load_general_verbs()
