"""framework/precision.py: the fp32 check of a low-precision saliency run, on tiny random models."""
from __future__ import annotations

import json

import torch

from tuneshift.data import load_prompts
from tuneshift.loading import ModelSpec
from tuneshift.plugins.saliency.precision import check_run, check_saliency_precision, importance_density, integer_scores, prompt_score


def test_normalisation_matches_the_method():
    attribution = torch.tensor([[1.0, -2.0], [0.5, 4.0], [0.0, 4.0]])
    scores = integer_scores(attribution)
    assert scores.tolist() == [[10, 0], [5, 10], [0, 10]]
    density = importance_density(scores)  # k equal entries give k^(3/4); an all-zero row 0
    assert abs(float(density[2]) - 1.0) < 1e-6 and float(importance_density(torch.zeros(1, 3))[0]) == 0.0
    assert prompt_score(attribution, torch.tensor([True, False, False]), threshold=0) > 0


def test_same_precision_deviates_by_nothing_and_bf16_by_a_little():
    spec = ModelSpec(name="tiny", path="tiny-random:llama:0")
    prompts = load_prompts("builtin", limit=2)
    same = check_saliency_precision(spec, prompts, dtype="float32", max_new_tokens=4)
    assert same.max_rel_dev == 0.0 and same.passed and same.n_prompts == 2 and same.score_changed == 0
    low = check_saliency_precision(spec, prompts, dtype="bfloat16", max_new_tokens=4, tolerance=0.5)
    assert 0.0 < low.max_rel_dev < 0.5 and low.passed
    assert len(low.per_prompt) == 2 and all(r["n_response_tokens"] > 0 for r in low.per_prompt)


def test_check_run_uses_the_runs_responses_and_writes_results(tmp_path):
    from tuneshift.config import validate
    from tuneshift.cli import run_config as run

    cfg = validate({"model": {"name": "tiny", "models": {
        "base": {"name": "b", "path": "tiny-random:llama:0", "dtype": "bfloat16"},
        "tuned": {"name": "t", "path": "tiny-random:llama:1", "dtype": "bfloat16"}}, "pairs": [["base", "tuned"]]},
        "data": {"limit": 2}, "generation": {"max_new_tokens": 3},
        "run": {"name": "job", "root": str(tmp_path), "progress": False, "report": False},
        "plugins": {"residual_norm": {}}})
    run(cfg)
    run_dir = tmp_path / "job"
    (run_dir / "responses").mkdir(exist_ok=True)  # as a plugin with needs_responses would have left them
    rows = [{"fingerprint": "x", "id": p.id, "prompt": p.text, "response": "", "response_ids": [5, 6, 7]}
            for p in load_prompts("builtin", limit=2)]
    (run_dir / "responses" / "tuned.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")
    result = check_run(run_dir, "tuned", n_prompts=2, tolerance=1.0)
    assert result.dtype == "bfloat16" and result.reference_dtype == "float32"
    assert [r["n_response_tokens"] for r in result.per_prompt] == [3, 3]
    assert (run_dir / "precision_check" / "tuned" / "_DONE").is_file()
    summary = json.loads((run_dir / "precision_check" / "tuned" / "summary.json").read_text())
    assert summary["passed"] is True and "max_rel_dev" in summary
    report = (run_dir / "report.html").read_text()
    assert "Precision check" in report
