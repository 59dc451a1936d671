"""Benchmark figures (README block ``benchmarks``), parsed from ``benchmarks/results/*.md``.

Those files are what ``benchmarks/run_all.sh`` writes (a header with the command, machine and load, then
the script's own tables); nothing here measures anything. Re-measure with ``benchmarks/run_all.sh [names]``,
then ``python -m tools.readme``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from tools.blocks.common import markdown_rows, number
from tools.blocks.trace_costs import diffing_memory_row, diffing_row, interventions_row
from tools.readme import ReadmeError, renderer

RESULTS = Path("benchmarks/results")
SALIENCY_ROWS = {"tuneshift": "tuneshift `attribute`", "floor": "floor:", "reference": "(a) reference",
                 "captum": "(b) captum", "inseq": "(c) inseq"}
BASELINES = ("reference", "captum", "inseq")


def read(root: Path, name: str) -> str:
    path = root / RESULTS / f"{name}.md"
    if not path.is_file():
        raise ReadmeError(f"{path} is missing: run `benchmarks/run_all.sh {name}`")
    text = path.read_text(encoding="utf-8")
    if not re.search(r"exit 0\s*$", text):
        raise ReadmeError(f"{path} did not finish (no 'exit 0' at its end): rerun `benchmarks/run_all.sh {name}`")
    return text


@dataclass
class SaliencyCase:
    """One ``###`` section of a bench_saliency.py result: its header and wall seconds / speed-ups by row."""

    header: str
    wall: dict[str, float]
    speedup: dict[str, float]
    extrapolated: str  # "" or e.g. "8 of 64": baselines measured on K of M response tokens, scaled by M / K
    max_rel_diff: float


def saliency_cases(text: str) -> list[SaliencyCase]:
    """Every measured case in a bench_saliency.py result file, in order."""
    cases = []
    for section in text.split("\n### ")[1:]:
        header = section.splitlines()[0]
        wall, speedup, diffs = {}, {}, []
        for key, first in SALIENCY_ROWS.items():
            rows = markdown_rows(section, first)
            if not rows:
                raise ReadmeError(f"bench_saliency section {header[:60]!r} has no row {first!r}")
            wall[key] = number(rows[0][1])
            if key == "floor":
                speedup["floor"] = number(rows[0][5])   # "tuneshift / floor = **1.10x**"
            if key in BASELINES:
                speedup[key] = number(rows[0][5])
                diffs.append(number(rows[0][7]))
        k = re.search(r"baselines on K = (\d+) of (\d+) response tokens.*extrapolated linearly", section)
        cases.append(SaliencyCase(header, wall, speedup, f"{k.group(1)} of {k.group(2)}" if k else "", max(diffs)))
    return cases


def _response_tokens(case: SaliencyCase) -> str:
    found = re.search(r"M = (\d+)", case.header)
    return found.group(1) if found else "?"


def _seconds(value: float) -> str:
    return f"{value:.0f} s" if value >= 100 else f"{value:.1f} s"


def _ratios(case: SaliencyCase) -> str:
    return ", ".join(f"{case.speedup[k]:.1f}x" for k in BASELINES)


def _target(case: SaliencyCase) -> str:
    met = all(case.speedup[k] >= 4 for k in BASELINES)
    return ">= 4x: met" if met else ">= 4x: **not met**"


def _saliency_row(label: str, case: SaliencyCase, first: bool) -> str:
    ref = "reference (backward per token, weights with grad)" if first else "reference"
    base = "; ".join(f"{ref if k == 'reference' else k} {_seconds(case.wall[k])}" for k in BASELINES)
    if case.extrapolated:
        base += f" (extrapolated from {case.extrapolated} tokens per prompt)"
    return f"| {label} | {_seconds(case.wall['tuneshift'])} | {base} | {_ratios(case)} faster | {_target(case)} |"


