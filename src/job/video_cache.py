"""Local files of object-store videos for the decoders: a copy per worker, or one per node that its
workers share (`VideoCache`); the driver never touches the bytes."""

from __future__ import annotations

import fcntl
import hashlib
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from job.errors import FetchError
from job.storage import atomic_write, download, is_uri


@contextmanager
def local_copy(path: str) -> Iterator[str]:
    """A local file for the decoders: the path itself, or a temporary copy of an object-store URI.

    Each worker streams its own video from the store; the driver never touches the bytes.
    """
    if not is_uri(path):
        yield path
        return
    with tempfile.NamedTemporaryFile(suffix=Path(path).suffix, prefix="job-video-") as local:
        _download(path, local)
        yield local.name


def _download(uri: str, target: IO[bytes]) -> None:
    try:
        download(uri, target)
    except OSError as exc:
        raise FetchError(str(exc)) from exc


class VideoCache:
    """One local copy per node of each object-store video its workers are reading.

    The segments of a split video run on several workers, often on one node: they share one copy
    instead of each fetching the whole object (reading in place with ranged GETs measured slower:
    every segment's packet scan reads the whole file; benchmarks/object_store.md). A copy is kept
    while any worker reads it (a shared flock on its lock file) and dropped when a worker of the node
    starts on another video, so a node holds at most one copy per worker, plus the last one read.
    Lock files stay (empty) until `clear`, so every process always locks the same inode.
    """

    STALE_AFTER_S = 24 * 3600  # a crashed run's directory, removed by the next run on the node

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        for other in self.root.parent.iterdir():
            if other != self.root and other.is_dir() and time.time() - other.stat().st_mtime > self.STALE_AFTER_S:
                shutil.rmtree(other, ignore_errors=True)

    @contextmanager
    def local_copy(self, path: str, version: str | None) -> Iterator[str]:
        """The video as a local file; `version` (its fingerprint) names the copy, so a changed
        object is fetched again."""
        if not is_uri(path) or version is None:
            with local_copy(path) as local:
                yield local
            return
        name = hashlib.sha1(f"{path}\0{version}".encode()).hexdigest()[:20]
        copy = self.root / f"{name}{Path(path).suffix}"
        with open(self.root / f"{name}.lock", "a+b") as lock, open(self.root / f"{name}.fetch", "a+b") as fetch:
            # One worker fetches while the others wait for its copy: on a lock of its own, so that they
            # never wait for the workers already reading (an exclusive lock on `lock` would).
            fcntl.flock(fetch, fcntl.LOCK_EX)
            try:
                fcntl.flock(lock, fcntl.LOCK_SH)  # held before looking: no other worker can drop it now
                if not copy.exists():
                    self._drop_unused(keep=name)
                    atomic_write(copy, lambda handle: _download(path, handle), self.root)
            except BaseException:
                fcntl.flock(lock, fcntl.LOCK_UN)
                raise
            finally:
                fcntl.flock(fetch, fcntl.LOCK_UN)
            try:
                yield str(copy)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _drop_unused(self, keep: str) -> None:
        for lock_path in self.root.glob("*.lock"):
            if lock_path.stem == keep:
                continue
            with open(lock_path, "a+b") as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # being read
                for copy in self.root.glob(f"{lock_path.stem}.*"):
                    if copy.suffix not in (".lock", ".fetch"):
                        copy.unlink(missing_ok=True)

    def clear(self) -> None:
        """At the end of the run: every copy and lock of this run on this node."""
        shutil.rmtree(self.root, ignore_errors=True)
