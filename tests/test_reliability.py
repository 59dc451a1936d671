"""Crash recovery, model caches, context length, the log file, W&B without a network, offline entry points."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import tuneshift.loading as loading
from tuneshift.cli import run_config
from tuneshift.config import validate
from tuneshift.context import ContextError, context_limit, fit_context, truncate_to_fit
from tuneshift.data import Prompt, encode_prompt
from tuneshift.joblog import RunLogHandler
from tuneshift.testing import tiny_model, tiny_tokenizer

BIN = Path(sys.executable).parent


def _cfg(tmp_path: Path, model: str = "tiny-random:llama", data: dict | None = None, **generation):
    return validate(OmegaConf.create({
        "model": {"name": "tiny", "models": {"base": {"name": "b", "path": model}}, "pairs": []},
        "data": data or {"limit": 2}, "generation": {"max_new_tokens": 3, **generation},
        "run": {"progress": False, "report": False}, "plugins": {"residual_norm": {}}}))


# ---- half-written files -------------------------------------------------------------------------------------
def test_half_written_temporary_files_are_removed_when_the_folder_is_run_again(tmp_path):
    out = tmp_path / "run"
    run_config(_cfg(tmp_path), out)
    planted = [out / "residual_norm" / "base" / ".norms.parquet.k2j3.tmp", out / ".summary.json.x9.tmp",
               out / "responses" / ".base.jsonl.abc.tmp"]
    for path in planted:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half of a file")
    keep = out / "residual_norm" / "base" / "notes.tmp"  # not ours: not hidden, not a temporary's name
    keep.write_text("mine")
    run_config(_cfg(tmp_path), out)
    assert not any(p.exists() for p in planted) and keep.exists()
    assert not list(out.rglob(".*.tmp"))


# ---- the model cache ----------------------------------------------------------------------------------------
def test_a_broken_tiny_model_cache_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "CACHE_DIR", tmp_path)
    broken = tmp_path / "tiny-random" / "llama-0"
    broken.mkdir(parents=True)
    (broken / "config.json").write_text(json.dumps(tiny_model().config.to_dict()))  # a kill left only this
    model, tokenizer = loading.load_model(loading.ModelSpec(path="tiny-random:llama:0"))
    assert loading.cache_entry_ok(broken) and tokenizer("hi")["input_ids"]
    (broken / "tokenizer.json").write_text("{")  # damaged later: its size no longer matches the marker
    assert not loading.cache_entry_ok(broken)
    loading.load_model(loading.ModelSpec(path="tiny-random:llama:0"))
    assert loading.cache_entry_ok(broken)


def test_a_kill_during_a_cache_build_leaves_no_entry(tmp_path):
    script = (
        "import os, signal, tuneshift.testing as t, tuneshift.loading as l\n"
        "def dying(path, family, seed):\n"
        "    t.tiny_model(family, seed).save_pretrained(path)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)  # killed before the tokenizer is written\n"
        "t.save_tiny_model = dying\n"
        "l.load_model(l.ModelSpec(path='tiny-random:llama:3'))\n")
    env = {**os.environ, "TUNESHIFT_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=300)
    assert done.returncode == -signal.SIGKILL
    entry = tmp_path / "tiny-random" / "llama-3"
    assert not entry.exists() and list(entry.parent.glob(".llama-3.*.partial"))  # only the temporary folder
    ok = subprocess.run([sys.executable, "-c", "import tuneshift.loading as l; "
                         "l.load_model(l.ModelSpec(path='tiny-random:llama:3'))"], env=env, capture_output=True,
                        text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert loading.cache_entry_ok(entry) and not list(entry.parent.glob(".llama-3.*.partial"))


# ---- context length ----------------------------------------------------------------------------------------
LONG = Prompt("long", "Summarize the text. " + "the cat sat on the mat " * 60, ((0, 19),))


def test_context_limits_come_from_the_config_and_the_tokenizer():
    assert context_limit(tiny_model("gpt2")) == (256, "config.max_position_embeddings")  # GPT-2's n_positions
    tok = tiny_tokenizer()
    tok.model_max_length = 100
    try:
        assert context_limit(tiny_model("llama"), tok) == (100, "tokenizer.model_max_length")
    finally:
        tok.model_max_length = int(1e30)


def test_a_prompt_past_the_context_is_an_error_or_cut_to_fit():
    tok = tiny_tokenizer()
    short = Prompt("short", "Summarize the text.", ((0, 19),))
    encoded = [encode_prompt(tok, LONG), encode_prompt(tok, short)]
    assert encoded[0].n_prompt > 100
    with pytest.raises(ContextError, match=r"prompt 'long' is \d+ tokens long.*needs \d+ positions.*context of 100 "
                                           r"tokens.*1 of 2 prompts.*generation\.truncate_prompts=true"):
        fit_context(encoded, tok, 100, "config.x", 20, False, False, "m")
    fitted = fit_context(encoded, tok, 100, "config.x", 20, False, True, "m")
    assert fitted[1] is encoded[1] and fitted[0].n_prompt <= 80
    cut = fitted[0].prompt
    assert LONG.text.startswith(cut.text) and cut.instruction_spans == ((0, 19),)
    longer = Prompt("long", LONG.text[:len(cut.text) + 1], cut.instruction_spans)
    assert encode_prompt(tok, longer).n_prompt > 80  # the longest prefix that fits
    assert fitted[0].extras["truncated_from_chars"] == len(LONG.text)
    with pytest.raises(ContextError, match="leaves no room"):
        fit_context(encoded, tok, 100, "config.x", 100, False, True, "m")
    clipped = truncate_to_fit(tok, Prompt("p", "Say it. " + "word " * 50, ((0, 40),)), False, 5).prompt
    assert clipped.instruction_spans[0][1] <= len(clipped.text)


def test_truncate_prompts_runs_gpt2_on_a_long_prompt(tmp_path, caplog):
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"id": "long", "prompt": LONG.text * 3, "instructions": ["Summarize the text."]}))
    with caplog.at_level(logging.WARNING, logger="tuneshift"):
        run_config(_cfg(tmp_path, "tiny-random:gpt2", {"format": "jsonl", "path": str(data)}, truncate_prompts=True,
                        max_new_tokens=8), tmp_path / "run")
    assert "1 of 1 prompts cut to fit its 256-token context" in caplog.text
    with pytest.raises(ContextError, match="context of 256"):
        run_config(_cfg(tmp_path, "tiny-random:gpt2", {"format": "jsonl", "path": str(data)}, max_new_tokens=8),
                   tmp_path / "run2")


# ---- the log file ------------------------------------------------------------------------------------------
def test_the_log_handler_degrades_when_its_folder_cannot_be_written(tmp_path, capsys):
    handler = RunLogHandler(str(tmp_path / "a_file_not_a_folder" / "cli.log"))
    (tmp_path / "x").write_text("")
    blocked = RunLogHandler(str(tmp_path / "x" / "cli.log"))  # a file where a folder should be
    assert blocked.disabled_reason and "cannot write the log file" in capsys.readouterr().err
    record = logging.LogRecord("tuneshift", logging.INFO, __file__, 1, "hello", None, None)
    blocked.emit(record)
    blocked.close()
    assert handler.disabled_reason  # its folder does not exist either
    fine = RunLogHandler(str(tmp_path / "cli.log"))
    fine.emit(record)
    fine.close()
    assert "hello" in (tmp_path / "cli.log").read_text()


# ---- no network ----------------------------------------------------------------------------------------------
NETGUARD = """
import json, runpy, socket, sys
attempts = []
def refuse(*args, **kwargs):
    attempts.append(repr(args[1:3] if len(args) > 2 else args)[:80])
    raise OSError("network blocked by the test")
