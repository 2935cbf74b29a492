"""Errors that mean "fix this setting", shared by the driver and the workers.

Kept free of heavy imports so the driver can catch them without loading torch.
"""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (C++ and Ray errors carry pages of context)."""
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__


class FetchError(OSError):
    """An object-store video could not be copied to the worker."""


class WeightsError(RuntimeError):
    """The configured weights cannot be loaded; the message says what to pass instead."""


class OutputWriteError(RuntimeError):
    """output_dir stopped accepting writes (disk full, read-only, permissions) during the run."""

    @classmethod
    def from_os_error(cls, output_dir: object, exc: OSError) -> "OutputWriteError":
        return cls(
            f"cannot write to output_dir={output_dir}: {exc.strerror or exc} ({exc.filename}). Everything "
            f"committed so far is kept; free space or fix permissions and rerun the same command to resume"
        )
