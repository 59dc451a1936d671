"""A stand-in for NDIF, so ``run.remote=ndif`` is exercised end to end without a server.

It replaces the one network step of nnsight's ``RemoteBackend`` (``request``: websocket and HTTP) and nothing
else. The client side is nnsight's own: meta weights, the model key, serialisation (``RemoteBackend._serialize``,
the exact bytes that would be POSTed: the trace's source and the values it references, tuneshift's functions by
value), decoding the result (``RemoteBackend.finalize``) and pushing it into the caller's frame. The server is a
separate process, as NDIF's is, in which **tuneshift cannot be imported** (a server has nnsight, torch and
transformers only): it loads real copies of the hosted weights, rebuilds each request against them, applies the
request's environment (attention implementation), runs it and returns the saved values as ``torch.save`` bytes.

``python tests/fake_ndif.py OUT`` (with ``HF_HUB_CACHE`` pointing at a fresh folder, since a remote model is named
by a hub id): puts two tiny random models into that hub cache, runs one job with ``run.remote=ndif`` against the
fake server and the same job with ``run.remote=off`` on the same weights, captures with ``tuneshift.capture(...,
remote="ndif")``, and makes one request with tuneshift *not* shipped by value (the server must refuse it); writes
both run folders and ``OUT/requests.json`` for ``tests/test_remote.py`` to check.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

REPOS = {"tiny-org/base": ("llama", 0), "tiny-org/tuned": ("llama", 1)}


def hub_cache(repos: dict[str, tuple[str, int]] = REPOS) -> dict[str, Path]:
    """Write tiny random models into ``$HF_HUB_CACHE`` under hub ids; returns each id's snapshot folder."""
    from huggingface_hub import constants

    from tuneshift.testing import save_tiny_model

    folders = {}
    for repo, (family, seed) in repos.items():
        root = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
        snapshot = root / "snapshots" / ("0" * 40)
        save_tiny_model(snapshot, family, seed)
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / "main").write_text("0" * 40)
        folders[repo] = snapshot
    return folders


class _Blocked:
    """A meta-path finder that makes ``tuneshift`` unimportable, as it is on an NDIF server."""

    def find_spec(self, name: str, path: Any = None, target: Any = None):
        if name == "tuneshift" or name.startswith("tuneshift."):
            raise ModuleNotFoundError(f"No module named {name!r} (the fake NDIF server has no tuneshift)")
        return None


def _send(stream: Any, payload: Any) -> None:
    data = pickle.dumps(payload)
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()


def _receive(stream: Any) -> Any:
    head = stream.read(8)
    if len(head) < 8:
        raise EOFError("the other side closed the pipe")
    return pickle.loads(stream.read(struct.unpack("<Q", head)[0]))


def serve(folders: dict[str, str]) -> None:
    """The server process: hosts ``folders`` under their hub ids and answers requests on stdin/stdout."""
    sys.meta_path.insert(0, _Blocked())  # before anything: this process never has tuneshift
    protocol = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # whatever the libraries print goes to stderr, never into the protocol
    from nnsight import TransformersModel
    from nnsight.schema.request import RequestModel
    from nnsight.tracing.tracer import _saves, dec, inc
    from transformers import AutoTokenizer

    torch.set_num_threads(1)  # as the client's jobs (run.threads=1): the same kernels, so bit-equal results
    hosted = {repo: TransformersModel(folder, tokenizer=AutoTokenizer.from_pretrained(folder),
                                      task="text-generation", dispatch=True) for repo, folder in folders.items()}
    requests = sys.stdin.buffer
    while True:
        try:
            message = _receive(requests)
        except EOFError:
            return
        try:
            lm = hosted[message["repo"]]
            lm._remoteable_set_env(message["env"])
            restored = RequestModel.deserialize(message["blob"], lm._remoteable_persistent_objects(),
                                                compress=message["compress"])
            inc()
            try:
                restored.execute(restored.info.code)
                saves = {k: v for k, v in restored.info.frame.f_locals.items() if id(v) in _saves()}
            finally:
                dec()
            buffer = io.BytesIO()
            torch.save(saves, buffer)
            data = buffer.getvalue()
            if message["compress"]:
                import zstandard

                data = zstandard.ZstdCompressor().compress(data)
            _send(protocol, {"result": data})
        except Exception as err:  # noqa: BLE001 -- the client raises it, as nnsight's RemoteError would
            _send(protocol, {"error": f"{type(err).__name__}: {err}"})


