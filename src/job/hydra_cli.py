"""Hydra's start-up errors (an unknown key or preset, a value of the wrong type) as one line and exit 2.

Hydra prints several lines and exits 1 when it cannot compose the config, before the command's own code
runs; a user should read one line saying what to change, like every other setting to fix.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from typing import TextIO


class _HeldStderr:
    """Keeps what is written to stderr until the config is composed; then writes straight through."""

    def __init__(self, real: TextIO) -> None:
        self.real, self.held, self.holding = real, [], True

    def write(self, text: str) -> int:
        if self.holding:
            self.held.append(text)
            return len(text)
        return self.real.write(text)

    def release(self) -> str:
        """Stops holding; returns what was held."""
        self.holding = False
        return "".join(self.held)

    def __getattr__(self, name: str):  # flush, isatty, fileno, encoding: the real stream's
        return getattr(self.real, name)


_held: _HeldStderr | None = None


def composed() -> None:
    """Called first thing in a @hydra.main body: the config is composed, stderr is the user's again."""
    global _held
    if _held is not None and _held.holding:
        _held.real.write(_held.release())
        sys.stderr = _held.real


def run(main: Callable[[], None], help_command: str) -> None:
    """Runs a @hydra.main function; what Hydra could not compose is one line on stderr and exit code 2."""
    global _held
    _held = _HeldStderr(sys.stderr)
    sys.stderr = _held
    try:
        main()
    except SystemExit as exc:
        if exc.code == 1 and _held.holding:
            said = _held.release()
            sys.stderr = _held.real
            print(one_line(said, help_command), file=sys.stderr)
            sys.exit(2)
        raise
    finally:
        if _held.holding:  # --help, or an exit before composing: show what was said, as said
            _held.real.write(_held.release())
        sys.stderr = _held.real


def one_line(hydra_says: str, help_command: str) -> str:
    """The reason in Hydra's message, in one line that says what to change."""
    lines = [line.strip() for line in hydra_says.splitlines()
             if line.strip() and not line.startswith("Set the environment variable HYDRA_FULL_ERROR")]
    text = "\n".join(lines)
    if (match := re.search(r"Could not override '([^']+)'", text)) and re.search(r"Key '[^']+' not in '", text):
        return f"unknown setting {match.group(1)}: check its spelling ({help_command} --help lists the settings)"
    if match:
        reason = next((line for line in lines[1:] if not line.startswith(("To append", "full_key", "reference_type",
                                                                          "object_type"))), "")
        return f"cannot set {match.group(1)}: {reason}".rstrip(": ")
    if match := re.search(r"Could not find '([^']+)'", text):
        group = match.group(1).split("/")[0]
        options = re.search(rf"Available options in '{re.escape(group)}':\n(.*?)(?:\nConfig search path|$)", text,
                            re.S)
        names = [o.strip() for o in options.group(1).splitlines()] if options else []
        names = [name for name in names if name and not name.startswith("base_")]
        return f"{match.group(0)}: choose one of {', '.join(names)}" if names else match.group(0)
    if re.search(r"mismatched input|no viable alternative|extraneous input|token recognition error", text):
        return (f"cannot read the command line ({lines[0]}): quote a value holding '=', spaces or brackets, "
                f"e.g. output_dir='out/score_threshold=0.3'")
    if match := re.search(r"Error merging override (\S+)\n(.*)", text):
        return f"{match.group(1)}: {match.group(2)}"
    return lines[0] if lines else "the configuration could not be composed"
