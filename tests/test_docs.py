"""The guides run verbatim: every code block of docs/api.md and docs/plugins.md is executed here.

A Python block whose first line is ``# name.py`` is written as that module; ``# file: test_x.py`` is written
and run with pytest (the PluginTestSuite example); any other Python block runs as a script, in order, in one
folder; ``bash`` blocks run in a shell there. nnsight needs trace code in real files, hence files, not exec().
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)


def blocks(doc: str) -> list[tuple[str, str]]:
    return [(lang, body) for lang, body in BLOCK.findall((DOCS / doc).read_text()) if lang in ("python", "bash")]


@pytest.mark.parametrize("doc", ["api.md", "plugins.md"])
def test_every_code_block_runs(doc, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(tmp_path),
           "TUNESHIFT_CACHE": os.environ.get("TUNESHIFT_CACHE", str(Path.home() / ".cache" / "tuneshift"))}
    ran = 0
    for n, (lang, body) in enumerate(blocks(doc)):
        first = body.splitlines()[0].strip()
        if lang == "bash":
            cmd = ["bash", "-ec", body]
        elif re.fullmatch(r"# file: (test_\w+\.py)", first):
            name = first.split()[-1]
            (tmp_path / name).write_text(body)
            cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", name]
        elif re.fullmatch(r"# \w+\.py", first):
            (tmp_path / first[2:]).write_text(body)
            continue
        else:
            (tmp_path / f"block_{n}.py").write_text(body)
            cmd = [sys.executable, f"block_{n}.py"]
        result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{doc} block {n} failed:\n{body}\n---\n{result.stdout[-2000:]}" \
                                       f"{result.stderr[-3000:]}"
        ran += 1
    assert ran >= 3
