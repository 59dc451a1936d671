"""The Python API: tuneshift in a notebook, in a few lines (the way ``inseq`` and TransformerLens read).

What it is for
    * :func:`compare` runs plugins over a base and a tuned model and returns a :class:`Results` object: every
      plugin's tables, arrays and JSON in memory, the headline findings, ``.report()`` for the HTML page.
    * :func:`attribute` returns the exact gradient x input matrix of one prompt and response, with its tokens.
    * :func:`capture` returns captured activations at named sites (TransformerLens names work too), like
      ``run_with_cache``.

Canonical pattern::

    import tuneshift as ts

    results = ts.compare(base="tiny-random:llama:0", tuned="tiny-random:llama:1",
                         plugins=["saliency", "residual_norm"], prompts="builtin", limit=4)
    results.findings                      # ["[saliency] instruction score: base ... -> tuned ..., ...", ...]
    results["saliency"]["tuned"]["scores"]  # a DataFrame
    results.report()                      # path of report.html

    attribution = ts.attribute("tiny-random:llama", "Write a haiku about the sea.", max_new_tokens=8)
    attribution.matrix                    # [n_prompt_tokens, n_response_tokens] float64
    cache = ts.capture("tiny-random:llama", ["Hello there"], probes=["blocks.1.hook_resid_post"])
    cache["blocks.1.hook_resid_post"]     # [1, T, d_model]

Gotchas: a model is a hub id, a local folder, a GGUF, ``tiny-random:<family>[:seed]``, a :class:`ModelSpec`, or
(for :func:`attribute` and :func:`capture`) an already loaded ``(model, tokenizer)`` pair. :func:`compare`
loads one model at a time (it needs specs, not loaded models) and writes its results to ``out`` (default
``outputs/<base>-vs-<tuned>-<settings hash>``), so a repeated call resumes instead of recomputing.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from tuneshift.config import GenerationConfig, RunConfig
from tuneshift.data import Prompt, encode_prompt, left_pad, load_prompts
from tuneshift.errors import ConfigError
from tuneshift.fingerprint import fingerprint
from tuneshift.loading import ModelSpec, load_model
from tuneshift.plugin import Plugin, plugin_class

ModelLike = Any  # str | ModelSpec | tuple[model, tokenizer]


def as_spec(model: str | ModelSpec, name: str | None = None, **spec: Any) -> ModelSpec:
    """A :class:`ModelSpec` from a path-like string (or a spec, with fields replaced)."""
    if isinstance(model, ModelSpec):
        return dataclasses.replace(model, **({"name": name} if name else {}), **spec)
    if not isinstance(model, (str, Path)):
        raise ConfigError(f"a model is a path, hub id, 'tiny-random:<family>' or ModelSpec, got {type(model).__name__}")
    return ModelSpec(name=name or str(model).rstrip("/").split("/")[-1].replace(":", "-"), path=str(model), **spec)


def load(model: ModelLike, **spec: Any) -> tuple[Any, Any]:
    """``(model, tokenizer)`` ready for tuneshift (eval, frozen, left padding); a loaded pair passes through."""
    if isinstance(model, tuple) and len(model) == 2:
        return model
    return load_model(as_spec(model, **spec), spec.get("attn_implementation"))


def as_prompts(prompts: str | Iterable[str | dict | Prompt] | None, limit: int | None = None) -> list[Prompt]:
    """Prompts from a dataset format id (``"builtin"``), strings, ``{"id", "prompt", "instructions"}`` dicts."""
    from tuneshift.data import DATASETS

    if prompts is None or isinstance(prompts, str) and prompts in DATASETS:
        return load_prompts(prompts or "builtin", limit=limit)
    if isinstance(prompts, str):
        prompts = [prompts]
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, Prompt):
            out.append(p)
        elif isinstance(p, str):
            out.append(Prompt(f"p{i}", p, ()))
        elif isinstance(p, dict):
            from tuneshift.data import distinct_spans, find_span

            text = p["prompt"]
            pid = str(p.get("id", f"p{i}"))
            spans = distinct_spans([find_span(text, s, pid) for s in p.get("instructions", [])])
            out.append(Prompt(pid, text, spans, p.get("split", "default"), p.get("category", ""), p.get("reference")))
        else:
            raise ConfigError(f"prompt {i}: give a string, a dict with 'prompt', or a Prompt, not {type(p).__name__}")
    return out[:limit] if limit else out


def _plugins(plugins: Sequence[str | Plugin | type[Plugin]] | dict[str, dict]) -> list[Plugin]:
    if isinstance(plugins, dict):
        return [plugin_class(name)(options or {}) for name, options in plugins.items()]
    built = []
    for p in plugins:
        if isinstance(p, Plugin):
            built.append(p)
        elif isinstance(p, type) and issubclass(p, Plugin):
            built.append(p())
        else:
            built.append(plugin_class(str(p))())
    return built


# ---- compare --------------------------------------------------------------------------------------------------
class Results:
    """Everything a :func:`compare` run wrote, in memory: ``results[plugin][key][name]``.

    ``key`` is a model key (``"base"``, ``"tuned"``) or ``"compare"`` for the pair; ``name`` a result file's
    stem (a DataFrame for ``.parquet``, a dict for ``.json``, a dict of arrays for ``.npz``).
    """

    def __init__(self, run_dir: Path, summary: dict, findings: list[str]):
        self.run_dir = Path(run_dir)
        self.summary = summary
        self.findings = findings
        self._data: dict[str, dict[str, dict[str, Any]]] = {}
        for plugin_dir in sorted(p for p in self.run_dir.iterdir() if p.is_dir() and _is_plugin_dir(p)):
            self._data[plugin_dir.name] = _load_plugin(plugin_dir)

    def __getitem__(self, plugin: str) -> dict[str, dict[str, Any]]:
        if plugin not in self._data:
            raise KeyError(f"no results of plugin {plugin!r}; plugins: {', '.join(self._data) or '(none)'}")
        return self._data[plugin]

    def __contains__(self, plugin: object) -> bool:
        return plugin in self._data

    @property
    def plugins(self) -> list[str]:
        return list(self._data)

    def report(self, path: str | Path | None = None) -> Path:
        """Write the HTML report (``report.html`` in the run folder, or copied to ``path``)."""
        from tuneshift.report import write_report

        out = write_report(self.run_dir)
        if path is not None:
            Path(path).write_bytes(Path(out).read_bytes())
            return Path(path)
        return Path(out)

    def __repr__(self) -> str:
        lines = [f"Results({str(self.run_dir)!r}, plugins={self.plugins})"] + [f"  {f}" for f in self.findings]
        return "\n".join(lines)


def _is_plugin_dir(path: Path) -> bool:
    return any(path.rglob("_DONE"))


def _load_plugin(plugin_dir: Path) -> dict[str, dict[str, Any]]:
    import json

    import pandas as pd

    out: dict[str, dict[str, Any]] = {}
    for done in sorted(plugin_dir.rglob("_DONE")):
        folder = done.parent
        key = folder.relative_to(plugin_dir).as_posix()
        key = "compare" if key.startswith("compare/") and len(list(plugin_dir.glob("compare/*"))) == 1 else key
        files: dict[str, Any] = {}
        for f in sorted(folder.iterdir()):
            if f.suffix == ".parquet":
                files[f.stem] = pd.read_parquet(f)
            elif f.suffix == ".json":
                files[f.stem] = json.loads(f.read_text())
            elif f.suffix == ".npz":
                with np.load(f, allow_pickle=False) as data:
                    files[f.stem] = {k: data[k] for k in data.files}
        out[key] = files
    return out


def compare(base: ModelLike, tuned: ModelLike, plugins: Sequence[str | Plugin | type[Plugin]] | dict[str, dict] = (
        "saliency", "head_relations", "ffn_concepts"), prompts: Any = "builtin", *, limit: int | None = None,
        out: str | Path | None = None, generation: GenerationConfig | dict | None = None,
        settings: RunConfig | dict | None = None, logger: Any = None) -> Results:
    """Run ``plugins`` on ``base`` and ``tuned`` over ``prompts``; the results in memory (and on disk at ``out``)."""
    from tuneshift.results import ResultStore
    from tuneshift.runner import Runner

    models = {"base": as_spec(base), "tuned": as_spec(tuned)}
    built = _plugins(plugins)
    prompt_list = as_prompts(prompts, limit)
    gen = generation if isinstance(generation, GenerationConfig) else GenerationConfig(**(generation or {}))
    run = settings if isinstance(settings, RunConfig) else RunConfig(**{"progress": False, **(settings or {})})
    if out is None:
        tag = fingerprint(models, [p.text for p in prompt_list], gen, run, {p.name: p.options for p in built},
                          length=8)
        out = Path(run.root) / f"{models['base'].name}-vs-{models['tuned'].name}-{tag}"
    runner = Runner(built, models, prompt_list, store=ResultStore(out, create=False), pairs=[("base", "tuned")],
                    logger=logger, generation=gen, settings=run)
    summary = runner.run()
    return Results(Path(out), summary, [f.text() for f in runner.findings])


# ---- attribute ------------------------------------------------------------------------------------------------
@dataclass
class Attribution:
    """Gradient x input of one response: ``matrix[n, m]`` from prompt token n to response token m (float64)."""

    matrix: torch.Tensor                 # [N, M] over the prompt's content tokens (no BOS, no template)
    prompt_tokens: list[str]             # [N]
    response_tokens: list[str]           # [M]
    response: str
    target: str
    instruction: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))  # [N]

    def levels(self, b: float = 0.0) -> np.ndarray:
        """The paper's integer scores S (methods.md A.2): per response token, 0..10 of its own maximum, > b kept."""
        positive = np.clip(self.matrix.double().numpy(), 0.0, None)
        scores = np.ceil(10.0 * positive / (positive.max(axis=0, keepdims=True) + 1e-7))
        return np.where(scores > b, scores, 0.0)

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame(self.matrix.double().numpy(), index=self.prompt_tokens, columns=self.response_tokens)