class FakeNDIF:
    """A server process hosting ``folders`` under their hub ids; ``requests`` logs what each request shipped."""

    def __init__(self, folders: dict[str, Path]):
        script = [sys.executable, __file__, "--serve", json.dumps({k: str(v) for k, v in folders.items()})]
        self.process = subprocess.Popen(script, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.repos = list(folders)
        self.requests: list[dict] = []

    def install(self) -> None:
        """Route every ``remote=True`` trace here (and answer the hub's id lookup for the model key)."""
        import nnsight.modeling.huggingface as hf
        from nnsight.intervention.backends.remote import RemoteBackend, RemoteError

        for repo in self.repos:
            hf._ID_CACHE[repo] = repo
        server = self

        def request(backend, request, tracer):  # replaces RemoteBackend.request (websocket + HTTP)
            blob = backend._serialize(tracer)  # exactly the bytes RemoteBackend would POST
            repo = json.loads(request.model_key.split(":", 1)[1])["repo_id"]
            server.requests.append({"repo": repo, "bytes": len(blob), "env": request.env,
                                    "compressed": request.compress})
            _send(server.process.stdin, {"repo": repo, "env": request.env, "compress": request.compress,
                                         "blob": blob})
            answer = _receive(server.process.stdout)
            if "error" in answer:
                raise RemoteError(answer["error"])
            return backend.finalize(answer["result"])

        RemoteBackend.request = request

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def main(out: Path) -> None:
    from omegaconf import OmegaConf

    from tuneshift.api import capture
    from tuneshift.cli import run_config
    from tuneshift.config import validate

    folders = hub_cache()
    offline = _offline_error()  # before the fake answers the hub's id lookup
    server = FakeNDIF(folders)
    server.install()
    plugins = {"residual_norm": {}, "token_shift": {"attribution": False}, "layer_lens": {"adl_positions": 2}}
    for mode, paths in (("ndif", {k: k for k in folders}), ("off", {k: str(v) for k, v in folders.items()})):
        cfg = validate(OmegaConf.create({
            "model": {"name": "tiny", "models": {"base": {"name": "b", "path": paths["tiny-org/base"]},
                                                 "tuned": {"name": "t", "path": paths["tiny-org/tuned"]}},
                      "pairs": [["base", "tuned"]]},
            "data": {"limit": 3}, "generation": {"max_new_tokens": 4, "response_source": "tuned"},
            "run": {"root": str(out), "name": mode, "batch_size": 2, "progress": False, "report": False,
                    "remote": mode, "threads": 1},
            "logger": {"kind": "local"}, "plugins": plugins}))
        run_config(cfg, out / mode)
    log = {"requests": list(server.requests), "offline": offline}
    prompts, probes = ["Name three colours.", "Write a haiku"], ["blocks.1.hook_resid_post", "logits"]
    remote = capture("tiny-org/tuned", prompts, probes, remote="ndif")
    here = capture(str(folders["tiny-org/tuned"]), prompts, probes)
    log["capture_max_abs_diff"] = max(float((remote[k] - here[k]).abs().max()) for k in here)
    log["control"] = _unregistered_trace()  # without tuneshift shipped by value the server must fail
    server.close()
    (out / "requests.json").write_text(json.dumps(log))


def _offline_error() -> str:
    """What ``run.remote=ndif`` says when the hub cannot be asked for the model's canonical id (offline)."""
    from tuneshift.loading import ModelLoadError, ModelSpec
    from tuneshift.remote import load_remote

    try:
        load_remote(ModelSpec(path="tiny-org/base"))
    except ModelLoadError as err:
        return str(err)
    return "no error"


def _unregistered_trace() -> str:
    """Run one remote probe trace with tuneshift *not* registered for pickling by value; the server's error."""
    from cloudpickle.cloudpickle import _PICKLE_BY_VALUE_MODULES
    from nnsight.intervention.backends.remote import RemoteError

    import tuneshift.remote
    from tuneshift.adapters import ModelAdapter
    from tuneshift.loading import ModelSpec
    from tuneshift.probes import Probe, ProbeRegistry

    model, _, lm = tuneshift.remote.load_remote(ModelSpec(path="tiny-org/base"))
    _PICKLE_BY_VALUE_MODULES.discard("tuneshift")
    tuneshift.remote.ship_by_value = lambda: None  # the registry imports it at call time: now a no-op
    ids = torch.tensor([[1, 2, 3]])
    try:
        ProbeRegistry(ModelAdapter(model), {"x": [Probe("logits")]}).run(lm, ids, torch.ones_like(ids), ids - 1,
                                                                         remote=True)
    except RemoteError as err:
        return str(err)
    return "no error"


if __name__ == "__main__":
    if sys.argv[1] == "--serve":
        serve(json.loads(sys.argv[2]))
    else:
        main(Path(sys.argv[1]))
