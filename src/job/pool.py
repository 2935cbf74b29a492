"""The actor pool's state and dispatch: idle, running and recovering actors, attempts and retries.

Apart from Ray (as Ray Data keeps `_ActorPool` apart from its operator), so retries and recovery
can be tested with fake actors. `execute.RayBackend` is the real backend.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable, Iterator
from typing import Any, Protocol

from job.discover import Video
from job.errors import WorkersCannotStartError
from job.write import VideoStatus

log = logging.getLogger(__name__)

Ref = Hashable


class ActorDied(Exception):
    """The actor's process died during the call (killed, out of memory, crashed in native code)."""


class CallFailed(Exception):
    """The call raised inside a live actor: a bug outside the per-video error handling."""


class Backend(Protocol):
    def submit(self, actor: Any, video: Video, attempt: int) -> Ref: ...
    def ping(self, actor: Any) -> Ref: ...
    def wait(self, refs: list[Ref], timeout: float) -> list[Ref]: ...
    def progress_ages(self) -> dict[str, float]:
        """Seconds since each video's worker last reported progress."""
    def kill(self, actor: Any) -> None:
        """Kill a (hung) actor so that its call fails as ActorDied and the actor restarts."""
    def result(self, ref: Ref) -> Any:
        """The call's value; raises ActorDied or CallFailed."""


class ActorPool:
    """Hands each video to a free actor; a video whose actor died goes back in the queue.

    An actor that died is pinged until it answers again (Ray restarts it) and then takes work again;
    one that has not answered after `max_pings` pings is dropped. A video that killed its actor
    `max_attempts` times is given up as failed, and `record`ed (workers record the others).
    """

    def __init__(self, actors: list[Any], backend: Backend, max_attempts: int,
                 record: Callable[[VideoStatus], None], max_pings: int = 300, ping_interval_s: float = 0.2,
                 stall_timeout_s: float | None = None) -> None:
        self.backend, self.max_attempts, self.record = backend, max_attempts, record
        self.stall_timeout_s = stall_timeout_s
        self.started_at: dict[Ref, float] = {}
        self.killed: set[Ref] = set()
        self.max_pings, self.ping_interval_s = max_pings, ping_interval_s
        self.idle = list(actors)
        self.running: dict[Ref, tuple[Video, Any]] = {}
        self.recovering: dict[Ref, tuple[Any, int]] = {}  # health-check ref -> (actor being restarted, pings)
        self.attempts: dict[str, int] = {}
        self.queue: list[Video] = []

    def run(self, videos: list[Video], tick: Callable[[], None] = lambda: None,
            poll_s: float = 1.0) -> Iterator[VideoStatus]:
        """Yields each video's final status as it completes; `tick` runs at least every `poll_s`."""
        self.queue = list(reversed(videos))
        while self.queue or self.running:
            self._dispatch()
            for ref in self.backend.wait([*self.running, *self.recovering], poll_s):
                if ref in self.recovering:
                    self._recovered(ref)
                else:
                    status = self._completed(ref)
                    if status is not None:
                        yield status
            if not self.running and not self.idle and self.queue and not self.recovering:
                raise WorkersCannotStartError("every Ray worker died and none could be restarted")
            self._kill_stalled()
            tick()

    def _dispatch(self) -> None:
        while self.queue and self.idle:
            video, actor = self.queue.pop(), self.idle.pop()
            self.attempts[video.video_id] = self.attempts.get(video.video_id, 0) + 1
            ref = self.backend.submit(actor, video, self.attempts[video.video_id])
            self.running[ref] = (video, actor)
            self.started_at[ref] = time.monotonic()

    def _recovered(self, ref: Ref) -> None:
        actor, pings = self.recovering.pop(ref)
        try:
            self.backend.result(ref)
            self.idle.append(actor)
        except ActorDied as exc:
            if pings >= self.max_pings:
                log.warning("a worker did not come back after %d health checks, going on without it: %s",
                            pings, exc)
                return
            time.sleep(self.ping_interval_s)  # still restarting: ask again shortly
            self.recovering[self.backend.ping(actor)] = (actor, pings + 1)

    def _kill_stalled(self) -> None:
        """A worker that reports no progress for stall_timeout_s (a stuck read, a decoder deadlock, a
        stopped process) is killed, and its video retried like a crash."""
        if self.stall_timeout_s is None or not self.running:
            return
        ages = self.backend.progress_ages()
        now = time.monotonic()
        for ref, (video, actor) in self.running.items():
            age = min(ages.get(video.video_id, float("inf")), now - self.started_at[ref])
            if age > self.stall_timeout_s and ref not in self.killed:
                log.warning("%s: no progress for %.0f s (ray.stall_timeout_s=%g): killing its worker and "
                            "retrying the video", video.relative_path, age, self.stall_timeout_s)
                self.killed.add(ref)
                self.backend.kill(actor)

    def _completed(self, ref: Ref) -> VideoStatus | None:
        video, actor = self.running.pop(ref)
        self.started_at.pop(ref, None)
        stalled = ref in self.killed
        self.killed.discard(ref)
        tries = self.attempts[video.video_id]
        try:
            status = self.backend.result(ref)
        except CallFailed as exc:
            self.idle.append(actor)  # the actor is fine: record the video as failed and go on
            return self._give_up(video, tries, f"internal error: {exc}")
        except ActorDied as exc:
            cause = str(exc)
            if stalled:
                cause = f"it made no progress for ray.stall_timeout_s={self.stall_timeout_s:g} s (a hung read or decoder)"
            self.recovering[self.backend.ping(actor)] = (actor, 1)
            if tries < self.max_attempts:
                log.warning("worker died on %s (attempt %d), retrying: %s", video.relative_path, tries, cause)
                self.queue.append(video)
                return None
            return self._give_up(video, tries, (
                f"the worker process died on this video {tries} times (killed, out of memory or crashed in "
                f"the decoder); last: {cause}"))
        self.idle.append(actor)
        return status

    def _give_up(self, video: Video, tries: int, reason: str) -> VideoStatus:
        status = VideoStatus(video_id=video.video_id, path=video.relative_path, error=reason, attempts=tries,
                             retryable=True)
        self.record(status)
        return status
