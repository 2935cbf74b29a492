"""Errors that mean "fix this setting", shared by the driver and the workers.

Kept free of heavy imports so the driver can catch them without loading torch.
"""


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
