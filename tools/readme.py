"""README result blocks: every number the README prints is rendered from committed result files.

A block is delimited in ``README.md`` by markers, on their own lines or inline within a sentence::

    <!-- results:paper_tables -->
    ...rendered markdown, never edited by hand...
    <!-- /results -->

Each block name has a renderer (``@renderer("paper_tables")``: ``fn(root) -> markdown``) that reads only
committed files (JSON under ``docs/results/``, ``benchmarks/results/*.md`` written by
``benchmarks/run_all.sh``), and optionally a collector (``@collector("organism")``: ``fn(root, source)``)
that turns the tool's own outputs into those committed files. Renderers and collectors live in
``tools/blocks/<name>.py`` (one module per job, found automatically); adding a README table is adding a
module there and its markers in the README.

    python -m tools.readme                       # rewrite every block of README.md from the committed results
    python -m tools.readme --check               # exit 1 (and show the diff) when a block is stale
    python -m tools.readme --collect paper_tables --source ../shared/reference   # refresh docs/results/...
    python -m tools.readme --collect organism --source outputs/tiny_pair-organism
    python -m tools.readme --list                # block names, renderers and collectors

The default test suite (``tests/test_readme_results.py``) fails when the README and the committed results
disagree.
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import pkgutil
import re
import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = "docs/results"
BLOCK = re.compile(r"<!-- results:(?P<name>[A-Za-z0-9_.-]+) -->(?P<body>.*?)<!-- /results -->", re.DOTALL)
OPEN = re.compile(r"<!-- results:(?P<name>[A-Za-z0-9_.-]+) -->")

Renderer = Callable[[Path], str]
Collector = Callable[[Path, Path], Path]
RENDERERS: dict[str, Renderer] = {}
COLLECTORS: dict[str, Collector] = {}


class ReadmeError(ValueError):
    """A README block or a result file is malformed; the message names it and the fix."""


def renderer(name: str) -> Callable[[Renderer], Renderer]:
    """Register ``fn(root) -> markdown`` as the renderer of block ``name``."""
    def register(fn: Renderer) -> Renderer:
        if name in RENDERERS and RENDERERS[name] is not fn:
            raise ReadmeError(f"README block {name!r} has two renderers ({RENDERERS[name].__module__}, "
                              f"{fn.__module__}); give one of them another name")
        RENDERERS[name] = fn
        return fn
    return register


def collector(name: str) -> Callable[[Collector], Collector]:
    """Register ``fn(root, source) -> written file`` as the collector of the results behind ``name``."""
    def register(fn: Collector) -> Collector:
        COLLECTORS[name] = fn
        return fn
    return register


def load_blocks() -> None:
    """Import every module of ``tools.blocks`` (each registers its renderers and collectors)."""
    import tools.blocks as package

    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")


def block_names(text: str) -> list[str]:
    """Names of the blocks in ``text``, in order; an opening marker without its closing one is an error."""
    names = [m.group("name") for m in BLOCK.finditer(text)]
    opened = [m.group("name") for m in OPEN.finditer(text)]
    if opened != names:
        unclosed = [n for n in opened if opened.count(n) > names.count(n)]
        raise ReadmeError(f"README block(s) {sorted(set(unclosed))} have no closing '<!-- /results -->' marker")
    return names


def render_text(text: str, root: Path = ROOT) -> str:
    """``text`` with every block's body replaced by its renderer's output.

    A block whose body starts on a new line is a multi-line block (the output goes on its own lines);
    otherwise it is inline (the output replaces the words between the markers, stripped).
    """
    load_blocks()
    block_names(text)

    def replace(match: re.Match) -> str:
        name = match.group("name")
        if name not in RENDERERS:
            raise ReadmeError(f"README block {name!r} has no renderer; add tools/blocks/<module>.py with "
                              f"@renderer({name!r}) (known: {', '.join(sorted(RENDERERS))})")
        out = RENDERERS[name](root).strip("\n")
        body = f"\n{out}\n" if match.group("body").startswith("\n") else out.strip()
        return f"<!-- results:{name} -->{body}<!-- /results -->"

    return BLOCK.sub(replace, text)


def stale_blocks(root: Path = ROOT, readme: str = "README.md") -> tuple[str, str]:
    """``(current, rendered)`` README texts."""
    current = (root / readme).read_text(encoding="utf-8")
    return current, render_text(current, root)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.readme", description=__doc__.split("\n\n")[0])
    parser.add_argument("--readme", default="README.md", help="file holding the blocks, relative to the repo")
    parser.add_argument("--check", action="store_true", help="only check; exit 1 when a block is stale")
    parser.add_argument("--collect", metavar="NAME", help="refresh the committed results of NAME first")
    parser.add_argument("--source", type=Path, help="what --collect reads (a reference folder, a run folder)")
    parser.add_argument("--list", action="store_true", help="list blocks, renderers and collectors")
    args = parser.parse_args(argv)
    load_blocks()
    if args.list:
        text = (ROOT / args.readme).read_text(encoding="utf-8")
        print("blocks in", args.readme + ":", ", ".join(block_names(text)))
        print("renderers:", ", ".join(sorted(RENDERERS)), "| collectors:", ", ".join(sorted(COLLECTORS)))
        return 0
    try:
        if args.collect:
            if args.collect not in COLLECTORS:
                raise ReadmeError(f"no collector {args.collect!r}; known: {', '.join(sorted(COLLECTORS))}")
            if args.source is None:
                raise ReadmeError("--collect needs --source (what to read the results from)")
            print("wrote", COLLECTORS[args.collect](ROOT, args.source.expanduser().resolve()))
        current, rendered = stale_blocks(ROOT, args.readme)
    except (ReadmeError, OSError) as err:
        print(f"tools.readme: error: {err}", file=sys.stderr)
        return 2
    if current == rendered:
        print(f"{args.readme}: every results block is up to date")
        return 0
    if args.check:
        sys.stdout.writelines(difflib.unified_diff(current.splitlines(True), rendered.splitlines(True),
                                                   args.readme, f"{args.readme} (rendered)"))
        print(f"\n{args.readme} is stale: run `python -m tools.readme`", file=sys.stderr)
        return 1
    (ROOT / args.readme).write_text(rendered, encoding="utf-8")
    print(f"{args.readme}: results blocks rewritten")
    return 0


if __name__ == "__main__":  # run the importable module's main: the blocks register into tools.readme, not __main__
    from tools.readme import main as _main

    raise SystemExit(_main())