def capture_rows(text: str) -> list[tuple[int, int, float, float, float]]:
    """``(batch, sites, plain ms, captured ms, overhead %)`` per row of a bench_capture.py result."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("| ") else []
        if len(cells) == 6 and cells[0].isdigit():
            rows.append((int(cells[0]), int(cells[2]), float(cells[3]), float(cells[4]), number(cells[5])))
    if not rows:
        raise ReadmeError("a bench_capture.py result has no measured rows")
    return rows


def _capture_row(label: str, rows: list[tuple[int, int, float, float, float]]) -> str:
    over = [o for *_, o in rows]   # the script's own overhead (from unrounded times)
    met = "met" if all(o <= 15 for o in over) else "**not met**"
    return (f"| {label}, batch {' / '.join(str(r[0]) for r in rows)}, seq 128 | "
            f"{' / '.join(f'{r[3]:.1f}' for r in rows)} ms | plain no-grad forward "
            f"{' / '.join(f'{r[2]:.1f}' for r in rows)} ms | {' / '.join(f'{o:+.1f} %' for o in over)} | "
            f"<= 15 %: {met} |")


def head_relations_figures(text: str) -> dict[str, float]:
    """Vectorised seconds, speed-ups over the per-head loop and the pure-Python reference, peak MB."""
    def row(prefix: str) -> list[str]:
        line = next((ln for ln in text.splitlines() if ln.startswith(prefix)), None)
        if line is None:
            raise ReadmeError(f"bench_head_relations result has no line {prefix!r}")
        return line[len(prefix):].split()

    vec, loop, naive = row("vectorised (mine_model)"), row("per-head loop (paper code layout)"), row(
        "pure-Python reference (tests)")
    peak = re.search(r"total peak (\d+) MB", text)
    heads = re.search(r"(\d+) layers x (\d+) heads", text)
    if peak is None or heads is None:
        raise ReadmeError("bench_head_relations result has no peak memory or model line")
    return {"seconds": float(vec[1]), "loop_speedup": float(loop[-1]), "naive_speedup": float(naive[-1]),
            "peak_mb": float(peak.group(1)), "heads": int(heads.group(1)) * int(heads.group(2))}


def ffn_figures(text: str) -> dict[int, dict[str, dict[str, float]]]:
    """Per R section and solver: CPU time / full SVD, max rel. error of the variance ratios, mean angle (deg)."""
    out: dict[int, dict[str, dict[str, float]]] = {}
    for section in text.split("\n## R = ")[1:]:
        solvers = {}
        for line in section.split("\n\nAgreement")[0].splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("| ") else []
            if len(cells) == 6 and cells[0] not in ("solver", "---"):
                solvers[cells[0]] = {"cpu_vs_full": float(cells[3]), "ratio_err": float(cells[4]),
                                     "angle": float(cells[5])}
        out[int(section.split(":")[0])] = solvers
    if not out:
        raise ReadmeError("bench_ffn_concepts result has no '## R = ...' section")
    return out


def _ffn_sentence(ffn: dict[int, dict[str, dict[str, float]]]) -> str:
    """eigh against the full SVD, and what the randomized baseline costs where it is accurate (1e-4 of the
    variance ratios) and how far off it is where it is cheaper than eigh."""
    parts = []
    for rank, solvers in sorted(ffn.items(), reverse=True):
        eigh, lowrank = solvers["eigh"], {k: v for k, v in solvers.items() if k.startswith("svd_lowrank")}
        accurate = [(k, v) for k, v in lowrank.items() if v["ratio_err"] <= 1e-4]
        cheaper = [(k, v) for k, v in lowrank.items() if v["cpu_vs_full"] < eigh["cpu_vs_full"]]
        text = f"at R = {rank} `eigh` takes {eigh['cpu_vs_full']:.2f}x the CPU time of the full SVD"
        if accurate:
            k, v = min(accurate, key=lambda kv: kv[1]["cpu_vs_full"])
            text += f", the cheapest accurate randomized setting ({k}) {v['cpu_vs_full']:.2f}x"
        if cheaper:
            k, v = max(cheaper, key=lambda kv: kv[1]["cpu_vs_full"])
            text += (f"; randomized settings cheaper than `eigh` are off ({k}: variance ratios by "
                     f"{100 * v['ratio_err']:.0f} %, subspaces {v['angle']:.1f}° apart)")
        else:
            text += "; no randomized setting is cheaper than `eigh`"
        parts.append(text)
    return "; ".join(parts)


def machine(texts: dict[str, str]) -> str:
    """One sentence on where and when the figures were measured, from the files' ``machine:`` headers."""
    found = {}
    for name, text in texts.items():
        m = re.search(r"^machine: nproc (\d+); (.+?) \(family.*load average at start ([\d. ]+); (\S+)", text, re.M)
        if m is None:
            raise ReadmeError(f"benchmarks/results/{name}.md has no 'machine:' header (run it through run_all.sh)")
        found[name] = (int(m.group(1)), m.group(2), float(m.group(3).split()[0]), m.group(4))
    cpus: dict[tuple[int, str], list[str]] = {}
    for name, (cores, cpu, _, _) in found.items():
        cpus.setdefault((cores, cpu), []).append(name)
    where = [f"{cores}-core {cpu} VM" + ("" if len(cpus) == 1 else f" ({', '.join(f'`{n}.md`' for n in names)})")
             for (cores, cpu), names in cpus.items()]
    if len(where) > 1:  # name the machine of the minority only
        main = max(cpus.items(), key=lambda kv: len(kv[1]))[0]
        where = [f"{main[0]}-core {main[1]} VM"] + [w for (key, _), w in zip(cpus.items(), where) if key != main]
    loads = [load for _, _, load, _ in found.values()]
    dates = sorted({date for *_, date in found.values()})
    torch = re.search(r"torch (\S+) with (\d+) thread", "\n".join(texts.values()))
    span = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"
    return (f"Machine: {' and a '.join(where)}, no GPU, torch {torch.group(1) if torch else '?'} with "
            f"{torch.group(2) if torch else '?'} thread, {span}, with a 1-minute load average of {min(loads):.1f} "
            f"to {max(loads):.1f} at the starts (other jobs shared the machine: absolute times are noisy; ratios "
            "come from interleaved runs on the same inputs).")


