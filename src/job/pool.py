"""The actor pool's state and dispatch: idle, running and recovering actors, attempts and retries.

Apart from Ray (as Ray Data keeps `_ActorPool` apart from its operator), so retries and recovery
can be tested with fake actors. `execute.RayBackend` is the real backend.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from job.balance import MIX_WINDOW
from job.discover import Video
from job.errors import WorkersCannotStartError
from job.segments import Split, Task, merge
from job.status import VideoStatus

log = logging.getLogger(__name__)

Ref = Hashable


class ActorDied(Exception):
    """The actor's process died during the call (killed, out of memory, crashed in native code)."""


class CallFailed(Exception):
    """The call raised inside a live actor: a bug outside the per-video error handling."""


class Backend(Protocol):
    def submit(self, actor: Any, task: Task, attempt: int) -> Ref:
        """Start `task` on `actor`; its result is a VideoStatus, or a Split for a long whole video."""
    def ping(self, actor: Any) -> Ref: ...
    def wait(self, refs: list[Ref], timeout: float) -> list[Ref]: ...
    def progress_ages(self, keys: list[str]) -> dict[str, float]:
        """Seconds since the worker of each of these tasks (`Task.key`) last reported progress."""
    def kill(self, actor: Any) -> None:
        """Kill a (hung) actor so that its call fails as ActorDied and the actor restarts."""
    def result(self, ref: Ref) -> Any:
        """The call's value; raises ActorDied or CallFailed."""


class Mixer:
    """Hands tasks out in the queue's order (balance.StreamMixer picks by frame size)."""

    def pick(self, candidates: list[Task], held: list[Task]) -> int:
        return 0


class Sizer:
    """Cuts no video differently from `ray.segment_frames` (balance.TailSizer does)."""

    def size(self, task: Task, queued: list[Task], running: list[tuple[Task, float]]) -> Task:
        return task

    def done(self, status: VideoStatus) -> None:
        pass


@dataclass(frozen=True)
class _Call:
    """A task in flight: on which actor, in which of its lives, holding how many of its slots."""

    task: Task
    actor: int  # index into ActorPool.actors
    life: int
    slots: int  # 1, or all of the actor's for a task retried alone


