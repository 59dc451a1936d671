"""The report: one self-contained HTML page per run (``report.html``) and one per sweep (``sweep_report.html``).

What it is for
    Reading a run's results without a notebook. The pages open offline (images are base64, HTML views are
    embedded as ``<iframe srcdoc>``, small tables carry their whole CSV) and are rendered from Jinja2
    templates (``templates/``) with autoescaping.

Plugin-owned sections
    The report core knows no plugin by name. Each plugin declares what it shows (``Plugin.section(ctx, key)``
    -> :class:`tuneshift.sections.Section`: title, explanation, headline findings, figures, tables, views,
    notes), which the runner stores as ``<run>/<plugin>/<key>/section.json``; the report renders those, and a
    folder without one falls back to :func:`tuneshift.sections.files_section`. A broken file shows as an
    error box; it never breaks the page.

Modules, one job each
    :mod:`.assets` files -> embeddable pieces (figures, table previews, views, the byte budget);
    :mod:`.collect` a run folder -> its models, pairs, plugins and rendered sections;
    :mod:`.run_report` the run page, ``export_figures``, ``log_report`` (W&B via the logger's ``log_html``);
    :mod:`.sweep` the sweep page (one row per job, the settings that differ, the numbers across jobs);
    :mod:`.cli` the ``tuneshift-report`` command and the Hydra :class:`SweepReportCallback`.

Command line::

    tuneshift-report outputs/tiny_pair-organism-0b57b2ff          # a run folder: its report.html
    tuneshift-report outputs/sweeps/sweep-1a2b3c4d                # a sweep folder: sweep_report.html
    tuneshift-report outputs/tiny_pair-organism-0b57b2ff --figures   # also copy every figure to figures/
"""
from tuneshift.report.cli import SweepReportCallback, main
from tuneshift.report.collect import RunInfo, load_run
from tuneshift.report.run_report import build_report_html, export_figures, log_report, write_report
from tuneshift.report.sweep import find_runs, sweep_rows, write_sweep_report

__all__ = ["RunInfo", "SweepReportCallback", "build_report_html", "export_figures", "find_runs", "load_run",
           "log_report", "main", "sweep_rows", "write_report", "write_sweep_report"]
