"""``tuneshift-report DIR...`` and the Hydra callback that writes a sweep's report when a multirun ends."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from tuneshift.report.collect import is_run_dir
from tuneshift.report.run_report import export_figures, write_report
from tuneshift.report.sweep import find_runs, write_sweep_report

log = logging.getLogger("tuneshift")

try:  # conf/config.yaml: hydra.callbacks.sweep_report._target_: tuneshift.report.SweepReportCallback
    from hydra.experimental.callback import Callback as _HydraCallback
except Exception:  # noqa: BLE001 -- the report works without Hydra
    _HydraCallback = object  # type: ignore[misc,assignment]


class SweepReportCallback(_HydraCallback):  # type: ignore[misc,valid-type]
    """After ``tuneshift -m ...``, write ``<hydra.sweep.dir>/sweep_report.html`` (sweep folders are
    ``<run.root>/sweeps/sweep-<hash>/<job>-<hash>/``). With a launcher that submits and returns (SLURM), run
    ``tuneshift-report <sweep dir>`` once the jobs are done instead."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        try:
            print(f"tuneshift: sweep report {write_sweep_report(config.hydra.sweep.dir)}")
        except Exception as err:  # noqa: BLE001 -- the jobs' results are on disk already
            log.warning("sweep report failed: %s", err)


def sweeps(folder: Path) -> list[Path]:
    """``folder`` itself when it holds runs directly (a sweep folder), else each of its sub-folders that holds
    runs (``<run.root>/sweeps`` holds one folder per sweep): a report never mixes two sweeps."""
    children = [c for c in sorted(folder.iterdir()) if c.is_dir()]
    if any(is_run_dir(c) for c in children):
        return [folder]
    return [c for c in children if find_runs(c)]


def main(argv: Sequence[str] | None = None) -> int:
    """``tuneshift-report DIR...``: a run folder gets ``report.html``, a sweep folder ``sweep_report.html``."""
    parser = argparse.ArgumentParser(prog="tuneshift-report", description=main.__doc__)
    parser.add_argument("dirs", nargs="+", type=Path, help="run folders or sweep folders")
    parser.add_argument("--figures", action="store_true", help="also copy every figure into <run>/figures/")
    parser.add_argument("--no-refresh", action="store_true", help="sweep: do not rewrite each job's report")
    args = parser.parse_args(argv)
    status = 0
    for d in args.dirs:
        if not d.is_dir():
            print(f"tuneshift-report: {d} is not a directory", file=sys.stderr)
            status = 2
        elif is_run_dir(d):
            print(write_report(d, export=args.figures))
        elif sweeps(d):
            for sweep in sweeps(d):
                print(write_sweep_report(sweep, refresh_runs=not args.no_refresh))
                for run_dir in find_runs(sweep) if args.figures else []:
                    export_figures(run_dir)
        else:
            print(f"tuneshift-report: no run (settings.json, config.yaml or summary.json) under {d}",
                  file=sys.stderr)
            status = 2
    return status


__all__ = ["SweepReportCallback", "main", "sweeps"]
