"""Command line of the organism build: ``tuneshift-train-pair`` or ``python -m tuneshift.models.organism``."""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Sequence

# The build shares a 2-core CPU; OpenMP threads that spin-wait while descheduled made a training step 2-3x
# slower under load here (7.8 s vs 2.9 s). Passive waiting does not change any result. It only takes effect
# if set before torch starts OpenMP, hence before the imports below.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from transformers.utils import logging as hf_logging  # noqa: E402

from .pipeline import SMOKE, PairConfig, run  # noqa: E402
from .train import ModelSize  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Options; step counts and model size left unset keep the defaults of the chosen scale."""
    parser = argparse.ArgumentParser(
        prog="tuneshift-train-pair",
        description="Train a base Llama from scratch on offline English text, then instruction-tune a copy (SFT), "
                    "evaluate both on held-out tasks and save the pair in fp16.")
    parser.add_argument("--out", type=Path, default=PairConfig.out_dir, help="output folder (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=PairConfig.seed)
    parser.add_argument("--smoke", action="store_true",
                        help="toy scale (2 layers, d=64, 30 + 30 steps, 4k documents): the whole pipeline in seconds")
    parser.add_argument("--pretrain-steps", type=int)
    parser.add_argument("--sft-steps", type=int)
    parser.add_argument("--sft-per-task", type=int, help="SFT examples drawn per task")
    parser.add_argument("--sft-replay", type=int,
                        help="plain-text pre-training rows replayed at every SFT step (default 0, as the committed pair)")
    parser.add_argument("--layers", type=int)
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--heads", type=int)
    parser.add_argument("--intermediate", type=int, help="FFN width")
    parser.add_argument("--threads", type=int, default=PairConfig.threads, help="torch CPU threads")
    parser.add_argument("--resume", action="store_true",
                        help="if OUT/pretrain_log.json exists (an interrupted build with the same options), reuse "
                             "OUT/base instead of pre-training again; SFT and evaluation are redone")
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> PairConfig:
    """The :class:`PairConfig` of the chosen scale, with the given overrides."""
    base = SMOKE if args.smoke else PairConfig()
    size = ModelSize(**{name: getattr(args, name) or getattr(base.size, name)
                        for name in ("layers", "hidden", "heads", "intermediate")})
    return replace(base, out_dir=args.out, seed=args.seed, size=size, threads=args.threads, resume=args.resume,
                   pretrain=replace(base.pretrain, steps=args.pretrain_steps or base.pretrain.steps),
                   sft=replace(base.sft, steps=args.sft_steps or base.sft.steps,
                               replay_batch_size=base.sft.replay_batch_size if args.sft_replay is None
                               else args.sft_replay),
                   sft_per_task=args.sft_per_task or base.sft_per_task)


def main(argv: Sequence[str] | None = None) -> int:
    """Build the pair and print the held-out overall scores."""
    hf_logging.disable_progress_bar()
    metrics = run(config_from_args(parse_args(argv)))
    print(json.dumps({name: round(m["overall"], 4) for name, m in metrics["heldout"].items()}))
    return 0
