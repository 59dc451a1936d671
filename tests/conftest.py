"""Shared test fixtures: tiny random pairs as configs, the paper's reference data, offline settings.

Every test runs offline (``HF_HUB_OFFLINE=1``, W&B offline) on tiny random models built in the test run; the
paper's released data is read by path from ``../shared/reference`` (or ``$TUNESHIFT_REFERENCE``) and tests
that need it skip when it is absent.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

REFERENCE = Path(os.environ.get("TUNESHIFT_REFERENCE", Path(__file__).resolve().parents[2] / "shared" / "reference"))


def tiny_pair_config(root: Path, plugins: dict[str, Any], *, family: str = "llama", limit: int = 4,
                     max_new_tokens: int = 5, **run: Any):
    """A validated config: a tiny random ``family`` pair (seeds 0 and 1) on ``limit`` built-in prompts."""
    from omegaconf import OmegaConf

    from tuneshift.config import validate

    return validate(OmegaConf.create({
        "model": {"name": "tiny", "models": {"base": {"name": "b", "path": f"tiny-random:{family}:0"},
                                             "tuned": {"name": "t", "path": f"tiny-random:{family}:1"}},
                  "pairs": [["base", "tuned"]]},
        "data": {"limit": limit}, "generation": {"max_new_tokens": max_new_tokens},
        "run": {"root": str(root), "name": "job", "batch_size": 2, "progress": False, "report": False, **run},
        "logger": {"kind": "local"},
        "plugins": plugins,
    }))


@pytest.fixture
def tiny_pair_cfg(tmp_path: Path) -> Callable[..., Any]:
    """``tiny_pair_cfg(plugins, **kw)``: :func:`tiny_pair_config` rooted in the test's ``tmp_path``."""
    return lambda plugins, **kw: tiny_pair_config(tmp_path, plugins, **kw)


@pytest.fixture(scope="session")
def reference() -> Path:
    """The paper's released data (``datasets/``, ``attributions/``); skips the test when it is absent."""
    if not (REFERENCE / "datasets" / "FinalDataset.tsv").is_file():
        pytest.skip(f"the paper's reference data is not at {REFERENCE} (set TUNESHIFT_REFERENCE)")
    return REFERENCE


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of many small forwards (generation loops): extra intra-op threads only spin
    on a busy machine. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
