"""Resident memory of the saliency plugin over many prompts (run by tests/test_saliency_memory.py).

    python tests/saliency_memory_probe.py OUT_DIR N_PROMPTS [--no-trim]

Writes ``N_PROMPTS`` prompts of one shape distribution (a fixed instruction, 10-40 context words) to a
JSONL file, runs the saliency plugin on a tiny random Llama through the runner (one thread), and records
the resident set size after every attribution group together with the bytes of live CPU tensors. Prints one
JSON object: ``{"samples": [[prompts_done, rss_mb, live_tensor_mb], ...]}``. ``--no-trim`` disables
:func:`tuneshift.memory.trim_heap` (to see the growth it prevents).
"""
from __future__ import annotations

import gc
import json
import random
import sys
from pathlib import Path

import psutil
import torch

WORDS = "the cat sat on a mat and then it went to see the big red dog near our old house by the sea".split()


def live_tensor_mb() -> float:
    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values()) / 2 ** 20


def main() -> None:
    out, n = Path(sys.argv[1]), int(sys.argv[2])
    if "--no-trim" in sys.argv:
        import tuneshift.attribution as engine

        engine.trim_heap = lambda: False
    import tuneshift.plugins.saliency.plugin as saliency
    from tuneshift.cli import run_config

    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    data = out / "prompts.jsonl"
    instruction = "Summarize the text in one sentence."
    data.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"{instruction} " + " ".join(
        rng.choice(WORDS) for _ in range(rng.randint(10, 40))) + ".", "instructions": [instruction]}) + "\n"
        for i in range(n)))
    proc, samples, attribute = psutil.Process(), [], saliency.attribute

    def sampled(*args, progress=None, **kwargs):
        done = [0]

        def step(k: int) -> None:
            done[0] += k
            samples.append([done[0], proc.memory_info().rss / 2 ** 20, live_tensor_mb()])
            if progress is not None:
                progress(k)
        return attribute(*args, progress=step, **kwargs)

    saliency.attribute = sampled
    run_config({"model": {"name": "m", "models": {"base": {"name": "b", "path": "tiny-random:llama"}}, "pairs": []},
                "data": {"name": "many", "format": "jsonl", "path": str(data)},
                "generation": {"max_new_tokens": 24, "batch_size": 16},
                "run": {"progress": False, "report": False, "threads": 1, "batch_size": 16},
                "plugins": {"saliency": {"html_prompts": 0}}}, out / "run")
    print(json.dumps({"samples": samples}))


if __name__ == "__main__":
    main()