@renderer("benchmarks")
def render(root: Path) -> str:
    texts = {n: read(root, n) for n in ("saliency_smollm2_64", "saliency_smollm2_300", "saliency_smollm2_long",
                                        "saliency_tiny", "capture_smollm2", "capture_tiny", "head_relations",
                                        "ffn_concepts", "diffing_tiny", "diffing_smollm2", "diffing_smollm2_sparse",
                                        "interventions_tiny")}
    s64, s300 = saliency_cases(texts["saliency_smollm2_64"])[0], saliency_cases(texts["saliency_smollm2_300"])[0]
    long = saliency_cases(texts["saliency_smollm2_long"])[0]
    tiny = saliency_cases(texts["saliency_tiny"])
    n_long = re.search(r"prompt lengths \[(\d+)\]", long.header)
    ids_long = re.search(r"ids \['([^']+)'", long.header)
    floor = f"{s64.speedup['floor']:.2f}x / {s300.speedup['floor']:.2f}x"
    floor_met = "met" if max(s64.speedup["floor"], s300.speedup["floor"]) <= 1.5 else "**not met**"
    cap_smol, cap_tiny = capture_rows(texts["capture_smollm2"]), capture_rows(texts["capture_tiny"])
    heads, ffn = head_relations_figures(texts["head_relations"]), ffn_figures(texts["ffn_concepts"])
    diffs = max(c.max_rel_diff for c in (s64, s300, long, *tiny))
    tiny_ratios = " and ".join(f"{_ratios(c)} at {_response_tokens(c)} response tokens" for c in tiny)
    tiny_floor = " and ".join(f"{c.speedup['floor']:.2f}x" for c in tiny)
    prose = (
        f"On the 4.2M-parameter organism (`saliency_tiny.md`; millisecond passes, where fixed per-pass costs weigh "
        f"more) the saliency speed-ups over the reference, captum and inseq are {tiny_ratios}, and "
        f"the floor ratio {tiny_floor}. The attributions of all four methods agree to {diffs:.1e} relative. "
        f"Head relations (all {heads['heads']} heads of SmolLM2-135M, `head_relations.md`): "
        f"{heads['seconds']:.1f} s, peak {heads['peak_mb'] / 1000:.1f} GB, {heads['loop_speedup']:.1f}x faster "
        f"than a per-head loop laid out like the authors' code and {heads['naive_speedup']:.0f}x faster than the "
        f"pure-Python reference (extrapolated). FFN concepts (`ffn_concepts.md`, SmolLM2, 30 layers; "
        f"`torch.svd_lowrank` as the randomized baseline): {_ffn_sentence(ffn)}. So tuneshift offers only `eigh` "
        "(exact, the default) and the full SVD (`docs/plugins/ffn_concepts.md`).")
    lines = [
        machine(texts),
        "",
        "| benchmark | tuneshift | baseline | ratio | target |",
        "|---|---|---|---|---|",
        _saliency_row("saliency, SmolLM2-135M-Instruct, 2 prompts x 64 response tokens", s64, True),
        _saliency_row(f"saliency, SmolLM2, a long prompt ({n_long.group(1) if n_long else '?'} tokens, "
                      f"{ids_long.group(1) if ids_long else '?'}) x 64 response tokens", long, False),
        _saliency_row("saliency, SmolLM2, 1 prompt x 300 response tokens", s300, False),
        f"| saliency vs the floor of exact attribution (min(N, M) plain forwards), 64 / 300 tokens | "
        f"{_seconds(s64.wall['tuneshift'])} / {_seconds(s300.wall['tuneshift'])} | "
        f"{_seconds(s64.wall['floor'])} / {_seconds(s300.wall['floor'])} | {floor} | <= 1.5x: {floor_met} |",
        _capture_row(f"capture overhead, SmolLM2, all {cap_smol[0][1]} attention and MLP outputs", cap_smol),
        _capture_row(f"capture overhead, the 4.2M organism, all {cap_tiny[0][1]} outputs", cap_tiny),
        diffing_row("SmolLM2", texts["diffing_smollm2"]),
        diffing_row("SmolLM2", texts["diffing_smollm2_sparse"]),
        diffing_row("the organism", texts["diffing_tiny"]),
        diffing_memory_row("the organism", texts["diffing_tiny"]),
        diffing_memory_row("SmolLM2", texts["diffing_smollm2"]),
        interventions_row("the organism", texts["interventions_tiny"]),
        "",
        prose,
    ]
    return "\n".join(lines)
