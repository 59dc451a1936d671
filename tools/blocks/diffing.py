"""Model diffing on the organism (README block ``organism_diffing``): token shift, layer lens, differential
attribution and saliency on identical tokens.

Committed result: ``docs/results/organism_diffing.json``, from a run of

    tuneshift 'plugins=[token_shift,layer_lens,saliency]' generation.response_source=tuned run.root=/tmp/out
    python -m tools.readme --collect organism_diffing --source /tmp/out/tiny_pair-organism-<hash>

The collector copies the comparison summaries the plugins wrote (``<plugin>/compare/base__tuned/summary.json``)
and the per-layer and per-position tables the renderer prints; nothing is computed here.
"""
from __future__ import annotations

import json
from pathlib import Path

from tools.blocks.common import commit_of, p_value, read_json, write_json
from tools.readme import ReadmeError, collector, renderer

NAME = "organism_diffing"
PAIR = "compare/base__tuned"


def _summary(source: Path, plugin: str) -> dict:
    path = source / plugin / PAIR / "summary.json"
    if not path.is_file():
        raise ReadmeError(f"{path} is missing: run token_shift, layer_lens and saliency with "
                          "generation.response_source=tuned and give --source that run's folder")
    return json.loads(path.read_text(encoding="utf-8"))


def _records(source: Path, plugin: str, table: str) -> list[dict]:
    import pandas as pd

    return json.loads(pd.read_parquet(source / plugin / PAIR / f"{table}.parquet").to_json(orient="records"))


@collector(NAME)
def collect(root: Path, source: Path) -> Path:
    settings = json.loads((source / "settings.json").read_text(encoding="utf-8"))
    if settings["settings"]["generation"].get("response_source") != "tuned":
        raise ReadmeError(f"{source} was not run with generation.response_source=tuned")
    timing = json.loads((source / "summary.json").read_text(encoding="utf-8")).get("timing", {})
    return write_json(root, NAME, {
        "command": "tuneshift 'plugins=[token_shift,layer_lens,saliency]' generation.response_source=tuned",
        "commit": commit_of(root), "seconds_total": timing.get("seconds_total"),
        "token_shift": _summary(source, "token_shift"), "layer_lens": _summary(source, "layer_lens"),
        "saliency_on_shared_tokens": _summary(source, "saliency")["all"],
        "token_shift_by_relative_position": _records(source, "token_shift", "by_position"),
        "layer_lens_by_layer": _records(source, "layer_lens", "by_layer"),
    })


def _p(p: float) -> str:
    text = p_value(p)
    return f"p {text}" if text.startswith("<") else f"p = {text}"


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


@renderer(NAME)
def render(root: Path) -> str:
    r = read_json(root, NAME)
    ts, ll, sal = r["token_shift"], r["layer_lens"], r["saliency_on_shared_tokens"]
    early, fmt, diff = ts["earliness"], ts["format"], ts["differential"]
    first, middle = r["token_shift_by_relative_position"][0], r["token_shift_by_relative_position"][4]
    layers = r["layer_lens_by_layer"]
    kl_base = " / ".join(f"{x['kl_base']:.1f}" for x in layers[:-1])
    kl_tuned = " / ".join(f"{x['kl_tuned']:.1f}" for x in layers[:-1])
    rel = ", ".join(f"{x['rel_norm']:.2f}" for x in layers)
    adl = ll["adl_headline"]
    rows = [
        ("token distribution shift (AlignTDS; published 4.8-7.8 % for 7B pairs)",
         f"{_pct(ts['share_shifted'])} of {ts['n_positions']} positions shifted (base rank > 3), "
         f"{_pct(ts['share_marginal'])} marginal, {_pct(ts['share_unshifted'])} unshifted; mean KL(T‖B) "
         f"{ts['mean_kl_tb']:.2f} nats, KL(B‖T) {ts['mean_kl_bt']:.2f}"),
        ("shifts concentrate early (AlignTDS)",
         f"{_pct(first['share_shifted'])} shifted in the first tenth of the response vs "
         f"{_pct(middle['share_shifted'])} in the middle; median relative position {early['median_shifted']:.2f} "
         f"(shifted) vs {early['median_other']:.2f}, Mann-Whitney {_p(early['p'])}"),
        ("shifts concentrate on format tokens",
         f"format tokens are {_pct(fmt['format_share_of_shifted'])} of shifted vs {_pct(fmt['format_share_of_other'])} "
         f"of other positions (Fisher one-sided {_p(fmt['p'])}); the stop token shifts in "
         f"{_pct(ts['stop_shift_rate'])} of responses"),
        ("differential attribution: instruction share of abs(I_T − I_B)",
         f"{diff['mean_shifted']:.3f} at shifted vs {diff['mean_unshifted']:.3f} at unshifted positions "
         f"(Welch {_p(diff['p'])}, n = {diff['n_shifted']} / {diff['n_unshifted']})"),
        ("commitment layer (logit lens, first layer whose top-1 stays)",
         f"base {ll['commitment_base']:.2f} → tuned {ll['commitment_tuned']:.2f} (Wilcoxon "
         f"{_p(ll['commitment_p'])}); KL(final‖lens) by layer base {kl_base}, tuned {kl_tuned} nats"),
        ("residual streams diverge with depth",
         f"‖h_T − h_B‖ / ‖h_B‖ {rel}; cosine "
         f"{layers[0]['cos']:.2f} → {layers[-1]['cos']:.2f}"),
        ("activation-difference lens (largest mean difference)",
         f"{adl['slot']} ({adl['slot_token']!r}), layer {adl['layer']}: norm {adl['norm']:.1f}, decodes to "
         + ", ".join(repr(t) for t in adl["tokens"])),
        ("instruction score on identical tokens (saliency)",
         f"base {sal['base_mean']:.3f} → tuned {sal['tuned_mean']:.3f}, Welch one-sided {_p(sal['p'])}, "
         f"n = {sal['n']}"),
    ]
    body = "\n".join(f"| {a} | {b.replace('|', '&#124;')} |" for a, b in rows)
    return f"\n| quantity | on the organism, the tuned model's response fed to both |\n|---|---|\n{body}\n"
