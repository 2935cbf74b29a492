"""`python -m job.report output_dir=OUT`: Hydra-configured like the job; a setting to fix is one line, exit 2."""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from job import hydra_cli
from job.__main__ import CONFIG_PATH
from job.config import load_report, register_configs
from job.errors import JobError

log = logging.getLogger("job.report")
register_configs()


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="report")
def main(cfg: DictConfig) -> None:
    from job.report import make_report

    hydra_cli.composed()
    try:
        index = make_report(load_report(cfg))
    except JobError as exc:
        log.error("report stopped: %s", exc)
        sys.exit(2)
    except KeyboardInterrupt:
        log.error("interrupted; run the same command again to make the report")
        sys.exit(130)
    log.info("report: %s", index)


if __name__ == "__main__":
    hydra_cli.run(main, "python -m job.report")
