"""What every benchmark report carries: the machine and versions it ran on, printed and appended."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from importlib.metadata import version
from pathlib import Path

import psutil


def machine_line() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    libraries = ", ".join(f"{lib} {version(lib)}" for lib in ("torch", "torchvision", "decord", "ray"))
    return (f"Machine: {os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB, {gpu}, "
            f"{platform.platform()}; Python {platform.python_version()}, {libraries}")


def header(title: str, args: argparse.Namespace, inputs: str | None = None) -> list[str]:
    """A report's heading, the full command that reproduces it (every option, defaults too, not --out),
    the machine and versions, and what it ran on."""
    command = ["python", f"scripts/{Path(sys.argv[0]).name}"]
    for name, value in vars(args).items():
        if name == "out" or value is None or value is False or value == []:
            continue
        flag = "--" + name.replace("_", "-")
        if value is True:
            command.append(flag)
        elif isinstance(value, list):
            command += [flag, *map(str, value)]
        else:
            command += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    lines = [f"## {title}: {time.strftime('%Y-%m-%d')}", "", f"Command: `{' '.join(command)}`", machine_line()]
    return lines + ([f"Input: {inputs}"] if inputs else [])


def publish(lines: list[str], out: Path | None) -> None:
    """Print the report and, with --out, append it to the benchmarks/ file."""
    report = "\n".join(lines)
    print(report)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a") as handle:
            handle.write(report + "\n")
