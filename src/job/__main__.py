"""`python -m job video_dir=... output_dir=...`: compose the config, check it, run.

A `JobError` is something the user must change: one line, exit code 2. Ctrl-C is one line and exit
code 130. Anything else is a bug and keeps its traceback (exit code 1).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from job import hydra_cli
from job.config import load, register_configs
from job.errors import JobError

log = logging.getLogger("job")
register_configs()
# Installed, the config is the package job.configs (pyproject.toml maps configs/ to it). Run from a
# source tree with PYTHONPATH=src (as `ray job submit --working-dir .` does, see README), it is the
# tree's configs/ directory.
CONFIG_PATH = ("pkg://job.configs" if importlib.util.find_spec("job.configs")
               else str(Path(__file__).resolve().parents[2] / "configs"))


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="config")
def main(cfg: DictConfig) -> None:
    from job.run import run

    hydra_cli.composed()
    try:
        settings = load(cfg)
        sweeping = HydraConfig.get().mode == RunMode.MULTIRUN
        if sweeping:  # each combination gets its own output_dir (and manifest) under the given one
            job = HydraConfig.get().job
            name = job.override_dirname.replace("/", "_") or f"job{job.num}"
            settings.output_dir = f"{settings.output_dir.rstrip('/')}/{name}"
        run(settings, keep_ray=sweeping)  # a sweep's jobs share one Ray runtime
    except JobError as exc:  # a setting to fix, not a bug: the message says which
        log.error("job stopped: %s", exc)
        sys.exit(2)
    except KeyboardInterrupt:  # Ray's actors are gone by now (the pool's finally); committed parts stay
        log.error("interrupted; everything committed so far is kept: rerun the same command to resume")
        sys.exit(130)
    except Exception:
        log.exception("job failed; output_dir=%s", cfg.get("output_dir"))
        raise


def cli() -> None:
    """main, with Hydra's own errors (an unknown key or preset, a value of the wrong type) one line and
    the exit code of a setting to fix."""
    hydra_cli.run(main, "python -m job")
    _exit_now(0)


def _exit_now(code: int) -> None:
    """Exit without the interpreter's teardown of torch and Ray (about a second, benchmarks/throughput.md):
    everything the job wrote is already closed and synced, so only the logs and streams need flushing."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    cli()
