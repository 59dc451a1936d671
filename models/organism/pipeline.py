"""The whole organism recipe, end to end: sources -> tokenizer -> pre-trained base -> SFT instruct -> evaluation.

:func:`run` writes ``<out>/base`` and ``<out>/instruct`` (fp16 safetensors, each with the tokenizer),
``heldout_prompts.jsonl`` (the project's prompt format), ``eval_predictions.jsonl`` (both models' answers),
``metrics.json`` and ``MODEL_CARD.md``. Everything is seeded by ``PairConfig.seed``. ``pretrain_log.json`` is
written as soon as the base is saved, so that a build killed during SFT can go on with ``resume``.
"""
from __future__ import annotations

import json
import platform
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers
from transformers import AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerFast

from . import card
from .corpus import Sources, load_sources, pretraining_documents
from .evaluate import generate_answers, score_answers
from .tasks import TASKS, Example, build_heldout_examples, build_pools, build_sft_examples, split_pools, write_jsonl
from .tokenizer import train_tokenizer
from .train import (ModelSize, Schedule, build_model, mean_loss, pack_documents, pretraining_batches, sft_batches,
                    sft_dataset, train)


@dataclass(frozen=True)
class PairConfig:
    """Every knob of one organism build. The defaults are the committed ``models/tiny-pair``."""

    out_dir: Path = Path("models/tiny-pair")
    seed: int = 0
    size: ModelSize = ModelSize()
    vocab_size: int = 4096
    seq_len: int = 128
    pretrain: Schedule = Schedule(steps=2400, batch_size=16, lr=1e-3, warmup=100)
    sft: Schedule = Schedule(steps=1200, batch_size=32, lr=5e-4, warmup=50, replay_batch_size=0)  # the committed pair
    sft_per_task: int = 5000
    heldout_per_task: int = 48        # items per task scored in metrics.json
    heldout_file_per_task: int = 8    # of those, written to heldout_prompts.jsonl
    validation_rows: int = 64         # packed plain-text rows kept out of pre-training
    max_documents: int | None = None  # cap on pre-training documents (smoke mode)
    max_new_tokens: int = 64
    threads: int = 2
    resume: bool = False              # reuse <out>/base and <out>/pretrain_log.json of an interrupted build


SMOKE = PairConfig(size=ModelSize(layers=2, hidden=64, heads=2, intermediate=172), vocab_size=512,
                   pretrain=Schedule(steps=30, batch_size=8, lr=3e-3, warmup=5, log_every=10),
                   sft=Schedule(steps=30, batch_size=8, lr=3e-3, warmup=5, log_every=10, replay_batch_size=2),
                   sft_per_task=40, heldout_per_task=4, heldout_file_per_task=2, validation_rows=16,
                   max_documents=4000, max_new_tokens=16)
PRETRAIN_LOG = "pretrain_log.json"  # written next to base/ when pre-training ends; read by a resumed build


