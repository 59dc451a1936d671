"""The ``tuneshift`` command: a Hydra app composing model pair x data x plugins x logger.

    tuneshift                                   # the embedded default, offline, a few minutes on 2 cores
    tuneshift model=smollm2_135m_instruct plugins=[saliency] data.limit=6
    tuneshift -m model=tiny_random,tiny_random_gpt2   # a sweep, one job per model family

This module is the only place that turns a Hydra config into objects (:func:`build_runner`); everything after
is plain Python (:class:`tuneshift.runner.Runner`). A user error (:class:`tuneshift.errors.TuneshiftError`,
a missing config value) prints one message and exits with status 2; ``HYDRA_FULL_ERROR=1`` shows the traceback.
"""
from __future__ import annotations

import hashlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never fetch from a hub unless the user says so

import hydra  # noqa: E402
from hydra.experimental.callback import Callback  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException  # noqa: E402

from tuneshift.config import GenerationConfig, RunConfig, register_configs, validate  # noqa: E402
from tuneshift.errors import TuneshiftError  # noqa: E402

log = logging.getLogger("tuneshift")
SWEEP_ENV = "TUNESHIFT_SWEEP_ID"


def _sweep_id(*, _root_: DictConfig) -> str:
    """One id per multirun, from its (unexpanded) overrides, shared with every job process it launches."""
    if SWEEP_ENV not in os.environ:
        overrides = sorted(str(o) for o in _root_.hydra.overrides.task)
        os.environ[SWEEP_ENV] = "sweep-" + hashlib.sha1("\n".join(overrides).encode()).hexdigest()[:8]
    return os.environ[SWEEP_ENV]


def _register() -> None:
    register_configs()
    if not OmegaConf.has_resolver("sweep_id"):
        OmegaConf.register_new_resolver("sweep_id", _sweep_id)


def _job(cfg: DictConfig, output_dir: Path, hydra_cfg: Any = None):
    from hydra.types import RunMode

    from tuneshift.loggers import JobInfo

    sweep = hydra_cfg is not None and hydra_cfg.mode == RunMode.MULTIRUN
    group = cfg.logger.group or (Path(hydra_cfg.sweep.dir).name if sweep else cfg.model.name)
    return JobInfo(name=output_dir.name, group=group, run_dir=output_dir,
                   config=OmegaConf.to_container(cfg, resolve=True), project=cfg.logger.project,
                   mode=cfg.logger.mode, tags=list(cfg.logger.tags), init_timeout=cfg.logger.init_timeout)


def build_runner(cfg: DictConfig, output_dir: str | Path, hydra_cfg: Any = None):
    """Every object a run needs, from a composed (or plain) config: plugins, models, prompts, store, logger."""
    from tuneshift.data import load_prompts
    from tuneshift.loggers import build_logger
    from tuneshift.plugin import build_plugins
    from tuneshift.results import ResultStore
    from tuneshift.runner import Runner

    cfg = _validated(cfg)
    output_dir = Path(output_dir)
    plugins = build_plugins(cfg.plugins)
    models = {key: OmegaConf.to_object(spec) for key, spec in cfg.model.models.items()}
    data = cfg.data
    prompts = load_prompts(data.format, data.path, data.limit, list(data.splits) or None, list(data.ids) or None)
    generation: GenerationConfig = OmegaConf.to_object(cfg.generation)
    settings: RunConfig = OmegaConf.to_object(cfg.run)
    runner = Runner(plugins, models, prompts, pairs=[tuple(p) for p in cfg.model.pairs],
                    store=ResultStore(output_dir, create=False), generation=generation, settings=settings,
                    logger=lambda: build_logger(cfg.logger.kind, output_dir, _job(cfg, output_dir, hydra_cfg)),
                    provenance=OmegaConf.to_container(cfg, resolve=True))
    return runner


def _validated(cfg: Any) -> DictConfig:
    """``cfg`` typed by the schema (a config composed by Hydra already is)."""
    from tuneshift.config import TuneshiftConfig

    if isinstance(cfg, DictConfig) and OmegaConf.get_type(cfg) is TuneshiftConfig:
        return cfg
    return validate(cfg)


