"""Resident memory stays flat while the saliency plugin works through many prompts.

Before :mod:`tuneshift.memory`, memory freed by each attribution pass stayed in the C heap: 320 prompts of
one shape distribution took resident memory from 554 to 662 MB (1,200 prompts: 578 -> 1,220 MB) while the
live tensors grew by 2 MB. The probe runs in its own process (``tests/saliency_memory_probe.py``), so
nothing else this test session allocated is counted.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = Path(__file__).with_name("saliency_memory_probe.py")


@pytest.mark.slow  # 400 prompts, about 45 s
def test_resident_memory_is_flat_after_warm_up(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TUNESHIFT_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, str(PROBE), str(tmp_path), "400"], env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    samples = json.loads(done.stdout.strip().splitlines()[-1])["samples"]  # [prompts done, rss MB, tensors MB]
    assert samples[-1][0] == 400
    warm = [s for s in samples if s[0] <= 100]
    after = [s for s in samples if s[0] > 100]
    base = warm[-1][1]
    peak = max(s[1] for s in after)
    kept = samples[-1][2] - warm[-1][2]  # what the plugin legitimately holds on to (its results)
    assert peak <= 1.10 * base, f"resident memory grew {base:.0f} -> {peak:.0f} MB (results kept: {kept:.1f} MB)"
