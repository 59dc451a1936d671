"""Is a bf16/fp16 run good enough? Re-run the saliency attribution of a few prompts in fp32 and compare.

Large models are often run in bf16 or fp16 (half the memory and time of fp32, the paper's precision). The
saliency analysis differentiates through the whole model, where low precision matters most. This check
takes a few prompts with their responses (the run's own, from ``responses/<model>.jsonl``, so both precisions
attribute the same tokens), computes the gradient x input matrices ``I[n, m]`` (methods.md A.1, with the
saliency plugin's :func:`tuneshift.attribution.attribute`) once in the run's dtype and once in fp32,
and reports per prompt and overall:

- ``max_rel_dev``: ``max |I_low - I_fp32| / max |I_fp32|`` (the deviation relative to the matrix's scale;
  an element-wise ratio is meaningless where the fp32 value is ~0);
- ``rel_fro_dev``: ``||I_low - I_fp32||_F / ||I_fp32||_F``;
- ``density_max_rel_dev``: the same as ``max_rel_dev`` on the importance densities ``a_n`` (methods.md A.2-3,
  threshold b=0), and ``score_max_abs_dev``: the largest change of a prompt score (A.4, threshold b=7, the
  statistics' setting), and ``score_changed``: how many prompts' integer score matrices differ at all.

``passed`` is ``max_rel_dev <= tolerance`` (default 0.05). Results go to ``<run_dir>/precision_check/<model>/``
(``summary.json``, ``prompts.parquet``), which the run report shows.

    python -m tuneshift.plugins.saliency.precision outputs/qwen25_7b_instruct-final_dataset --model tuned --prompts 4
    python -m tuneshift.plugins.saliency.precision --path Qwen/Qwen2.5-7B-Instruct --dtype bfloat16 --chat-template --prompts 4

Python::

    from tuneshift.plugins.saliency.precision import check_run, check_saliency_precision
    result = check_run("outputs/my-run", model_key="tuned", n_prompts=4)
    print(result.max_rel_dev, result.passed)
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from tuneshift.attribution import attribute
from tuneshift.data import EncodedPrompt, Prompt, encode_prompt, load_prompts
from tuneshift.errors import TuneshiftError
from tuneshift.loading import ModelSpec, load_model
from tuneshift.plugins.saliency import density as dens

PLUGIN_DIR = "precision_check"  # results dir name inside a run dir (shown by the report)


@dataclass
class PrecisionCheck:
    """The outcome of one check (also written as ``summary.json``)."""

    model: str
    dtype: str
    reference_dtype: str
    n_prompts: int
    max_rel_dev: float
    rel_fro_dev: float
    density_max_rel_dev: float
    score_max_abs_dev: float
    score_changed: int
    tolerance: float
    passed: bool
    target: str = "prob"
    per_prompt: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "per_prompt"}


# ---- the paper's normalisation (methods.md A.2-A.4), through the plugin's own density module ------------------
def integer_scores(attribution: torch.Tensor, threshold: int = 0) -> torch.Tensor:
    """``S[n, m]`` (0..10 per response token, ``<= threshold`` zeroed) of ``attribution [N, M]``."""
    return torch.from_numpy(dens.normalise(attribution.double().numpy(), threshold))


def importance_density(scores: torch.Tensor) -> torch.Tensor:
    """``a_n = ||S[n,:]||_1 / (||S[n,:]||_4 + 1e-7)`` ``[N]``."""
    return torch.from_numpy(dens.density(scores.double().numpy(), 4.0))


def prompt_score(attribution: torch.Tensor, instruction_rows: torch.Tensor, threshold: int = 7) -> float:
    """The prompt's score at ``threshold`` (0 for an empty response or a prompt without instruction tokens)."""
    if attribution.numel() == 0 or not bool(instruction_rows.any()):
        return 0.0
    density = dens.density(dens.normalise(attribution.double().numpy(), threshold), 4.0)
    return dens.prompt_score(density, instruction_rows.numpy(), attribution.shape[1])


# ---- the check ------------------------------------------------------------------------------------------------
def _load(spec: ModelSpec, dtype: str):
    model, tokenizer = load_model(dataclasses.replace(spec, dtype=dtype), "eager")
    return model, tokenizer


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _generate(model, tokenizer, encoded: list[EncodedPrompt], max_new_tokens: int) -> None:
    from tuneshift.adapters import ModelAdapter
    from tuneshift.generation import generate_responses
    from tuneshift.runner import ModelRun

    run = ModelRun("check", "check", ModelSpec(), model, tokenizer, ModelAdapter(model), False, encoded)
    generate_responses(run, max_new_tokens, batch_size=max(1, len(encoded)), progress=False)


