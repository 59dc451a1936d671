"""Where tuneshift's own files are, installed or not: the Hydra configs and the embedded model organism.

Both are package data (``tuneshift.conf`` and ``tuneshift.models``), so these paths hold for an editable
install, a wheel and a ``pip install .`` alike, from any working directory.
"""
from __future__ import annotations

import importlib
from pathlib import Path


def package_dir(package: str) -> Path:
    """Folder of an installed package."""
    return Path(importlib.import_module(package).__file__).resolve().parent


CONF_DIR = package_dir("tuneshift.conf")        # Hydra: ``config_path="pkg://tuneshift.conf"``
MODELS_DIR = package_dir("tuneshift.models")    # ``tiny-pair/{base,instruct}``, the default pair
ORGANISM_PROMPTS_PATH = MODELS_DIR / "tiny-pair" / "heldout_prompts.jsonl"
