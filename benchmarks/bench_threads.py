"""Torch CPU threads: greedy generation of one batch, on a quiet machine and beside a CPU-bound process.

What it measures: seconds per batch (median of ``--repeats``) of ``generate_responses`` (the runner's own
generation) for each thread count in ``--threads`` (default: 1, tuneshift's default ``run.threads=0`` =
half the cores, and every core), first alone, then with ``--competitors`` busy processes (one spinning
core each, like a second job on a shared machine). Each line gives the ratio to one thread in the same
condition, measured in the same run.

    python benchmarks/bench_threads.py --model models/tiny-pair/instruct --prompts 8 --new-tokens 32
    python benchmarks/bench_threads.py --competitors 0 1 2 --threads 1 2 4 8

Why: intra-op threads spin-wait for each other on every small op, so one thread descheduled by a competing
process stalls all the others; on the project's 2-core machine the issue measured 29 s per batch with
default threading against 0.27 s with one thread.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from benchutil import machine_line, tiny_pair_or_random  # noqa: E402
from tuneshift.data import load_prompts, encode_prompt  # noqa: E402
from tuneshift.generation import generate_responses  # noqa: E402
from tuneshift.loading import ModelSpec, load_model  # noqa: E402
from tuneshift.runner import ModelRun, default_threads  # noqa: E402
from tuneshift.adapters import ModelAdapter  # noqa: E402


def _spin(stop) -> None:  # a CPU-bound competitor: one core, busy until told to stop
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x += 1


def _time_batch(run: ModelRun, new_tokens: int, repeats: int, budget_s: float) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        generate_responses(run, new_tokens, len(run.encoded), progress=False)
        times.append(time.perf_counter() - started)
        if sum(times) > budget_s:  # a pathological setting: enough evidence after one slow batch
            break
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=tiny_pair_or_random())
    parser.add_argument("--prompts", type=int, default=8, help="prompts in the batch")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, nargs="+", default=None)
    parser.add_argument("--competitors", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=120.0, help="stop repeating a setting after this long")
    args = parser.parse_args()
    threads = args.threads or sorted({1, default_threads(), os.cpu_count() or 1})

    model, tokenizer = load_model(ModelSpec(path=args.model))
    prompts = load_prompts("builtin")[: args.prompts]
    run = ModelRun("m", args.model, ModelSpec(path=args.model), model, tokenizer, ModelAdapter(model), False,
                   [encode_prompt(tokenizer, p) for p in prompts])
    print(machine_line("cpu"))
    print(f"model {args.model}; {args.prompts} prompts x {args.new_tokens} new tokens per batch; "
          f"tuneshift default threads (run.threads=0): {default_threads()}\n")
    print(f"{'competitors':>11} {'threads':>7} {'s/batch':>9} {'vs 1 thread':>12}")
    for n_comp in args.competitors:
        stop = mp.Event()
        procs = [mp.Process(target=_spin, args=(stop,), daemon=True) for _ in range(n_comp)]
        for p in procs:
            p.start()
        try:
            one = None
            for n in threads:
                torch.set_num_threads(n)
                _time_batch(run, 2, 1, args.budget_s)  # warm-up at this thread count
                seconds = _time_batch(run, args.new_tokens, args.repeats, args.budget_s)
                one = seconds if n == 1 else one
                ratio = f"{seconds / one:11.2f}x" if one else f"{'':>12}"
                note = "  <- default" if n == default_threads() else ""
                print(f"{n_comp:>11} {n:>7} {seconds:>9.3f} {ratio}{note}", flush=True)
        finally:
            stop.set()
            for p in procs:
                p.join(timeout=5)


if __name__ == "__main__":
    main()