def attribute(model: ModelLike, prompt: str | Prompt | dict, response: str | None = None, *, target: str = "prob",
              chat_template: bool = False, max_new_tokens: int = 32) -> Attribution:
    """Exact gradient x input of ``response`` (or the model's own greedy response) to ``prompt``."""
    from tuneshift.attribution import attribute as attribute_items
    from tuneshift.attribution import make_item
    from tuneshift.generation import generate_responses
    from tuneshift.runner import ModelRun

    hf_model, tokenizer = load(model)
    (p,) = as_prompts([prompt])
    encoded = encode_prompt(tokenizer, p, chat_template)
    if response is None:
        from tuneshift.adapters import ModelAdapter

        run = ModelRun("model", "model", ModelSpec(), hf_model, tokenizer, ModelAdapter(hf_model), chat_template,
                       [encoded])
        generate_responses(run, max_new_tokens, 1, progress=False)
    else:
        encoded.response_ids = torch.tensor(tokenizer(response, add_special_tokens=False)["input_ids"])
        encoded.response_text = response
    item = make_item(encoded.input_ids, encoded.response_ids, encoded.content_mask)
    (matrix,) = attribute_items(hf_model, [item], target=target, pad_token_id=tokenizer.pad_token_id)
    tokens = tokenizer.convert_ids_to_tokens(encoded.input_ids[encoded.content_mask].tolist())
    return Attribution(matrix.double(), tokens, tokenizer.convert_ids_to_tokens(encoded.response_ids.tolist()),
                       encoded.response_text or "", target, encoded.instruction_mask[encoded.content_mask])