def run_config(cfg: Any, output_dir: str | Path | None = None, hydra_cfg: Any = None) -> dict:
    """Run the job ``cfg`` describes (a composed or plain config); returns the run summary."""
    cfg = _validated(cfg)
    output_dir = Path(output_dir or Path(cfg.run.root) / cfg.run.name)
    return build_runner(cfg, output_dir, hydra_cfg).run()


def _fail(err: TuneshiftError) -> None:
    """Print ``err`` as one message and exit 2 (re-raise it under ``HYDRA_FULL_ERROR=1``)."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise err
    report_error(err)
    raise SystemExit(2) from None


def ensure_folder(path: str | Path, what: str) -> None:
    """Create the folder ``path`` (and its parents), or a :class:`RunFolderError` saying why it cannot be."""
    from tuneshift.errors import RunFolderError

    path = Path(path)
    if path.is_dir():
        return  # the runner checks that it can write there, and what the folder holds
    blocker = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise RunFolderError(f"the {what} {str(path)!r} cannot be created: {str(blocker)!r} is a file, not a "
                             "folder; choose another run.root")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunFolderError(f"cannot write the {what} {str(path)!r} ({err.strerror}); choose a writable "
                             "run.root") from None


class RunFolderCheck(Callback):
    """Hydra callback: the run (or sweep) folder must be creatable before Hydra creates it, or one clear error.

    Hydra makes the job's folder and opens its log file before tuneshift's code runs; a failure there would
    print Hydra's traceback instead of tuneshift's message.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "run folder", "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "sweep folder", "hydra.sweep.dir")

    def _check(self, config: DictConfig, what: str, key: str) -> None:
        try:
            ensure_folder(str(OmegaConf.select(config, key)), what)
        except TuneshiftError as err:
            _fail(err)


def report_error(err: BaseException) -> None:
    """One clear line (or paragraph) on stderr, no traceback."""
    message = str(err).strip() or type(err).__name__
    if isinstance(err, MissingMandatoryValue):
        key = getattr(err, "full_key", "") or ""
        message = f"the config value {key or '(unknown key)'} is required; set it, e.g. {key or 'key'}=..."
    print(f"tuneshift: error: {message}", file=sys.stderr)


@hydra.main(version_base="1.3", config_path="pkg://tuneshift.conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        runner = build_runner(cfg, output_dir, hydra_cfg)
        summary = runner.run()
    except (TuneshiftError, MissingMandatoryValue, OmegaConfBaseException) as err:
        _fail(err)
    seconds = summary.get("timing", {}).get("seconds_total", 0.0)
    if runner.findings:
        print("tuneshift: findings")
        for finding in runner.findings:
            print(f"  {finding.text()}")
    print(f"tuneshift: results in {output_dir} (report: {output_dir}/report.html, {seconds:.1f} s)")


def main() -> None:
    """Console-script entry point: plugins are discovered before Hydra composes the config."""
    try:
        _check_overrides(sys.argv[1:])
        _register()
    except TuneshiftError as err:
        _fail(err)
    try:
        _hydra_main()
    except ValueError as err:  # Hydra's own checks of its flags raise before any job (and its error report) runs
        if not str(err).startswith(_HYDRA_USAGE_ERRORS):
            raise
        from tuneshift.errors import ConfigError

        _fail(ConfigError(f"{err} (see tuneshift --help)"))


_HYDRA_USAGE_ERRORS = ("Only one of --run, --multirun", "The --resolve flag")


def _check_overrides(argv: list[str]) -> None:
    """Each ``key=value`` argument parses as a Hydra override, or a :class:`ConfigError` naming it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from tuneshift.errors import ConfigError

    parser = OverridesParser.create()
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue  # flags (-m, --cfg job) and their values are Hydra's
        try:
            parser.parse_override(arg)
        except HydraException as err:  # the parser's syntax errors
            reason = str(err).splitlines()[0]
            raise ConfigError(f"cannot parse the override {arg!r} ({reason}); write key=value, quoting values with "
                              "special characters, e.g. 'data.path=\"my file.jsonl\"' (see "
                              "https://hydra.cc/docs/advanced/override_grammar/basic)") from None


if __name__ == "__main__":
    main()
