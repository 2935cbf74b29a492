"""What a user must fix (`JobError`: one line, exit 2) versus everything else (a bug: traceback, exit 1).

Kept free of heavy imports so the driver can catch these without loading torch.
"""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (C++ and Ray errors carry pages of context)."""
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__


class JobError(Exception):
    """A mistake in the user's settings or environment; the message says what to change."""


class ConfigError(JobError):
    """A setting that composes but cannot work (a value out of range, an impossible combination)."""


class VideoDirError(JobError):
    """video_dir does not exist or cannot be listed."""


class WeightsError(JobError):
    """The configured weights cannot be loaded; the message says what to pass instead."""


class OutputNotWritableError(JobError):
    """output_dir cannot be written at start-up."""


class OutputNotOursError(JobError):
    """output_dir holds files this job did not write; writing into it could overwrite them."""


class OutputBusyError(JobError):
    """Another run is writing into output_dir."""


class SettingsMismatchError(JobError):
    """output_dir holds results made with different detection settings."""


class WorkersCannotStartError(JobError):
    """No Ray worker could start (the model would not load on them, or they all died)."""


class OutputWriteError(JobError):
    """output_dir stopped accepting writes (disk full, read-only, permissions) during the run."""

    @classmethod
    def from_os_error(cls, output_dir: object, exc: OSError) -> "OutputWriteError":
        return cls(
            f"cannot write to output_dir={output_dir}: {exc.strerror or exc} ({exc.filename}). Everything "
            f"committed so far is kept; free space or fix permissions and rerun the same command to resume"
        )


class FetchError(OSError):
    """An object-store video could not be copied to the worker (a fact about this video, not a setting)."""
