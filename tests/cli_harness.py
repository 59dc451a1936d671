"""Run many console-script invocations cheaply: import once, fork one child per case.

    python tests/cli_harness.py cases.json results.json

Each case (a JSON object) names a console script (``tuneshift``, ``tuneshift-report``,
``tuneshift-paper-tables``), its ``args``, extra ``env``, a ``cwd``, optionally ``readonly`` (a folder
mounted read-only for that case only: a private bind mount in the child's own mount namespace when running as
root, else the folder's write bits cleared), ``after`` (a case that must finish first) and ``kill``
(``{"path": substring, "nth": 1, "when": "mid" | "after"}``: the child kills itself with SIGKILL at the
``nth`` atomic write of a file whose path holds ``substring``, halfway through writing its temporary file,
or right after the file is in place). Cases run ``CLI_HARNESS_JOBS`` (default 1) at a time. The child runs
the script's entry point exactly as the generated console script does (``sys.exit(entry())``; an uncaught
exception prints its traceback and exits 1) with its stdout and stderr sent to files. The parent pays the
import of torch, transformers, Hydra and tuneshift once (and of the model families' modules), so eighty
cases take about a minute instead of six; each case still gets a fresh process.
"""
from __future__ import annotations

import ctypes
import importlib
import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import traceback
from importlib.metadata import entry_points
from pathlib import Path

CLONE_NEWNS = 0x00020000
WARM_MODULES = (
    "transformers.core_model_loading", "transformers.models.auto.tokenization_auto",
    "transformers.tokenization_utils_fast", "transformers.generation.utils", "transformers.models.llama.modeling_llama",
    "transformers.models.gpt2.modeling_gpt2", "transformers.models.falcon.modeling_falcon", "nnsight",
    "matplotlib.pyplot", "gguf",
)


def _entry(script: str):
    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == script]
    return ep.load()


def _make_readonly(folder: str) -> None:
    """``folder`` read-only for this process only (a real read-only mount when possible)."""
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(CLONE_NEWNS) != 0:
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS) failed")
        subprocess.run(["mount", "--make-rprivate", "/"], check=True)
        subprocess.run(["mount", "--bind", "-o", "ro", folder, folder], check=True)
        return
    for root, dirs, files in os.walk(folder):
        for name in dirs + files + [""]:
            path = os.path.join(root, name)
            os.chmod(path, os.stat(path).st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def _install_kill(spec: dict) -> None:
    """SIGKILL this process at the ``nth`` atomic write of a matching file (``mid``: half its bytes written)."""
    import tuneshift.results as results

    original, seen = results.atomic_write_bytes, [0]

    def killing(path: Path, data: bytes) -> None:
        path = Path(path)
        hit = False
        if spec["path"] in str(path):
            seen[0] += 1
            hit = seen[0] == spec.get("nth", 1)
        if hit and spec.get("when", "mid") == "mid":
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, _ = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            os.write(fd, data[: len(data) // 2])
            os.fsync(fd)
            os.kill(os.getpid(), signal.SIGKILL)
        original(path, data)
        if hit:
            os.kill(os.getpid(), signal.SIGKILL)

    for module in list(sys.modules.values()):  # every module that imported the function by name
        if getattr(module, "atomic_write_bytes", None) is original:
            module.atomic_write_bytes = killing


def _child(case: dict, out: str, err: str) -> None:
    code = 1
    try:
        with open(out, "wb") as o, open(err, "wb") as e:
            os.dup2(o.fileno(), 1)
            os.dup2(e.fileno(), 2)
        os.chdir(case.get("cwd") or os.getcwd())
        os.environ.update(case.get("env") or {})
        if case.get("readonly"):
            _make_readonly(case["readonly"])
        if case.get("kill"):
            _install_kill(case["kill"])
        sys.argv = [case["script"], *case["args"]]
        try:
            result = _entry(case["script"])()
            code = result if isinstance(result, int) else 0 if result is None else 1
        except SystemExit as stop:
            if stop.code is None or isinstance(stop.code, int):
                code = stop.code or 0
            else:
                print(stop.code, file=sys.stderr)
                code = 1
        except BaseException:  # noqa: BLE001 -- what the interpreter does with an uncaught exception
            traceback.print_exc()
            code = 1
    finally:
        try:
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


class _Running:
    """One forked case: its pid, where its output goes, when it started."""

    def __init__(self, case: dict):
        self.case, self.tmp = case, tempfile.mkdtemp(prefix="case-")
        self.out, self.err = os.path.join(self.tmp, "out"), os.path.join(self.tmp, "err")
        sys.stdout.flush()
        sys.stderr.flush()
        self.started = time.monotonic()
        self.pid = os.fork()
        if self.pid == 0:
            _child(case, self.out, self.err)

    def poll(self, timeout: float) -> dict | None:
        done, status = os.waitpid(self.pid, os.WNOHANG)
        if not done and time.monotonic() - self.started < timeout:
            return None
        if not done:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        read = lambda path: Path(path).read_text(errors="replace") if os.path.exists(path) else ""  # noqa: E731
        result = {"id": self.case["id"], "code": os.waitstatus_to_exitcode(status) if done else 124,
                  "seconds": time.monotonic() - self.started, "stdout": read(self.out), "stderr": read(self.err)}
        shutil.rmtree(self.tmp, ignore_errors=True)
        return result


def run_cases(cases: list[dict], timeout: float, jobs: int) -> list[dict]:
    """Every case, ``jobs`` at a time; a case with ``after`` waits until that case has finished."""
    results: dict[str, dict] = {}
    pending, running = list(cases), []
    while pending or running:
        ready = [c for c in pending if c.get("after") in (None, *results)]
        while ready and len(running) < jobs:
            case = ready.pop(0)
            pending.remove(case)
            running.append(_Running(case))
        for run in list(running):
            result = run.poll(timeout)
            if result is not None:
                results[result["id"]] = result
                running.remove(run)
        time.sleep(0.02)
    return [results[c["id"]] for c in cases]


def main() -> None:
    cases = json.loads(Path(sys.argv[1]).read_text())
    timeout = float(os.environ.get("CLI_HARNESS_CASE_TIMEOUT", "240"))
    import hydra  # noqa: F401 -- imports paid once, before forking
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import tuneshift.report  # noqa: F401
    import tuneshift.runner  # noqa: F401
    from tuneshift.plugin import available_plugins

    available_plugins()  # imports every plugin module (scipy, pandas, matplotlib ...)
    for name in WARM_MODULES:  # transformers imports each model family on first use: seconds per child
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    for script in {c["script"] for c in cases}:
        _entry(script)
    results = run_cases(cases, timeout, int(os.environ.get("CLI_HARNESS_JOBS", "1")))
    Path(sys.argv[2]).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
