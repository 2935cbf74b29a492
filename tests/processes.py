"""Killing a job the way an outage does."""

from __future__ import annotations

import ctypes
import os
import select
import signal
import subprocess
import time
from pathlib import Path

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



IN_CREATE = 0x100


def stop_inside_a_staged_write(process: subprocess.Popen, staging: Path, pattern: str, timeout: float) -> bool:
    """Freeze the job's Ray workers (SIGSTOP) while a file matching `pattern` is staged in `staging` but not
    yet renamed into place; True once they are frozen so, False if the job ended or `timeout` passed.

    Polling and then killing lands after the write has finished (a part is written and fsynced in about a
    millisecond): inotify wakes this process as the staged file is created, the workers (found beforehand)
    are stopped at once, and the file's presence is checked on the frozen job; if the rename won the race,
    the workers go on and the next write is tried.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    deadline = time.monotonic() + timeout
    while not staging.is_dir():
        if process.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    fd = libc.inotify_init1(os.O_NONBLOCK)
    assert fd >= 0, os.strerror(ctypes.get_errno())
    try:
        assert libc.inotify_add_watch(fd, str(staging).encode(), IN_CREATE) >= 0
        workers: list[psutil.Process] = []
        found_at = 0.0
        while process.poll() is None and time.monotonic() < deadline:
            if time.monotonic() - found_at > 0.5:  # Ray starts its workers as it goes
                workers, found_at = _ray_workers(process), time.monotonic()
            ready, _, _ = select.select([fd], [], [], 0.1)
            if not ready:
                continue
            os.read(fd, 65536)
            for worker in workers:
                _signal(worker, signal.SIGSTOP)
            _wait_until_stopped(workers)  # a signal lands asynchronously: the rename could still win meanwhile
            if any(staging.glob(pattern)):
                return True
            for worker in workers:
                _signal(worker, signal.SIGCONT)
        return False
    finally:
        os.close(fd)


def _ray_workers(process: subprocess.Popen) -> list[psutil.Process]:
    try:
        children = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    workers = []
    for child in children:
        try:
            if child.name().startswith("ray::") or "default_worker.py" in " ".join(child.cmdline()):
                workers.append(child)
        except psutil.Error:
            pass
    return workers


def _wait_until_stopped(workers: list[psutil.Process], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    for worker in workers:
        while time.monotonic() < deadline:
            try:
                if worker.status() in (psutil.STATUS_STOPPED, psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
                    break
            except psutil.NoSuchProcess:
                break
            time.sleep(0.0005)


def _signal(worker: psutil.Process, signum: int) -> None:
    try:
        os.kill(worker.pid, signum)
    except ProcessLookupError:
        pass