class ActorPool:
    """Hands each task (a video, or a segment of a long one) to a free actor; a task whose actor died
    goes back in the queue.

    An actor runs up to `streams` tasks at once (a GPU actor's decode streams, all feeding its one model),
    and holds `ahead` more waiting to start, so that it goes from one task to the next without waiting for
    the driver's round trip (a few ms: more than a tiny clip's own work). A task goes to a free stream
    before it is held ahead anywhere, and none is held ahead once no more are queued than there are actors,
    so the run's last tasks never wait behind a long one while another actor stands idle. A waiting task's
    stall clock starts when a task of its actor ends.
    When an actor dies with several tasks in flight, nobody knows which one killed it: each is retried
    alone on an actor with nothing else running, and only a death while alone counts as an attempt, so a
    file that crashes its decoder is given up without taking its neighbours' attempts with it.

    A long video comes back from its first actor as a `Split`: its segments go to the front of the
    queue, so every free actor takes one, and its row is the merge of theirs, `record`ed when the last
    is done. An actor that died is pinged until it answers again (Ray restarts it) and then takes work
    again; one that has not answered after `max_pings` pings is dropped. A task that killed its actor
    `max_attempts` times is given up as failed (a video's row is `record`ed; workers record the others).
    A `sizer` sets how each whole video handed out is cut, from the tasks queued and running. An actor
    with several streams takes the queued task its `mixer` picks from the next few, given the tasks it
    holds; at the tail (no more queued than the actors hold) always the next.
    """

    def __init__(self, actors: list[Any], backend: Backend, max_attempts: int,
                 record: Callable[[VideoStatus], None], max_pings: int = 300, ping_interval_s: float = 0.2,
                 stall_timeout_s: float | None = None, sizer: Sizer | None = None, streams: int = 1,
                 starting: set[int] | None = None, ahead: int = 0, mixer: Mixer | None = None) -> None:
        """`starting`: indices of actors still loading their model; each takes work once it answers a
        health check, so the others need not wait for the slowest to start."""
        self.backend, self.max_attempts, self.record = backend, max_attempts, record
        self.actors, self.streams = list(actors), streams
        self.slots = streams + ahead  # tasks an actor holds: running, or waiting for one of its streams
        self.waiting: set[Ref] = set()  # handed out, waiting on their actor for a stream
        self.sizer = sizer or Sizer()
        self.mixer = mixer or Mixer()
        self.stall_timeout_s = stall_timeout_s
        self.started_at: dict[Ref, float] = {}
        self.killed: set[Ref] = set()
        self.max_pings, self.ping_interval_s = max_pings, ping_interval_s
        # One entry per free slot: actor i is here as many times as it could take tasks now.
        starting = starting or set()
        self.idle: list[int] = [i for _ in range(self.slots) for i in range(len(self.actors)) if i not in starting]
        self.running: dict[Ref, _Call] = {}
        self.recovering: dict[Ref, tuple[int, int]] = {}  # health-check ref -> (actor being restarted, pings)
        self.starting: dict[Ref, int] = {self.backend.ping(self.actors[i]): i for i in sorted(starting)}
        self.lives = [0] * len(self.actors)  # how many times each actor has died: a call's `life` is the one it ran in
        self.died_with: dict[tuple[int, int], int] = {}  # (actor, life) -> calls in flight when it died
        self.alone: set[str] = set()  # task keys that died in company: retried on an actor with nothing else
        self.attempts: dict[str, int] = {}
        self.queue: list[Task] = []  # popped from the end
        self.segments: dict[str, tuple[int, list[VideoStatus]]] = {}  # video_id -> (segments, those done)

    def run(self, videos: list[Video], tick: Callable[[], None] = lambda: None,
            poll_s: float = 1.0) -> Iterator[VideoStatus]:
        """Yields each video's final status as it completes; `tick` runs about every `poll_s`, not after
        every completion (with thousands of tiny clips, its round trips and the stall check's would cost
        more than the clips)."""
        self.queue = [Task(video) for video in reversed(videos)]
        self._dispatch()
        ticked_at = time.monotonic()
        while self.queue or self.running:
            finished = []
            for ref in self.backend.wait([*self.running, *self.recovering, *self.starting], poll_s):
                if ref in self.starting:
                    self._started(ref)
                elif ref in self.recovering:
                    self._recovered(ref)
                else:
                    finished.append(self._completed(ref))
            self._dispatch()  # freed and recovered actors start their next task before the caller's bookkeeping
            yield from (status for status in finished if status is not None)
            if not self.running and not self.idle and self.queue and not self.recovering and not self.starting:
                raise WorkersCannotStartError("every Ray worker died and none could be restarted")
            if time.monotonic() - ticked_at >= poll_s:
                self._kill_stalled()
                tick()
                ticked_at = time.monotonic()
        tick()  # the last completions shown

    def _dispatch(self) -> None:
        while self.queue and self.idle:
            alone = self.queue[-1].key in self.alone
            if alone:  # waits for an actor with every stream free; the others take nothing new meanwhile
                free = [i for i in set(self.idle) if self.idle.count(i) == self.slots]
                if not free:
                    return
                actor = free[0]
                self.idle = [i for i in self.idle if i != actor]
            else:
                actor = self._with_a_free_stream()
                if actor is None:  # every idle slot is one held ahead: not at the tail (see below)
                    if len(self.queue) <= len(self.actors):
                        return
                    actor = self.idle.pop()
                else:
                    self.idle.remove(actor)
            task = self._next_task(actor, alone)
            if not task.is_segment:
                now = time.monotonic()
                task = self.sizer.size(task, self.queue,
                                       [(c.task, now - self.started_at[ref]) for ref, c in self.running.items()])
            self.attempts[task.key] = self.attempts.get(task.key, 0) + 1
            ref = self.backend.submit(self.actors[actor], task, self.attempts[task.key])
            if self._streams_in_use(actor) >= self.streams:
                self.waiting.add(ref)
            self.running[ref] = _Call(task, actor, self.lives[actor], self.slots if alone else 1)
            self.started_at[ref] = time.monotonic()

    def _next_task(self, actor: int, alone: bool) -> Task:
        """The next out, or for an actor with several streams the mixer's pick among the next few: never a
        task to be retried alone, and not at the tail, where the order (the last video's pieces) balances
        the actors' ends."""
        if alone or self.streams < 2 or len(self.queue) <= len(self.actors) * self.slots:
            return self.queue.pop()
        # Queue positions, next out first; queue[-1] is no alone retry (else `alone`), so there is one at least.
        window = [i for i in range(len(self.queue) - 1, max(-1, len(self.queue) - 1 - MIX_WINDOW), -1)
                  if self.queue[i].key not in self.alone]
        held = [call.task for call in self.running.values() if call.actor == actor]
        return self.queue.pop(window[self.mixer.pick([self.queue[i] for i in window], held)])

    def _streams_in_use(self, actor: int) -> int:
        return sum(1 for ref, call in self.running.items() if call.actor == actor and ref not in self.waiting)

    def _with_a_free_stream(self) -> int | None:
        """An idle actor whose next task starts at once, before any that would hold it waiting: else a split
        video's segments could queue up on one actor while another stands idle. The most recently freed first."""
        for actor in reversed(self.idle):
            if self._streams_in_use(actor) < self.streams:
                return actor
        return None

    def _started(self, ref: Ref) -> None:
        actor = self.starting.pop(ref)
        try:
            self.backend.result(ref)
        except ActorDied:  # crashed while starting: Ray restarts it, and it joins when it answers
            self.recovering[self.backend.ping(self.actors[actor])] = (actor, 1)
            return
        except CallFailed as exc:  # e.g. its GPU had no memory for the model: the others go on
            log.warning("a worker could not start, going on without it: %s", exc)
            return
        self.idle.extend([actor] * self.slots)

    def _recovered(self, ref: Ref) -> None:
        actor, pings = self.recovering.pop(ref)
        try:
            self.backend.result(ref)
            self.idle.extend([actor] * self.slots)
        except ActorDied as exc:
            if pings >= self.max_pings:
                log.warning("a worker did not come back after %d health checks, going on without it: %s",
                            pings, exc)
                return
            time.sleep(self.ping_interval_s)  # still restarting: ask again shortly
            self.recovering[self.backend.ping(self.actors[actor])] = (actor, pings + 1)

    def _kill_stalled(self) -> None:
        """A worker that reports no progress for stall_timeout_s (a stuck read, a decoder deadlock, a
        stopped process) is killed, and its video retried like a crash."""
        if self.stall_timeout_s is None or not self.running:
            return
        ages = self.backend.progress_ages([call.task.key for call in self.running.values()])
        now = time.monotonic()
        for ref, call in self.running.items():
            if ref in self.waiting:
                continue
            age = min(ages.get(call.task.key, float("inf")), now - self.started_at[ref])
            if age > self.stall_timeout_s and ref not in self.killed:
                log.warning("%s: no progress for %.0f s (ray.stall_timeout_s=%g): killing its worker and "
                            "retrying it", call.task.describe(), age, self.stall_timeout_s)
                self.killed.add(ref)
                self.backend.kill(self.actors[call.actor])

    def _completed(self, ref: Ref) -> VideoStatus | None:
        call = self.running.pop(ref)
        task, actor = call.task, call.actor
        self.started_at.pop(ref, None)
        never_started = ref in self.waiting
        self.waiting.discard(ref)
        stalled = ref in self.killed
        self.killed.discard(ref)
        tries = self.attempts[task.key]
        try:
            result = self.backend.result(ref)
        except CallFailed as exc:
            self.idle.extend([actor] * call.slots)  # the actor is fine: record the video as failed and go on
            self._start_next_waiting(actor)
            return self._give_up(task, tries, f"internal error: {exc}")
        except ActorDied as exc:
            cause = str(exc)
            if stalled:
                cause = f"it made no progress for ray.stall_timeout_s={self.stall_timeout_s:g} s (a hung read or decoder)"
            if call.life == self.lives[actor]:  # the first of its calls to come back dead: restart it
                self.died_with[actor, call.life] = (not never_started) + sum(
                    1 for other_ref, other in self.running.items()
                    if other.actor == actor and other.life == call.life and other_ref not in self.waiting)
                self.lives[actor] += 1
                self.idle = [i for i in self.idle if i != actor]
                self.recovering[self.backend.ping(self.actors[actor])] = (actor, 1)
            if never_started:  # it was waiting on the actor: not a suspect, and not an attempt
                self.attempts[task.key] -= 1
                self.queue.append(task)
                return None
            if self.died_with[actor, call.life] > 1:  # in company: this one may not be the cause
                log.warning("worker died running %s and %d other tasks, retrying it alone: %s", task.describe(),
                            self.died_with[actor, call.life] - 1, cause)
                self.attempts[task.key] -= 1
                self.alone.add(task.key)
                self.queue.append(task)
                return None
            if tries < self.max_attempts:
                log.warning("worker died on %s (attempt %d), retrying: %s", task.describe(), tries, cause)
                self.queue.append(task)
                return None
            return self._give_up(task, tries, (
                f"the worker process died on this video {tries} times: it crashed (e.g. a segfault in a native "
                f"decoder: its stack is in the run's log), was killed or ran out of memory; last: {cause}"))
        self.idle.extend([actor] * call.slots)
        self._start_next_waiting(actor)
        if isinstance(result, VideoStatus):
            self.sizer.done(result)
        if isinstance(result, Split):
            segments = result.tasks()
            log.info("%s: split into %d segments", task.describe(), len(segments))
            self.segments[task.video.video_id] = (len(segments), [])
            self.queue.extend(reversed(segments))  # next out of the queue, so every free actor takes one
            return None
        return self._done(task, result)

    def _start_next_waiting(self, actor: int) -> None:
        """A stream of `actor` is free: its oldest waiting task starts now (its stall clock with it)."""
        for ref, call in self.running.items():  # in hand-out order
            if call.actor == actor and ref in self.waiting:
                self.waiting.discard(ref)
                self.started_at[ref] = time.monotonic()
                return

    def _done(self, task: Task, status: VideoStatus) -> VideoStatus | None:
        """A video's final status: the task's own, or, after a split video's last segment, their merge."""
        if not task.is_segment:
            return status
        expected, done = self.segments[task.video.video_id]
        done.append(status)
        if len(done) < expected:
            return None
        del self.segments[task.video.video_id]
        merged = merge(task.video, done)
        self.record(merged)
        return merged

    def _give_up(self, task: Task, tries: int, reason: str) -> VideoStatus | None:
        status = VideoStatus(video_id=task.video.video_id, path=task.video.relative_path, error=reason,
                             attempts=tries, retryable=True, segment_start=task.start)
        if task.is_segment:
            return self._done(task, status)
        self.record(status)
        return status
