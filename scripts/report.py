"""What every benchmark report carries: the machine and versions it ran on, printed and appended."""

from __future__ import annotations

import os
import platform
from importlib.metadata import version
from pathlib import Path

import psutil


def machine_line() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    libraries = ", ".join(f"{lib} {version(lib)}" for lib in ("torch", "torchvision", "decord", "ray"))
    return (f"Machine: {os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB, {gpu}, "
            f"{platform.platform()}; Python {platform.python_version()}, {libraries}")


def publish(lines: list[str], out: Path | None) -> None:
    """Print the report and, with --out, append it to the benchmarks/ file."""
    report = "\n".join(lines)
    print(report)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a") as handle:
            handle.write(report + "\n")
