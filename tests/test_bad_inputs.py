"""Bad inputs through the three console scripts: each gives one clear message, a non-zero exit and no traceback.

The cases run as real console-script processes, forked from one harness process that has imported torch,
transformers and Hydra once (``tests/cli_harness.py``), so the table stays fast; three of them also
run through the installed executables to show the harness behaves like them. Most cases fail before any
model loads; the rest use tiny models built in a second.

Each :class:`Case`: id, script, args, exit code, a regex the output must match (and extra environment, a
folder mounted read-only for that case). Exit 2 is tuneshift's (and argparse's) user
error; exit 1 is Hydra's for a config that does not compose (it names the key, without a traceback).
"""
from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

HARNESS = Path(__file__).with_name("cli_harness.py")
BIN = Path(sys.executable).parent
TINY = ["model=tiny_random", "data=builtin", "plugins=[residual_norm]", "data.limit=2", "run.progress=false",
        "generation.max_new_tokens=2"]
PROMPT = {"id": "a", "prompt": "Summarize the text. The cat sat on the mat.", "instructions": ["Summarize the text."]}


def _jsonl(path: Path, rows: list) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def _data_files(d: Path) -> None:
    d.mkdir()
    spans = lambda spans: {"id": "a", "prompt": "Hi there.", "instruction_spans": spans}  # noqa: E731
    for name, rows in {
        "empty": [], "blank": ["", "   "], "badjson": [PROMPT, "{not json"], "array": [[1, 2, 3]],
        "noprompt": [{"id": "a", "instructions": []}], "noid": [{"prompt": "Say hi."}],
        "instr_str": [{**PROMPT, "instructions": "Summarize the text."}],
        "instr_num": [{**PROMPT, "instructions": [3]}],
        "dup": [PROMPT, {**PROMPT, "id": "b"}, PROMPT],
        "notfound": [{**PROMPT, "instructions": ["Translate it."]}],
        "span_out": [spans([[0, 99]])], "span_bad": [spans([[0, 1, 2]])], "span_str": [spans("0-2")],
        "prompt_num": [{"id": "a", "prompt": 42}], "prompt_empty": [{"id": "a", "prompt": "  "}],
        "split_num": [{**PROMPT, "split": ["x"]}],
        "long": [{"id": "long", "prompt": "Summarize the text. " + "the cat sat " * 400,
                  "instructions": ["Summarize the text."]}],
    }.items():
        _jsonl(d / f"{name}.jsonl", rows)
    (d / "latin1.jsonl").write_bytes(b'{"id": "a", "prompt": "caf\xe9"}\n')
    (d / "cols.tsv").write_text("ID\tPrompt\nx\ty\n")


def _model_folders(d: Path) -> None:
    import transformers

    from tuneshift.testing import tiny_tokenizer

    d.mkdir()
    tok = tiny_tokenizer()
    falcon = d / "falcon"
    cfg = transformers.FalconConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                    bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(falcon)
    tok.save_pretrained(falcon)
    broken = d / "broken_config"
    broken.mkdir()
    (broken / "config.json").write_text("{ this is not json")
    _truncated_gguf(d / "tiny.gguf")
    (d / "garbage.gguf").write_bytes(b"this is not a gguf file at all" * 10)


