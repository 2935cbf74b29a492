"""`python -m job.evaluate output_dir=OUT ground_truth=PATH`: Hydra-configured like the job; a setting to
fix is one line, exit 2."""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from job import hydra_cli
from job.__main__ import CONFIG_PATH
from job.config import load_evaluate, register_configs
from job.errors import JobError

log = logging.getLogger("job.evaluate")
register_configs()


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from job.evaluate import evaluate_run, headline
    from job.output import OutputDir

    hydra_cli.composed()
    try:
        settings = load_evaluate(cfg)
        result = evaluate_run(OutputDir(settings.output_dir), settings)
    except JobError as exc:
        log.error("evaluation stopped: %s", exc)
        sys.exit(2)
    log.info("%s", headline(result))
    log.info("evaluation: %s/evaluation/", settings.output_dir)


if __name__ == "__main__":
    hydra_cli.run(main, "python -m job.evaluate")