# ---- capture --------------------------------------------------------------------------------------------------
class Cache(dict):
    """Captured tensors keyed by the names asked for, plus ``tokens`` and ``attention_mask`` (left padding)."""

    tokens: torch.Tensor
    attention_mask: torch.Tensor


def capture(model: ModelLike, prompts: str | Sequence[str], probes: Sequence[str | Any], *, batch_size: int = 8,
            chat_template: bool = False, remote: str = "off") -> Cache:
    """Activations at ``probes`` (site names or :class:`~tuneshift.probes.Probe` objects) for every prompt.

    One nnsight trace per batch; prompts are left-padded to a common length ``T``, so every tensor is
    ``[n_prompts, T, ...]`` with ``cache.attention_mask`` marking real tokens. ``remote`` as ``run.remote``
    (:mod:`tuneshift.remote`): ``"ndif"`` runs the traces on the NDIF host (``model`` is then a hub id).
    """
    from nnsight import TransformersModel

    from tuneshift.adapters import ModelAdapter
    from tuneshift.probes import Probe, ProbeRegistry
    from tuneshift.remote import check_remote, load_remote, nnsight_remote

    flag = nnsight_remote(remote)
    if flag is True:
        spec = as_spec(model)
        check_remote(remote, [], {"model": spec})
        hf_model, tokenizer, traced = load_remote(spec)
    else:
        hf_model, tokenizer = load(model)
        traced = TransformersModel(hf_model, tokenizer=tokenizer)
    wanted = [p if isinstance(p, Probe) else Probe(str(p)) for p in probes]
    encoded = [encode_prompt(tokenizer, p, chat_template) for p in as_prompts(prompts)]
    ids, mask, pos = left_pad([e.input_ids for e in encoded], tokenizer.pad_token_id)
    registry = ProbeRegistry(ModelAdapter(hf_model), {"api": wanted})
    parts: list[dict[str, torch.Tensor]] = []
    for start in range(0, len(encoded), batch_size):
        rows = slice(start, start + batch_size)
        parts.append(registry.run(traced, ids[rows], mask[rows], pos[rows], remote=flag)["api"])
    cache = Cache({key: torch.cat([part[key] for part in parts]) for key in parts[0]})
    cache.tokens, cache.attention_mask = ids, mask
    return cache


__all__ = ["Attribution", "Cache", "Results", "as_prompts", "as_spec", "attribute", "capture", "compare", "load"]
