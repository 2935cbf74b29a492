"""`python -m job.report output_dir=OUT`: Hydra-configured like the job; a setting to fix is one line, exit 2."""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from job.__main__ import CONFIG_PATH
from job.config import load_report, register_configs
from job.errors import JobError

log = logging.getLogger("job.report")
register_configs()
_composed = False


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="report")
def main(cfg: DictConfig) -> None:
    from job.report import make_report

    global _composed
    _composed = True
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
    try:
        main()
    except SystemExit as exc:
        if exc.code == 1 and not _composed:  # Hydra could not compose the config: a setting to fix
            sys.exit(2)
        raise
