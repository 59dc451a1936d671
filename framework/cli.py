"""The ``tuneshift`` command: a Hydra app composing model pair x data x plugins x logger.

    tuneshift                                   # the embedded default, offline, a few minutes on 2 cores
    tuneshift model=smollm2_135m_instruct plugins=[saliency] data.limit=6
    tuneshift -m model=tiny_random,tiny_random_gpt2   # a sweep, one job per model family
"""
from __future__ import annotations

import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never fetch from a hub unless the user says so

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from tuneshift.config import register_configs  # noqa: E402

register_configs()
log = logging.getLogger("tuneshift")


@hydra.main(version_base="1.3", config_path="pkg://tuneshift.conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from tuneshift.runner import run

    output_dir = HydraConfig.get().runtime.output_dir
    summary = run(cfg, output_dir)
    seconds = summary.get("timing", {}).get("seconds_total", 0.0)
    print(f"tuneshift: results in {output_dir} (report: {output_dir}/report.html, {seconds:.1f} s)")


if __name__ == "__main__":
    main()
