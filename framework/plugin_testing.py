"""``PluginTestSuite``: the plugin contract as tests a plugin author inherits (like Lightning's or pytest's
own plugin test helpers).

What it is for
    A plugin is correct only if it also behaves inside the runner: its hooks run in the documented order, it
    writes results for every model and every pair, a re-run resumes instead of recomputing, its options have
    defaults and reject typos, and its report section is stored and renders. Subclass the suite in your test
    file and pytest collects every check, run on a tiny random pair (no download, a few seconds)::

        from tuneshift.plugin_testing import PluginTestSuite
        from my_package.my_probe import MyProbe

        class TestMyProbe(PluginTestSuite):
            plugin = MyProbe
            options = {"layer": 0}

Gotchas: the suite runs the plugin through :class:`tuneshift.runner.Runner` with instances, so the plugin does
not need to be registered; ``family``, ``n_prompts`` and ``max_new_tokens`` size the run.
"""
from __future__ import annotations

import dataclasses
import html
from pathlib import Path
from typing import Any, ClassVar

import pytest

from tuneshift.config import GenerationConfig, RunConfig
from tuneshift.data import load_prompts
from tuneshift.loading import ModelSpec
from tuneshift.plugin import HOOK_ORDER, Plugin, PluginError
from tuneshift.results import ResultStore
from tuneshift.runner import Runner

_RECORDED = [h for h in HOOK_ORDER if h != "probes"] + ["section"]


class _Recorder:
    """Wraps a plugin instance's hooks so every call is recorded as (hook, results key)."""

    def __init__(self, plugin: Plugin):
        self.calls: list[tuple[str, str]] = []
        for hook in _RECORDED:
            original = getattr(plugin, hook)

            def wrapped(*args: Any, _hook: str = hook, _original: Any = original) -> Any:
                self.calls.append((_hook, self.key_of(_hook, args)))
                return _original(*args)

            setattr(plugin, hook, wrapped)

    @staticmethod
    def key_of(hook: str, args: tuple) -> str:
        """``(ctx, model, ...)`` -> the model key; ``(ctx, base, tuned)`` -> the pair's key; ``(ctx, key)``."""
        if hook == "on_compare":
            return ResultStore.compare_key(args[1], args[2])
        if len(args) > 1:
            return str(getattr(args[1], "key", args[1]))
        return ""


class PluginTestSuite:
    """Checks ``plugin`` (with ``options``) against the runner's contract on a tiny random pair."""

    plugin: ClassVar[type[Plugin]]
    options: ClassVar[dict] = {}
    family: ClassVar[str] = "llama"
    n_prompts: ClassVar[int] = 3
    max_new_tokens: ClassVar[int] = 4

    # ---- the run every check reads --------------------------------------------------------------------------
    def make_runner(self, out: Path) -> tuple[Runner, _Recorder]:
        plugin = self.plugin(dict(self.options))
        recorder = _Recorder(plugin)
        models = {"base": ModelSpec(name="tiny-base", path=f"tiny-random:{self.family}:0"),
                  "tuned": ModelSpec(name="tiny-tuned", path=f"tiny-random:{self.family}:1")}
        runner = Runner([plugin], models, load_prompts("builtin", limit=self.n_prompts), store=ResultStore(out),
                        pairs=[("base", "tuned")], generation=GenerationConfig(max_new_tokens=self.max_new_tokens),
                        settings=RunConfig(progress=False, batch_size=2))
        return runner, recorder

    @pytest.fixture(scope="class")
    def finished(self, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[str, str]], Runner]:
        out = tmp_path_factory.mktemp(f"{self.plugin.name}-run")
        runner, recorder = self.make_runner(out)
        runner.run()
        return out, recorder.calls, runner

    # ---- the contract ---------------------------------------------------------------------------------------
    def test_has_a_name_and_options_with_defaults(self) -> None:
        assert self.plugin.name, "set the class attribute `name` (the id configs use)"
        assert dataclasses.is_dataclass(self.plugin.Options), "`Options` must be a dataclass"
        self.plugin.Options()  # every field has a default
        with pytest.raises(PluginError, match="bad options"):
            self.plugin({"no_such_option_" + self.plugin.name: 1})

    def test_hooks_run_in_the_documented_order(self, finished) -> None:
        _, calls, _ = finished
        names = [name for name, _ in calls]
        assert names[:2] == ["setup", "on_run_start"] and names[-2:] == ["on_run_end", "teardown"]
        for key in ("base", "tuned"):
            model_calls = [name for name, k in calls if k == key]
            assert model_calls[0] == "on_model_start" and model_calls[-2:] == ["on_model_end", "section"], model_calls
        assert names.index("on_compare") > max(i for i, n in enumerate(names) if n == "on_model_end")
        assert names.count("section") == 3  # base, tuned, the pair

    def test_results_are_written_for_every_model_and_the_pair(self, finished) -> None:
        out, _, _ = finished
        store = ResultStore(out)
        for key in ("base", "tuned", store.compare_key("base", "tuned")):
            assert store.is_done(self.plugin.name, key), f"{key} not marked done"
            assert (store.dir(self.plugin.name, key) / "section.json").is_file()
        files = [p for p in (out / self.plugin.name).rglob("*") if p.is_file() and p.name[0] not in "._"]
        assert any(p.name != "section.json" for p in files), "the plugin wrote no results of its own"

    def test_a_second_run_resumes_without_recomputing(self, finished) -> None:
        out, _, _ = finished
        runner, recorder = self.make_runner(out)
        runner.run()
        redone = [name for name, _ in recorder.calls if name in ("on_model_start", "on_model_end", "on_compare")]
        assert redone == [], f"a finished run was recomputed: {redone}"

    def test_its_report_section_renders(self, finished) -> None:
        from tuneshift.report import write_report

        out, _, _ = finished
        store = ResultStore(out)
        section = store.load_section(self.plugin.name, store.compare_key("base", "tuned"))
        assert section is not None and section.title
        page = Path(write_report(out)).read_text()
        assert html.escape(section.title) in page
        for headline in section.headlines:
            assert html.escape(headline.label) in page


__all__ = ["PluginTestSuite"]
