"""The GPU benchmark's model is really 1B+ (built on the meta device, no weights), and its scripts parse."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_the_random_llama_of_the_gpu_benchmark_has_a_billion_parameters_or_more():
    sys.path.insert(0, str(BENCH))
    try:
        import random_llama
    finally:
        sys.path.remove(str(BENCH))
    assert random_llama.n_parameters("1b") > 1.0e9 and random_llama.n_parameters("7b") > 6.5e9


def test_gpu_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(BENCH / "run_gpu.sh")]).returncode == 0
