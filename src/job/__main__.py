"""`python -m job video_dir=... output_dir=...`: compose the config, validate it, run."""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from job.config import register_configs, validate

log = logging.getLogger("job")
register_configs()


@hydra.main(version_base="1.3", config_path="../../configs", config_name="config")
def main(cfg: DictConfig) -> None:
    from job.errors import OutputWriteError, WeightsError
    from job.run import WorkersCannotStartError, run
    from job.write import OutputNotWritableError, SettingsMismatchError

    USER_ERRORS = (WeightsError, OutputWriteError, WorkersCannotStartError, OutputNotWritableError, SettingsMismatchError,
                   FileNotFoundError, ValueError)

    plain = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True, throw_on_missing=True)
    sweeping = HydraConfig.get().mode == RunMode.MULTIRUN
    if sweeping:  # each combination gets its own output_dir (and manifest) under the given one
        job = HydraConfig.get().job
        name = job.override_dirname.replace("/", "_") or f"job{job.num}"
        plain["output_dir"] = f"{plain['output_dir'].rstrip('/')}/{name}"
    try:
        validate(plain)
        run(plain, keep_ray=sweeping)  # a sweep's jobs share one Ray runtime
    except USER_ERRORS as exc:  # a setting to fix, not a bug: the message says which
        log.error("job stopped: %s", exc)
        sys.exit(2)
    except Exception:
        log.exception("job failed; output_dir=%s", plain["output_dir"])
        raise


if __name__ == "__main__":
    sys.exit(main())