def save_model(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, directory: Path) -> None:
    """Save an fp16 copy of ``model`` (safetensors) and the tokenizer; the in-memory model stays fp32."""
    half = LlamaForCausalLM(model.config)
    half.load_state_dict(model.state_dict())
    half.half().save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def folder_bytes(directory: Path) -> int:
    """Total size of the files in ``directory``."""
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def fp16_rounded(model: LlamaForCausalLM) -> None:
    """Round the weights through fp16 in place, so SFT starts from exactly the published base weights."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(parameter.half().float())


def load_pretrained_base(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, out: Path) -> dict:
    """Load the base saved by an earlier, interrupted build into ``model`` and return its pre-training log.

    SFT then starts from exactly the weights a fresh build would start from (the fp16-rounded base), so a resumed
    build gives the same instruct model. The saved tokenizer must equal the one just trained, else the earlier
    build used other data or settings.
    """
    if AutoTokenizer.from_pretrained(out / "base").get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"{out / 'base'} was built with another tokenizer; --resume needs the same settings")
    model.load_state_dict(LlamaForCausalLM.from_pretrained(out / "base", dtype=torch.float32).state_dict())
    log = json.loads((out / PRETRAIN_LOG).read_text(encoding="utf-8"))
    print(f"[pretrain] resumed from {out / 'base'}", flush=True)
    return {**log, "resumed": True}


def heldout_subset(examples: list[Example], per_task: int) -> list[Example]:
    """The first ``per_task`` held-out examples of every task."""
    counts: dict[str, int] = {}
    subset = []
    for example in examples:
        counts[example.category] = counts.get(example.category, 0) + 1
        if counts[example.category] <= per_task:
            subset.append(example)
    return subset


@dataclass(frozen=True)
class PretrainingData:
    """The shuffled plain-text documents, the tokenizer trained on them and their packed rows."""

    documents: list[str]
    tokenizer: PreTrainedTokenizerFast
    tokens: int                    # document tokens plus one separator per document
    train_rows: torch.Tensor       # [rows, seq_len]
    validation_rows: torch.Tensor  # [config.validation_rows, seq_len], never trained on


@dataclass(frozen=True)
class InstructionData:
    """SFT examples (as drawn and as token features that fit) and the held-out examples."""

    examples: list[Example]
    features: list[tuple[list[int], list[int]]]
    heldout: list[Example]


def prepare_pretraining(sources: Sources, config: PairConfig, rng: random.Random) -> PretrainingData:
    """Shuffle the documents, train the tokenizer on them, tokenize and pack them into rows."""
    documents = pretraining_documents(sources)
    rng.shuffle(documents)
    documents = documents[:config.max_documents]
    tokenizer = train_tokenizer(documents, config.vocab_size)
    token_lists = [e.ids for e in tokenizer.backend_tokenizer.encode_batch(documents, add_special_tokens=False)]
    rows = pack_documents(token_lists, config.seq_len, tokenizer.bos_token_id, tokenizer.eos_token_id)
    return PretrainingData(documents, tokenizer, sum(map(len, token_lists)) + len(token_lists),
                           rows[:-config.validation_rows], rows[-config.validation_rows:])


def prepare_instructions(sources: Sources, config: PairConfig, rng: random.Random,
                         tokenizer: PreTrainedTokenizerFast) -> InstructionData:
    """Reserve the held-out items, then draw the SFT examples from the rest and featurize them."""
    sft_pools, heldout_pools = split_pools(build_pools(sources), config.heldout_per_task, rng)
    examples = build_sft_examples(sft_pools, config.sft_per_task, rng)
    heldout = build_heldout_examples(heldout_pools, rng)
    return InstructionData(examples, sft_dataset(tokenizer, examples, config.seq_len), heldout)


def write_predictions(heldout: list[Example], answers: dict[str, list[str]], path: Path) -> None:
    """One JSON line per held-out example with the answer of each model."""
    with path.open("w", encoding="utf-8") as handle:
        for i, example in enumerate(heldout):
            record = {**example.to_record(), **{name: answers[name][i] for name in answers}}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def collect_metrics(config: PairConfig, sources: Sources, pretraining: PretrainingData,
                    instructions: InstructionData, instruct: LlamaForCausalLM, curves: dict[str, list],
                    resumed: bool, validation_loss: dict[str, float], heldout_scores: dict,
                    seconds: dict[str, float]) -> dict:
    """Everything ``metrics.json`` records: configuration, data sizes, model, curves, losses, scores, times."""
    features = instructions.features
    return {
        "config": json.loads(json.dumps(asdict(config), default=str)),
        "environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "python": platform.python_version(), "threads": config.threads},
        "data": {
            "pretraining": {"documents": len(pretraining.documents), "wiki": len(sources.wiki),
                            "fortunes": len(sources.fortunes), "wordnet_synsets": len(sources.synsets),
                            "chars": sum(map(len, pretraining.documents)), "tokens": pretraining.tokens,
                            "train_rows": len(pretraining.train_rows),
                            "validation_rows": len(pretraining.validation_rows)},
            "sft": {"examples": len(features), "dropped_too_long": len(instructions.examples) - len(features),
                    "tokens": sum(len(ids) for ids, _ in features),
                    "response_tokens": sum(sum(1 for t in labels if t >= 0) for _, labels in features),
                    "tasks": [t.name for t in TASKS]},
            "heldout": {"examples": len(instructions.heldout), "per_task": config.heldout_per_task,
                        "in_heldout_prompts_jsonl": config.heldout_file_per_task * len(TASKS)},
        },
        "model": {"parameters": sum(p.numel() for p in instruct.parameters()), "config": asdict(config.size),
                  "vocab_size": len(pretraining.tokenizer), "tied_embeddings": True,
                  "disk_bytes": {name: folder_bytes(Path(config.out_dir) / name) for name in ("base", "instruct")}},
        "pretrain": {"curve": curves["pretrain"], "seconds": seconds["pretrain"], "resumed": resumed},
        "sft": {"curve": curves["sft"], "seconds": seconds["sft"]},
        "validation_loss": validation_loss,
        "heldout": heldout_scores,
        "seconds": seconds,
    }


def run(config: PairConfig) -> dict:
    """Build the pair into ``config.out_dir`` and return the metrics that ``metrics.json`` holds."""
    torch.set_num_threads(config.threads)
    started = time.time()
    seconds: dict[str, float] = {}
    rng = random.Random(config.seed)
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    sources = load_sources()
    pretraining = prepare_pretraining(sources, config, rng)
    tokenizer = pretraining.tokenizer
    seconds["data_and_tokenizer"] = time.time() - started

    model = build_model(tokenizer, config.size, max_positions=4 * config.seq_len, seed=config.seed)
    if config.resume and (out / PRETRAIN_LOG).exists():
        log = load_pretrained_base(model, tokenizer, out)
    else:
        tick = time.time()
        log = {"curve": train(model, pretraining_batches(pretraining.train_rows, config.pretrain.batch_size,
                                                         config.seed), config.pretrain, "pretrain"),
               "seconds": time.time() - tick, "resumed": False}
        fp16_rounded(model)
        save_model(model, tokenizer, out / "base")
        (out / PRETRAIN_LOG).write_text(json.dumps(log, indent=1) + "\n", encoding="utf-8")
    curves, seconds["pretrain"] = {"pretrain": log["curve"]}, log["seconds"]
    base = LlamaForCausalLM.from_pretrained(out / "base", dtype=torch.float32)

    instructions = prepare_instructions(sources, config, rng, tokenizer)
    tick = time.time()
    replay = (pretraining_batches(pretraining.train_rows, config.sft.replay_batch_size, config.seed + 1)
              if config.sft.replay_batch_size else None)
    curves["sft"] = train(model, sft_batches(instructions.features, config.sft.batch_size, tokenizer.pad_token_id,
                                             config.seed), config.sft, "sft", replay)
    seconds["sft"] = time.time() - tick
    save_model(model, tokenizer, out / "instruct")
    instruct = LlamaForCausalLM.from_pretrained(out / "instruct", dtype=torch.float32)

    tick = time.time()
    models = {"base": base, "instruct": instruct}
    prompts = [e.prompt for e in instructions.heldout]
    answers = {name: generate_answers(m, tokenizer, prompts, config.max_new_tokens) for name, m in models.items()}
    seconds["evaluation"] = time.time() - tick
    write_jsonl(heldout_subset(instructions.heldout, config.heldout_file_per_task), out / "heldout_prompts.jsonl")
    write_predictions(instructions.heldout, answers, out / "eval_predictions.jsonl")
    validation_loss = {name: mean_loss(m, pretraining.validation_rows) for name, m in models.items()}
    seconds["total"] = time.time() - started + (seconds["pretrain"] if log["resumed"] else 0.0)

    scores = {name: score_answers(instructions.heldout, answers[name]) for name in answers}
    metrics = collect_metrics(config, sources, pretraining, instructions, instruct, curves, log["resumed"],
                              validation_loss, scores, seconds)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    (out / "MODEL_CARD.md").write_text(card.render(metrics), encoding="utf-8")
    return metrics