def _truncated_gguf(path: Path) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(96)
    writer.add_head_count(4)
    writer.add_tensor("token_embd.weight", np.random.default_rng(0).standard_normal((512, 64)).astype(np.float32))
    writer.add_tensor("output_norm.weight", np.ones(64, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a download or copy cut short


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _reference(root: Path, pickles: dict[str, bytes] | None = None, ratings: str | None = None,
               final: bool = True) -> None:
    """A minimal reference folder (FinalDataset, AnnotatedDataset, one attribution per model)."""
    (root / "datasets").mkdir(parents=True)
    if final:
        (root / "datasets" / "FinalDataset.tsv").write_text(
            "ID\tPrompt\tResponse\tInstruct&Context\nlima_1\tSay hi. Be brief.\tHi\tSay hi.\n")
    (root / "datasets" / "AnnotatedDataset.tsv").write_text(
        ratings if ratings is not None else "File\tModel\tRating\nlima_1.pkl\tvicuna_7B\t1\n")
    good = pickle.dumps({"ID": "lima_1", "Input": ["\u2581Say", "\u2581hi", ".", "\u2581Be", "\u2581brief", "."],
                         "Output": ["\u2581Hi"], "Explain": np.array([[10], [3], [0], [0], [1], [0]])})
    for model in ("ifa_llama_7b", "ifa_vicuna_7b"):
        (root / "attributions" / model).mkdir(parents=True)
        (root / "attributions" / model / "lima_1.pkl").write_bytes((pickles or {}).get(model, good))


# {"ID": ..., "Explain": bytearray(2_000_000_000)} in 129 bytes: only allowed globals, 2 GB if built
BYTEARRAY_BOMB = (b"\x80\x02}q\x00(X\x02\x00\x00\x00IDq\x01X\x06\x00\x00\x00lima_1q\x02X\x05\x00\x00\x00Inputq\x03"
                  b"]q\x04"
                  b"X\x01\x00\x00\x00xq\x05aX\x06\x00\x00\x00Outputq\x06]q\x07X\x01\x00\x00\x00yq\x08aX\x07\x00\x00\x00"
                  b"Explainq\tc__builtin__\nbytearray\nq\nJ\x00\x945w\x85q\x0bRq\x0cu.")


def _references(d: Path) -> None:
    _reference(d / "ok")
    (d / "no_datasets").mkdir(parents=True)
    _reference(d / "no_final", final=False)
    _reference(d / "evil", {"ifa_llama_7b": pickle.dumps(_Evil())})
    _reference(d / "bomb", {"ifa_llama_7b": BYTEARRAY_BOMB})
    _reference(d / "cut", {"ifa_llama_7b": pickle.dumps({"ID": "lima_1", "Input": ["x"] * 50})[:40]})
    _reference(d / "notdict", {"ifa_llama_7b": pickle.dumps([1, 2, 3])})
    _reference(d / "badshape", {"ifa_llama_7b": pickle.dumps(
        {"ID": "lima_1", "Input": ["\u2581Say"], "Output": ["\u2581Hi"], "Explain": np.zeros((3, 3))})})
    _reference(d / "ratings_nan", ratings="File\tModel\tRating\nlima_1.pkl\tvicuna_7B\tgood\n")
    _reference(d / "ratings_cols", ratings="a\tb\n1\t2\n")


class Case(NamedTuple):
    id: str
    script: str
    args: list[str]
    code: int
    pattern: str
    env: dict = {}
    readonly: str | None = None
    after: str | None = None  # a case that must finish first


def _fixtures(tmp: Path) -> None:
    """Every file the cases name under ``{tmp}``."""
    _data_files(tmp / "data")
    _model_folders(tmp / "models")
    _references(tmp / "refs")
    (tmp / "other_settings").mkdir()
    (tmp / "other_settings" / "settings.json").write_text(json.dumps({"hash": "0123456789abcdef"}))
    (tmp / "a_file").write_text("x")
    (tmp / "empty_dir").mkdir()


def _j(name: str) -> list[str]:
    return [TINY[0], TINY[2], "data=jsonl", f"data.path={{tmp}}/data/{name}.jsonl"]


def _base(path: str) -> list[str]:
    return TINY + [f"model.models.base.path={path}"]


T, P, R = "tuneshift", "tuneshift-paper-tables", "tuneshift-report"
SAL = ["plugins=[saliency]", *TINY[:2]]
DONE = "hydra.run.dir={tmp}/runs/done"
CASES = [
    # ---- the config: typos, types, ranges ----
    Case("typo_key", T, TINY + ["run.bach_size=3"], 1, r"Key 'bach_size' not in 'RunConfig'"),
    Case("wrong_type", T, TINY + ["run.batch_size=many"], 1, r"run\.batch_size"),
    Case("plugin_option_type", T, ["plugins=[saliency]", "plugins.saliency.b=abc"], 1, r"plugins\.saliency\.b"),
    Case("plugin_option_typo", T, TINY + ["plugins.residual_norm.colour=red"], 1, r"plugins\.residual_norm\.colour"),
    Case("unknown_model_config", T, ["model=no_such_pair"], 1, r"model/no_such_pair"),
    Case("unknown_plugin", T, ["plugins=[no_such_plugin]"], 1, r"no_such_plugin"),
    Case("unknown_experiment", T, ["experiment=no_such_experiment"], 1, r"no_such_experiment"),
    Case("override_syntax", T, TINY + ["data.limit=[1,"], 2, r"cannot parse the override 'data\.limit=\[1,'"),
    Case("hydra_flags_conflict", T, ["-m", "--cfg", "job"], 2, r"Only one of --run, --multirun, --cfg"),
    Case("limit_zero", T, TINY[:-3] + ["data.limit=0"], 2, r"data\.limit=0.*positive"),
    Case("limit_negative", T, TINY[:-3] + ["data.limit=-1"], 2, r"data\.limit=-1.*positive"),
    Case("batch_size_zero", T, TINY + ["run.batch_size=0"], 2, r"run\.batch_size=0"),
    Case("gen_batch_size_zero", T, TINY + ["generation.batch_size=0"], 2, r"generation\.batch_size=0"),
    Case("max_new_tokens_zero", T, TINY + ["generation.max_new_tokens=0"], 2, r"generation\.max_new_tokens=0"),
    Case("threads_negative", T, TINY + ["run.threads=-2"], 2, r"run\.threads=-2"),
    Case("saliency_b_range", T, SAL + ["plugins.saliency.b=11"], 2, r"saliency\.b=11"),
    Case("saliency_target", T, SAL + ["plugins.saliency.target=nope"], 2, r"saliency\.target='nope'"),
    Case("saliency_ratings_missing", T, SAL + ["plugins.saliency.ratings=/no/ratings.tsv"], 2,
         r"ratings file '/no/ratings\.tsv' does not exist"),
    Case("logger_unknown", T, TINY + ["logger.kind=nosuch"], 2, r"unknown logger 'nosuch'"),
    Case("pairs_unknown_key", T, TINY + ["model.pairs=[[base,nosuch]]"], 2, r"model\.pairs entry \['base', 'nosuch'\]"),
    Case("plugins_env_missing", T, TINY, 2, r"TUNESHIFT_PLUGINS: plugin file '/no/such/nope\.py' does not exist",
         {"TUNESHIFT_PLUGINS": "/no/such/nope.py"}),
    # ---- data ----
    Case("jsonl_without_path", T, TINY[:1] + ["data=jsonl", "plugins=[residual_norm]"], 2, r"set data\.path="),
    Case("jsonl_missing_file", T, TINY[:1] + ["data=jsonl", "data.path=/no/such.jsonl"], 2,
         r"'/no/such\.jsonl' does not exist"),
    Case("jsonl_is_a_folder", T, TINY[:1] + ["data=jsonl", "data.path={tmp}/empty_dir"], 2, r"is a folder, not a file"),
    Case("unknown_format", T, TINY + ["data.format=nosuch"], 2, r"unknown dataset format 'nosuch'"),
    Case("jsonl_empty", T, _j("empty"), 2, r"empty\.jsonl.* holds no prompts"),
    Case("jsonl_blank_lines", T, _j("blank"), 2, r"blank\.jsonl.* holds no prompts"),
    Case("jsonl_bad_json", T, _j("badjson"), 2, r"badjson\.jsonl:2: not valid JSON"),
    Case("jsonl_array_line", T, _j("array"), 2, r"array\.jsonl:1: .*a JSON object"),
    Case("jsonl_no_prompt", T, _j("noprompt"), 2, r"noprompt\.jsonl:1: .*\"prompt\""),
    Case("jsonl_no_id", T, _j("noid"), 2, r"noid\.jsonl:1: .*\"id\""),
    Case("instructions_string", T, _j("instr_str"), 2, r"instr_str\.jsonl:1: .*\"instructions\" must be a list"),
    Case("instructions_number", T, _j("instr_num"), 2, r"instr_num\.jsonl:1: .*\"instructions\""),
    Case("duplicate_ids", T, _j("dup"), 2, r"dup\.jsonl: the prompt id .a. on line 3 is already used on line 1"),
    Case("instruction_not_in_prompt", T, _j("notfound"), 2, r"'Translate it\.' does not occur"),
    Case("span_out_of_range", T, _j("span_out"), 2, r"span \(0, 99\) lies outside"),
    Case("span_malformed", T, _j("span_bad"), 2, r"span_bad\.jsonl:1: .*\"instruction_spans\""),
    Case("spans_string", T, _j("span_str"), 2, r"span_str\.jsonl:1: .*\"instruction_spans\""),
    Case("prompt_not_string", T, _j("prompt_num"), 2, r"prompt_num\.jsonl:1: .*\"prompt\" must be"),
    Case("prompt_empty", T, _j("prompt_empty"), 2, r"prompt_empty\.jsonl:1: .*empty"),
    Case("split_not_string", T, _j("split_num"), 2, r"split_num\.jsonl:1: .*\"split\""),
    Case("not_utf8", T, _j("latin1"), 2, r"latin1\.jsonl.*UTF-8"),
    Case("final_dataset_columns", T, TINY[:1] + ["data=final_dataset", "data.path={tmp}/data/cols.tsv"], 2,
         r"missing columns \['Instruct&Context'\]"),
    Case("no_such_split", T, TINY + ["data.splits=[nosuch]"], 2, r"data\.splits.*'nosuch'.*builtin"),
    Case("no_such_id", T, TINY + ["data.ids=[nosuch]"], 2, r"data\.ids.*'nosuch'"),
    Case("prompt_past_context", T, ["model=tiny_random_gpt2", "plugins=[residual_norm]", "run.progress=false",
                                    "generation.max_new_tokens=8", "data=jsonl", "data.path={tmp}/data/long.jsonl"],
         2, r"prompt 'long' .*tokens.*context of 256.*generation\.truncate_prompts=true"),
    # ---- models ----
    Case("model_path_missing", T, _base("./no/such/model"), 2, r"'\./no/such/model' does not exist"),
    Case("model_folder_empty", T, _base("{tmp}/empty_dir"), 2, r"has no config\.json"),
    Case("model_config_corrupt", T, _base("{tmp}/models/broken_config"), 2, r"config\.json.*not a valid JSON"),
    Case("tiny_random_unknown", T, _base("tiny-random:bert"), 2, r"tiny-random family 'bert' unknown"),
    Case("hub_id_not_cached", T, _base("nosuchorg/nosuchmodel"), 2,
         r"nosuchorg/nosuchmodel.*local cache only \(HF_HUB_OFFLINE=1\)"),
    Case("unknown_dtype", T, TINY + ["model.models.base.dtype=float8"], 2, r"unknown dtype 'float8'"),
    Case("unknown_device", T, TINY + ["model.models.base.device=banana"], 2, r"device 'banana'"),
    Case("cuda_absent", T, TINY + ["model.models.base.device=cuda"], 2, r"device 'cuda'.*CUDA is not available"),
    Case("falcon", T, _base("{tmp}/models/falcon"), 2, r"no adapter for model_type 'falcon'\. Supported: .*llama"),
    Case("falcon_saliency", T, ["plugins=[saliency]", "model.models.base.path={tmp}/models/falcon", *TINY[:2]], 2,
         r"no adapter for model_type 'falcon'"),
    Case("tiny_random_bad_seed", T, _base("tiny-random:llama:x"), 2, r"integer seed"),
    Case("gguf_truncated", T, _base("{tmp}/models/tiny.gguf"), 2, r"tiny\.gguf.* truncated or corrupt"),
    Case("gguf_garbage", T, _base("{tmp}/models/garbage.gguf"), 2, r"garbage\.gguf.* not a GGUF file"),
    # ---- run folders ----
    Case("other_settings_folder", T, TINY + ["hydra.run.dir={tmp}/other_settings"], 2,
         r"holds results of other settings"),
    Case("run_root_is_a_file", T, TINY + ["run.root={tmp}/a_file"], 2, r"a_file.*(not a folder|cannot write)"),
    Case("finished_run_setup", T, TINY + [DONE], 0, r"results in"),
    Case("finished_run_read_only", T, TINY + [DONE], 2,
         r"run folder .*done' is not writable \(Read-only file system\); it holds the finished results", {},
         "{tmp}/runs/done", "finished_run_setup"),
    # ---- tuneshift-paper-tables ----
    Case("paper_no_args", P, [], 2, r"--reference"),
    Case("paper_missing_reference", P, ["--reference", "/no/such/ref"], 2, r"/no/such/ref.* does not exist"),
    Case("paper_no_datasets", P, ["--reference", "{tmp}/refs/no_datasets"], 2, r"FinalDataset\.tsv' does not exist"),
    Case("paper_no_final", P, ["--reference", "{tmp}/refs/no_final"], 2, r"FinalDataset\.tsv' does not exist"),
    Case("paper_evil_pickle", P, ["--reference", "{tmp}/refs/evil"], 2, r"refusing to load (posix|os)\.system"),
    Case("paper_allocation_bomb", P, ["--reference", "{tmp}/refs/bomb"], 2, r"lima_1\.pkl: .*2000000000 bytes"),
    Case("paper_truncated_pickle", P, ["--reference", "{tmp}/refs/cut"], 2, r"lima_1\.pkl.* truncated or not a pickle"),
    Case("paper_not_a_dict", P, ["--reference", "{tmp}/refs/notdict"], 2, r"expected a dict"),
    Case("paper_bad_shape", P, ["--reference", "{tmp}/refs/badshape"], 2, r"Explain has shape"),
    Case("paper_rating_not_number", P, ["--reference", "{tmp}/refs/ratings_nan"], 2, r"a rating is not a number"),
    Case("paper_rating_columns", P, ["--reference", "{tmp}/refs/ratings_cols"], 2,
         r"expected columns File, Model, Rating"),
    Case("paper_b_not_number", P, ["--reference", "{tmp}/refs/ok", "--b", "abc"], 2,
         r"argument --b: invalid float value: 'abc'"),
    Case("paper_b_range", P, ["--reference", "{tmp}/refs/ok", "--b", "11"], 2, r"--b 11.*\[0, 10\)"),
    Case("paper_p_range", P, ["--reference", "{tmp}/refs/ok", "--p", "0.5"], 2, r"--p 0\.5.*> 1"),
    Case("paper_limit_zero", P, ["--reference", "{tmp}/refs/ok", "--limit-per-split", "0"], 2,
         r"--limit-per-split 0.*positive"),
    Case("paper_out_under_a_file", P, ["--reference", "{tmp}/refs/ok", "--out", "{tmp}/a_file/t.json"], 2,
         r"cannot write the outputs .*a_file'"),
    # ---- tuneshift-report ----
    Case("report_no_args", R, [], 2, r"the following arguments are required: dirs"),
    Case("report_missing_dir", R, ["/no/such/run"], 2, r"/no/such/run is not a directory"),
    Case("report_a_file", R, ["{tmp}/a_file"], 2, r"a_file is not a directory"),
    Case("report_empty_dir", R, ["{tmp}/empty_dir"], 2, r"no run"),
    Case("report_bad_option", R, ["--colour", "{tmp}"], 2, r"unrecognized arguments: --colour"),
]


def _fill(value, tmp: Path):
    if isinstance(value, str):
        return value.replace("{tmp}", str(tmp))
    if isinstance(value, list):
        return [_fill(v, tmp) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, tmp) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> tuple[dict, Path]:
    tmp = tmp_path_factory.mktemp("bad_inputs")
    _fixtures(tmp)
    payload = [{"id": c.id, "script": c.script, "args": _fill(c.args, tmp), "env": _fill(c.env, tmp),
                "readonly": _fill(c.readonly, tmp), "after": c.after, "cwd": str(tmp)} for c in CASES]
    (tmp / "cases.json").write_text(json.dumps(payload))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "TUNESHIFT_CACHE": str(tmp / "cache")}
    env.pop("HYDRA_FULL_ERROR", None)
    subprocess.run([sys.executable, str(HARNESS), str(tmp / "cases.json"), str(tmp / "results.json")], env=env,
                   check=True, timeout=1500, cwd=tmp)
    return {r["id"]: r for r in json.loads((tmp / "results.json").read_text())}, tmp


def test_at_least_forty_bad_inputs_through_the_three_scripts():
    bad = [c for c in CASES if c.code != 0]
    assert len(bad) >= 40 and len({c.id for c in CASES}) == len(CASES)
    assert {c.script for c in bad} == {T, P, R}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(results, case):
    got = results[0][case.id]
    output = got["stdout"] + got["stderr"]
    where = f"{case.id}: {case.script} {' '.join(case.args)}\n{output[-3000:]}"
    assert "Traceback" not in output, where
    assert got["code"] == case.code, f"exit {got['code']} (wanted {case.code}) {where}"
    assert re.search(case.pattern, output, re.S), f"{case.pattern!r} not found: {where}"
    if case.code == 2 and case.script == T:  # one line, ours
        assert len([line for line in got["stderr"].splitlines() if line.startswith("tuneshift: error:")]) == 1, where


@pytest.mark.parametrize("script, args, pattern", [
    (T, TINY + ["data.limit=0"], r"tuneshift: error: data\.limit=0"),
    (P, ["--reference", "/no/such/ref"], r"does not exist"),
    (R, ["/no/such/run"], r"is not a directory"),
])
def test_the_installed_console_scripts_behave_like_the_harness(tmp_path, script, args, pattern):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    done = subprocess.run([str(BIN / script), *args], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)
    assert done.returncode == 2 and re.search(pattern, done.stderr) and "Traceback" not in done.stderr, done.stderr


def test_hydra_full_error_shows_the_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HYDRA_FULL_ERROR": "1"}
    done = subprocess.run([str(BIN / "tuneshift"), *TINY, "run.batch_size=0"], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)
    assert done.returncode != 0 and "Traceback" in done.stderr and "run.batch_size=0" in done.stderr