def check_saliency_precision(spec: ModelSpec, prompts: Sequence[Prompt], *, dtype: str | None = None,
                             reference_dtype: str = "float32", chat_template: bool | None = None,
                             responses: Sequence[Sequence[int]] | None = None, max_new_tokens: int = 32,
                             target: str = "prob", tolerance: float = 0.05) -> PrecisionCheck:
    """Attribute ``prompts`` with ``spec`` in ``dtype`` (default: the spec's) and in ``reference_dtype``; compare.

    ``responses``: token ids per prompt (e.g. the run's own); otherwise the low-precision model generates them
    greedily (``max_new_tokens``), so both precisions attribute the same tokens either way. One model is in
    memory at a time.
    """
    from tuneshift.attribution import make_item

    dtype = dtype or spec.dtype
    chat = spec.chat_template if chat_template is None else chat_template
    low, tokenizer = _load(spec, dtype)
    encoded = [encode_prompt(tokenizer, p, chat) for p in prompts]
    if responses is None:
        _generate(low, tokenizer, encoded, max_new_tokens)
    else:
        for e, ids in zip(encoded, responses):
            e.response_ids = torch.as_tensor(list(ids), dtype=torch.long)
    items = [make_item(e.input_ids, e.response_ids, e.content_mask) for e in encoded]
    low_maps = attribute(low, items, target=target)
    del low
    _free()
    ref, _ = _load(spec, reference_dtype)
    ref_maps = attribute(ref, items, target=target)
    del ref
    _free()

    rows = []
    for e, lo, hi in zip(encoded, low_maps, ref_maps):
        lo, hi = lo.double(), hi.double()
        scale = float(hi.abs().max()) if hi.numel() else 0.0
        diff = (lo - hi).abs()
        instr = e.instruction_mask[e.content_mask]
        d_lo, d_hi = importance_density(integer_scores(lo)), importance_density(integer_scores(hi))
        d_scale = float(d_hi.abs().max()) if d_hi.numel() else 0.0
        s_lo, s_hi = prompt_score(lo, instr), prompt_score(hi, instr)
        rows.append({
            "id": e.prompt.id, "n_prompt_tokens": int(e.content_mask.sum()), "n_response_tokens": e.n_response,
            "max_rel_dev": float(diff.max()) / scale if scale > 0 else 0.0,
            "rel_fro_dev": float(diff.norm() / hi.norm()) if float(hi.norm()) > 0 else 0.0,
            "density_max_rel_dev": float((d_lo - d_hi).abs().max()) / d_scale if d_scale > 0 else 0.0,
            "score": s_hi, "score_low": s_lo, "score_abs_dev": abs(s_lo - s_hi),
            "scores_identical": bool(torch.equal(integer_scores(lo, 7), integer_scores(hi, 7)))})
    worst = max((r["max_rel_dev"] for r in rows), default=0.0)
    return PrecisionCheck(
        model=spec.name, dtype=dtype, reference_dtype=reference_dtype, n_prompts=len(rows), max_rel_dev=worst,
        rel_fro_dev=max((r["rel_fro_dev"] for r in rows), default=0.0),
        density_max_rel_dev=max((r["density_max_rel_dev"] for r in rows), default=0.0),
        score_max_abs_dev=max((r["score_abs_dev"] for r in rows), default=0.0),
        score_changed=sum(not r["scores_identical"] for r in rows), tolerance=tolerance,
        passed=worst <= tolerance, target=target, per_prompt=rows)


def _saliency_target(cfg: dict) -> str:
    options = (cfg.get("plugins") or {}).get("saliency") or {}
    target = options.get("target", "prob") if isinstance(options, dict) else "prob"
    return target if target in ("prob", "logprob", "logit") else "prob"