socket.socket.connect = lambda self, address: refuse(self, address)
socket.getaddrinfo = lambda *args, **kwargs: refuse(None, *args)
try:
    sys.argv = [sys.argv[1]] + sys.argv[2:]
    runpy.run_module(sys.argv[0], run_name="__main__")
finally:
    print("NETWORK_ATTEMPTS=" + json.dumps(attempts), file=sys.stderr)
"""


def test_the_precision_check_never_looks_up_the_network(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_HUB_OFFLINE")}
    done = subprocess.run([sys.executable, "-c", NETGUARD, "tuneshift.plugins.saliency.precision", "--path",
                           "someorg/some-model", "--prompts", "1"], env=env, capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    attempts = json.loads(done.stderr.split("NETWORK_ATTEMPTS=")[-1])
    assert attempts == []  # before: 19 lookups of huggingface.co
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "not in the local Hugging Face cache" in done.stderr and "HF_HUB_OFFLINE=1" in done.stderr


@pytest.mark.slow  # about 25 s: a W&B start that times out
def test_wandb_online_without_a_network_falls_back_to_offline_quickly(tmp_path):
    env = {**os.environ, "WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_API_KEY": "0" * 40, "WANDB_MODE": "online",
           "HF_HUB_OFFLINE": "1", "TUNESHIFT_CACHE": str(tmp_path / "cache")}
    started = time.monotonic()
    done = subprocess.run([str(BIN / "tuneshift"), "model=tiny_random", "data=builtin", "plugins=[residual_norm]",
                           "data.limit=2", "generation.max_new_tokens=2", "run.progress=false", "logger=wandb",
                           "logger.init_timeout=5", f"hydra.run.dir={tmp_path}/run"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    seconds = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert "W&B could not start online" in output and "logging offline instead" in output
    assert "W&B logging disabled" not in output  # the offline fallback itself works
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert (tmp_path / "run" / "residual_norm" / "compare" / "base__tuned" / "_DONE").is_file()
    assert seconds < 180, f"W&B blocked the run for {seconds:.0f} s"  # before: 95 s to 10 minutes of retries


# ---- threads -------------------------------------------------------------------------------------------------
def test_run_threads_sets_torch_threads_and_defaults_to_half_the_cores(tmp_path):
    import torch

    from tuneshift.runner import default_threads

    before = torch.get_num_threads()
    try:
        cfg = _cfg(tmp_path)
        cfg.run.threads = 1
        run_config(cfg, tmp_path / "one")
        assert torch.get_num_threads() == 1
        cfg.run.threads = 0
        run_config(cfg, tmp_path / "one")  # the same folder: threads change speed only, not results
        assert torch.get_num_threads() == default_threads() == max(1, (os.cpu_count() or 2) // 2)
    finally:
        torch.set_num_threads(before)


def test_a_failing_report_never_hides_the_error_that_stopped_the_run(tmp_path, monkeypatch, caplog):
    import tuneshift.report as report
    from tuneshift.plugin import PLUGINS, Plugin

    class Exploding(Plugin):
        name = "test_exploding"

        def on_model_end(self, ctx, model):
            raise KeyError("score")  # the run's real problem

    def broken_report(*args, **kwargs):
        raise json.JSONDecodeError("Expecting value", "", 0)

    PLUGINS.register(Exploding)
    monkeypatch.setattr(report, "write_report", broken_report)
    cfg = _cfg(tmp_path)
    cfg.run.report = True
    cfg.plugins = {"test_exploding": {}}
    try:
        with pytest.raises(KeyError, match="score"), caplog.at_level(logging.WARNING, logger="tuneshift"):
            run_config(cfg, tmp_path / "run")
    finally:
        PLUGINS.unregister("test_exploding")
    assert "wrapping up failed too (JSONDecodeError" in caplog.text
    assert (tmp_path / "run" / "summary.json").is_file()  # the summary of what finished is still written


# ---- stale results: the prompts as loaded, validation before the folder ---------------------------------------
def test_an_edited_data_file_never_reuses_old_results_or_responses(tmp_path):
    import shutil

    from tuneshift.errors import RunFolderError

    data = tmp_path / "p.jsonl"
    rows = [{"id": f"p{i}", "prompt": f"Summarize the text. Story {i} about a cat.",
             "instructions": ["Summarize the text."]} for i in range(2)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _cfg(tmp_path, data={"format": "jsonl", "path": str(data)})
    cfg.plugins = {"saliency": {}}
    run_config(cfg, tmp_path / "first")
    rows[1]["prompt"] = "Summarize the text. A different story, about a dog."  # same ids, same row count
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(RunFolderError, match="holds results of other settings"):
        run_config(cfg, tmp_path / "first")  # the same folder: refused, nothing changed
    second = tmp_path / "second"
    (second / "responses").mkdir(parents=True)
    shutil.copy(tmp_path / "first" / "responses" / "base.jsonl", second / "responses" / "base.jsonl")
    run_config(cfg, second)  # an old responses cache in the folder is not reused for the edited prompts
    cached = [json.loads(line) for line in (second / "responses" / "base.jsonl").read_text().splitlines()]
    assert cached[1]["prompt"] == rows[1]["prompt"]
    old = [json.loads(line) for line in (tmp_path / "first" / "responses" / "base.jsonl").read_text().splitlines()]
    assert cached[0]["fingerprint"] != old[0]["fingerprint"]


def test_a_bad_plugin_option_fails_before_the_run_folder_exists(tmp_path):
    from tuneshift.plugin import PluginError

    cfg = _cfg(tmp_path)
    cfg.plugins = {"saliency": {"b": 11.0}}
    with pytest.raises(PluginError, match=r"saliency\.b=11"):
        run_config(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
