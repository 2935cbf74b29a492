"""Killing a job the way an outage does."""

from __future__ import annotations

import os
import signal
import subprocess

import psutil


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL the driver and everything it started: Ray's GCS, raylet and workers."""
    try:
        tree = [process.pid, *(child.pid for child in psutil.Process(process.pid).children(recursive=True))]
    except psutil.NoSuchProcess:
        tree = [process.pid]
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=30)