def check_run(run_dir: str | Path, model_key: str = "tuned", n_prompts: int = 4, *, dtype: str | None = None,
              reference_dtype: str = "float32", tolerance: float = 0.05, max_new_tokens: int | None = None,
              write: bool = True) -> PrecisionCheck:
    """Check the first ``n_prompts`` prompts of a finished (or partial) run for ``model_key``.

    Reads the run's resolved ``config.yaml`` (model spec, data, chat template, the saliency target) and its
    responses (``responses/<model_key>.jsonl``, when the run generated them). Writes
    ``<run_dir>/precision_check/<model_key>/`` and refreshes the run's report when ``write``.
    """
    from omegaconf import OmegaConf

    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: give a run dir written by tuneshift")
    cfg = OmegaConf.to_container(OmegaConf.load(cfg_path), resolve=True)
    models = cfg["model"]["models"]
    if model_key not in models:
        raise KeyError(f"model key {model_key!r} not in this run; its models: {', '.join(models)}")
    spec = ModelSpec(**models[model_key])
    data, gen = cfg.get("data") or {}, cfg.get("generation") or {}
    prompts = load_prompts(data.get("format", "builtin"), data.get("path"), None, data.get("splits") or None,
                           data.get("ids") or None)[:n_prompts]
    responses = None
    cached = run_dir / "responses" / f"{model_key}.jsonl"
    if cached.is_file():
        by_id = {r["id"]: r["response_ids"] for r in map(json.loads, cached.read_text().splitlines())}
        if all(p.id in by_id for p in prompts):
            responses = [by_id[p.id] for p in prompts]
    chat = gen.get("chat_template")
    result = check_saliency_precision(
        spec, prompts, dtype=dtype, reference_dtype=reference_dtype, chat_template=chat, responses=responses,
        max_new_tokens=max_new_tokens or int(gen.get("max_new_tokens", 32)), target=_saliency_target(cfg),
        tolerance=tolerance)
    if write:
        import pandas as pd

        from tuneshift.results import ResultStore

        store = ResultStore(run_dir)
        store.save_json(PLUGIN_DIR, model_key, "summary", result.summary())
        store.save_table(PLUGIN_DIR, model_key, "prompts", pd.DataFrame(result.per_prompt))
        from tuneshift.plugins.saliency.section import precision_section

        store.save_json(PLUGIN_DIR, model_key, "section", precision_section(result).to_dict())
        store.mark_done(PLUGIN_DIR, model_key, f"{result.dtype}-vs-{result.reference_dtype}")
        store.update_summary(PLUGIN_DIR, {model_key: result.summary()})
        try:
            from tuneshift.report import write_report

            write_report(run_dir)
        except Exception:  # noqa: BLE001 - the check's numbers are on disk already
            pass
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tuneshift.plugins.saliency.precision",
                                     description="Re-run the saliency attribution of a few prompts in fp32 and "
                                                 "report the largest relative deviation of the low-precision run.")
    parser.add_argument("run_dir", nargs="?", type=Path, help="a tuneshift run dir (reads its config and responses)")
    parser.add_argument("--model", default="tuned", help="model key in the run (default: tuned)")
    parser.add_argument("--path", help="instead of a run dir: a model path or hub id")
    parser.add_argument("--chat-template", action="store_true", help="with --path: render the chat template")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", help="the precision to check (default: the run's; with --path: bfloat16)")
    parser.add_argument("--reference-dtype", default="float32")
    parser.add_argument("--prompts", type=int, default=4, help="how many prompts (default 4)")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--tolerance", type=float, default=0.05)
    args = parser.parse_args(argv)
    try:
        result = _check(parser, args)
    except (TuneshiftError, FileNotFoundError, KeyError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err  # KeyError quotes its message
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        return 2
    print(json.dumps(result.summary(), indent=1))
    return 0 if result.passed else 1


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> PrecisionCheck:
    if args.run_dir is not None:
        result = check_run(args.run_dir, args.model, args.prompts, dtype=args.dtype,
                           reference_dtype=args.reference_dtype, tolerance=args.tolerance,
                           max_new_tokens=args.max_new_tokens)
    elif args.path:
        spec = ModelSpec(name=args.path, path=args.path, device=args.device, chat_template=args.chat_template)
        prompts = load_prompts("builtin")[: args.prompts]
        result = check_saliency_precision(spec, prompts, dtype=args.dtype or "bfloat16",
                                          reference_dtype=args.reference_dtype,
                                          max_new_tokens=args.max_new_tokens or 32, tolerance=args.tolerance)
    else:
        parser.error("give a run dir or --path")
    return result


if __name__ == "__main__":
    sys.exit(main())
