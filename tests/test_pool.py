"""pool: dispatch, retries and recovery with fake actors (no Ray), as Ray tests its own _ActorPool."""

from __future__ import annotations

import dataclasses
import itertools
import time

import pytest

from job.discover import Video
from job.errors import WorkersCannotStartError
from job.pool import ActorDied, ActorPool, CallFailed
from job.segments import Split
from job.status import VideoStatus


class FakeBackend:
    """Calls complete in submission order, one per wait; `script` says what a video's n-th attempt does."""

    def __init__(self, script=None, restarts=True, starts_after=None, cannot_start=(), one_at_a_time=False,
                 slow=()):
        self.script = script or {}  # (video_id, attempt) -> "die" | "bug" | "slow" | "hang" | a Split
        self.slow = set(slow)  # (video_id, attempt) that take 0.5 s, whatever they return
        self.restarts = restarts
        self.starts_after = starts_after or {}  # actor -> calls completed before it answers its first ping
        self.cannot_start = set(cannot_start)  # actors whose first ping fails as their constructor did
        self.completed = 0
        self.submitted_at: dict[int, float] = {}
        self.reporting: set[str] = set()  # task keys whose workers report progress (a "slow" one, running)
        self.one_at_a_time = one_at_a_time  # an actor's calls run in turn: a later one waits for the earlier
        self.ids = itertools.count()
        self.calls: dict[int, tuple] = {}
        self.log: list[tuple[str, int, str]] = []  # (video_id, attempt, actor)
        self.killed: set[str] = set()
        self.submitted = []

    def submit(self, actor, task, attempt):
        ref = next(self.ids)
        self.submitted.append(task)
        self.calls[ref] = ("process", actor, task, attempt)
        self.submitted_at[ref] = time.monotonic()
        self.log.append((task.key, attempt, actor))
        return ref

    def ping(self, actor):
        ref = next(self.ids)
        self.calls[ref] = ("ping", actor, None, None)
        return ref

    def wait(self, refs, timeout):
        def hung(ref):
            kind, actor, task, attempt = self.calls[ref]
            if kind == "ping":
                return self.completed < self.starts_after.get(actor, 0)
            if self.one_at_a_time and any(other < ref and self.calls[other][:2] == ("process", actor)
                                          for other in self.calls):
                return True
            if kind == "process" and (self.script.get((task.key, attempt)) == "slow"  # 0.5 s, reporting progress
                                      or (task.key, attempt) in self.slow):
                self.reporting.add(task.key)
                return time.monotonic() < self.submitted_at[ref] + 0.5 and actor not in self.killed
            return kind == "process" and self.script.get((task.key, attempt)) == "hang" and actor not in self.killed

        return sorted(ref for ref in refs if not hung(ref))[:1]

    def progress_ages(self, keys):
        # Only "slow" tasks report; for the others the pool goes by how long each has been running.
        return {key: 0.0 for key in keys if key in self.reporting}

    def kill(self, actor):
        self.killed.add(actor)

    def result(self, ref):
        kind, actor, task, attempt = self.calls.pop(ref)
        if kind == "ping":
            if actor in self.cannot_start:
                raise CallFailed("WorkersCannotStartError: CUDA out of memory")
            if not self.restarts:
                raise ActorDied("still dead")
            return "cpu"
        outcome = self.script.get((task.key, attempt))
        self.completed += 1
        if actor in self.killed:
            self.killed.discard(actor)
            raise ActorDied("killed")
        if outcome == "die":
            raise ActorDied("worker killed")
        if outcome == "bug":
            raise CallFailed("ZeroDivisionError: oops")
        if isinstance(outcome, Split):
            return outcome
        frames = task.end - task.start if task.is_segment else 10
        return VideoStatus(video_id=task.video.video_id, path=task.video.relative_path, status="ok", attempts=attempt,
                           worker=actor, frame_count=frames, frames_processed=frames, detections=2 * frames,
                           segment_start=task.start)


def videos(n):
    return [Video(f"v{i}-000", f"/v/{i}.mp4", f"{i}.mp4") for i in range(n)]


def run(pool, todo):
    return {s.video_id: s for s in pool.run(todo, poll_s=0)}


def test_every_video_is_done_once_and_both_actors_work():
    backend, recorded = FakeBackend(), []
    statuses = run(ActorPool(["a", "b"], backend, 3, recorded.append), videos(5))
    assert sorted(statuses) == [f"v{i}-000" for i in range(5)]
    assert all(s.status == "ok" and s.attempts == 1 for s in statuses.values())
    assert {actor for _, _, actor in backend.log} == {"a", "b"}
    assert recorded == []


def test_actors_take_work_as_each_is_ready_not_when_the_slowest_is():
    backend = FakeBackend(starts_after={"b": 3})
    statuses = run(ActorPool(["a", "b"], backend, 3, lambda s: None, starting={1}), videos(8))
    assert sorted(statuses) == [f"v{i}-000" for i in range(8)]
    assert [actor for _, _, actor in backend.log[:3]] == ["a", "a", "a"]  # a did not wait for b
    assert "b" in {actor for _, _, actor in backend.log}  # and b joined once it answered


def test_a_worker_that_cannot_start_is_left_out_and_the_others_do_the_work(caplog):
    backend = FakeBackend(cannot_start={"b"})
    statuses = run(ActorPool(["a", "b"], backend, 3, lambda s: None, starting={1}), videos(4))
    assert all(s.status == "ok" for s in statuses.values()) and len(statuses) == 4
    assert {actor for _, _, actor in backend.log} == {"a"}
    assert "a worker could not start, going on without it: WorkersCannotStartError: CUDA out of memory" in caplog.text
    with pytest.raises(WorkersCannotStartError, match="every Ray worker died"):
        run(ActorPool(["b"], FakeBackend(cannot_start={"b"}), 3, lambda s: None, starting={0}), videos(1))


def test_each_actor_holds_its_next_task_so_it_never_waits_for_the_driver():
    backend = FakeBackend()
    handed_out_before_the_first_result = []
    result = backend.result
    backend.result = lambda ref: handed_out_before_the_first_result.append(len(backend.log)) or result(ref)
    pool = ActorPool(["a", "b"], backend, 3, lambda s: None, ahead=1)
    statuses = run(pool, videos(7))
    assert len(statuses) == 7 and all(s.status == "ok" for s in statuses.values())
    assert handed_out_before_the_first_result[0] == 4  # two each: one running, the next waiting on the actor
    assert sorted(actor for _, _, actor in backend.log[:4]) == ["a", "a", "b", "b"]


def recording_hand_outs(backend, actors):
    """Wraps backend.submit: the list it returns gets, per hand-out, (tasks still queued, whether its
    actor already had a call in flight, whether another actor had none)."""
    handed = []
    submit = backend.submit

    def recording_submit(actor, task, attempt):
        in_flight = {name: any(call[:2] == ("process", name) for call in backend.calls.values()) for name in actors}
        handed.append((len(pool_of[0].queue), in_flight[actor],
                       any(not busy for name, busy in in_flight.items() if name != actor)))
        return submit(actor, task, attempt)

    backend.submit = recording_submit
    pool_of = []
    return handed, pool_of


def test_no_task_is_held_ahead_while_another_actor_has_nothing_to_do():
    """Caught by CI with the next task held: one actor took a long video's segments, the other stood idle.
    Here a's first video splits late, after b has finished everything else."""
    todo = videos(4)
    split = Split(todo[1], (0, 40, 80, 120))
    backend = FakeBackend({("v1-000", 1): split}, slow={("v1-000", 1)}, one_at_a_time=True)
    handed, pool_of = recording_hand_outs(backend, ["a", "b"])
    pool_of.append(ActorPool(["a", "b"], backend, 3, lambda s: None, ahead=1))
    statuses = run(pool_of[0], todo)
    assert len(statuses) == 4 and all(s.status == "ok" for s in statuses.values())
    assert [actor for key, _, actor in backend.log[:2]] == ["b", "a"]  # the split video went to a
    assert not any(busy and other_free for _, busy, other_free in handed), handed
    segments = {actor for key, _, actor in backend.log if key.startswith("v1-000@")}
    assert segments == {"a", "b"}


def test_no_task_is_held_ahead_at_the_tail_of_the_run():
    backend = FakeBackend(one_at_a_time=True)
    handed, pool_of = recording_hand_outs(backend, ["a", "b"])
    pool_of.append(ActorPool(["a", "b"], backend, 3, lambda s: None, ahead=1))
    assert len(run(pool_of[0], videos(8))) == 8
    held = [queued for queued, busy, _ in handed if busy]
    assert held and min(held) >= 2  # held ahead only while more than one task per actor was left
    assert not any(busy for _, busy, _ in handed[-2:])  # the last two went to free streams


@pytest.mark.timeout(20)  # taken for stalled, it would be killed and retried over and over
def test_a_task_waiting_behind_a_long_one_is_not_taken_for_stalled():
    """Its stall clock starts when its actor's running task ends, not when it was handed out."""
    backend = FakeBackend({("v0-000", 1): "slow"}, one_at_a_time=True)
    pool = ActorPool(["a"], backend, 3, lambda s: None, ahead=1, stall_timeout_s=0.2)
    statuses = run(pool, videos(2))
    assert backend.killed == set() and [(key, attempt) for key, attempt, _ in backend.log] == [
        ("v0-000", 1), ("v1-000", 1)]
    assert all(s.status == "ok" and s.attempts == 1 for s in statuses.values())


def test_a_video_whose_actor_died_is_retried_and_the_actor_comes_back():
    backend = FakeBackend({("v1-000", 1): "die"})
    statuses = run(ActorPool(["a", "b"], backend, 3, lambda s: None), videos(3))
    assert statuses["v1-000"].status == "ok" and statuses["v1-000"].attempts == 2
    assert [attempt for vid, attempt, _ in backend.log if vid == "v1-000"] == [1, 2]


def test_a_video_that_keeps_killing_workers_is_given_up_and_recorded():
    backend, recorded = FakeBackend({("v0-000", 1): "die", ("v0-000", 2): "die"}), []
    statuses = run(ActorPool(["a"], backend, 2, recorded.append), videos(2))
    given_up = statuses["v0-000"]
    assert (given_up.status, given_up.attempts, given_up.retryable) == ("failed", 2, True)
    assert "died on this video 2 times" in given_up.error
    assert recorded == [given_up]
    assert statuses["v1-000"].status == "ok"


def test_a_bug_in_a_call_fails_that_video_only():
    backend, recorded = FakeBackend({("v0-000", 1): "bug"}), []
    statuses = run(ActorPool(["a"], backend, 3, recorded.append), videos(2))
    assert statuses["v0-000"].error == "internal error: ZeroDivisionError: oops"
    assert statuses["v1-000"].status == "ok" and recorded == [statuses["v0-000"]]


def test_the_pool_stops_when_no_actor_can_be_restarted():
    backend = FakeBackend({("v0-000", 1): "die"}, restarts=False)
    pool = ActorPool(["a"], backend, 3, lambda s: None, max_pings=3, ping_interval_s=0)
    with pytest.raises(WorkersCannotStartError, match="every Ray worker died"):
        for _ in pool.run(videos(2), poll_s=0):
            pass
    assert sum(1 for kind, *_ in backend.calls.values() if kind == "ping") == 0, "pings stopped"


def test_a_video_whose_worker_hangs_is_killed_and_retried():
    backend = FakeBackend({("v1-000", 1): "hang"})
    pool = ActorPool(["a", "b"], backend, 3, lambda s: None, stall_timeout_s=0.05)
    statuses = run(pool, videos(3))
    assert all(s.status == "ok" for s in statuses.values())
    assert statuses["v1-000"].attempts == 2
    assert [attempt for vid, attempt, _ in backend.log if vid == "v1-000"] == [1, 2]


def test_a_video_that_hangs_every_time_is_given_up_saying_why():
    backend = FakeBackend({("v0-000", 1): "hang", ("v0-000", 2): "hang"})
    statuses = run(ActorPool(["a"], backend, 2, lambda s: None, stall_timeout_s=0.05), videos(2))
    assert statuses["v0-000"].status == "failed"
    assert "no progress for ray.stall_timeout_s=0.05 s" in statuses["v0-000"].error
    assert statuses["v1-000"].status == "ok"


class RecordingSizer:
    def __init__(self):
        self.seen, self.done_keys = [], []

    def size(self, task, queued, running):
        assert all(seconds >= 0 for _, seconds in running)
        self.seen.append((task.key, sorted(t.key for t in queued), sorted(t.key for t, _ in running)))
        return dataclasses.replace(task, segment_frames=10 * (len(queued) + 1))

    def done(self, status):
        self.done_keys.append(f"{status.video_id}@{status.segment_start}")


def test_each_whole_video_is_sized_when_handed_out_from_the_tasks_queued_and_running():
    todo = videos(3)
    split = Split(todo[0], (0, 100, 200))
    backend, sizer = FakeBackend({("v0-000", 1): split}), RecordingSizer()
    run(ActorPool(["a", "b"], backend, 3, lambda s: None, sizer=sizer), todo)
    # v0 comes back split: its segments are handed out as they are; v2, the last, while v0@100 runs.
    assert sizer.seen == [("v0-000", ["v1-000", "v2-000"], []), ("v1-000", ["v2-000"], ["v0-000"]),
                          ("v2-000", [], ["v0-000@100"])]
    assert [(t.key, t.segment_frames) for t in backend.submitted] == [
        ("v0-000", 30), ("v1-000", 20), ("v0-000@0", None), ("v0-000@100", None), ("v2-000", 10)]
    assert sizer.done_keys == ["v1-000@0", "v0-000@0", "v0-000@100", "v2-000@0"]  # every finished task, once


def test_a_split_video_is_spread_over_every_actor_and_gets_one_merged_row():
    todo = videos(2)
    split = Split(todo[0], (0, 100, 200, 300, 350))
    backend, recorded = FakeBackend({("v0-000", 1): split}), []
    statuses = run(ActorPool(["a", "b"], backend, 3, recorded.append), todo)
    merged = statuses["v0-000"]
    assert (merged.status, merged.frame_count, merged.detections) == ("ok", 350, 700)
    assert recorded == [merged]  # the driver records a split video's row; workers record the rest
    segment_actors = {actor for key, _, actor in backend.log if key.startswith("v0-000@")}
    assert len([key for key, _, _ in backend.log if key.startswith("v0-000@")]) == 4 and segment_actors == {"a", "b"}


def test_a_segment_whose_actor_dies_is_retried_and_one_given_up_leaves_the_video_partial():
    todo = videos(1)
    split = Split(todo[0], (0, 100, 200))
    script = {("v0-000", 1): split, ("v0-000@100", 1): "die", ("v0-000@0", 1): "die", ("v0-000@0", 2): "die"}
    statuses = run(ActorPool(["a", "b"], FakeBackend(script), 2, lambda status: None), todo)
    video = statuses["v0-000"]
    assert video.status == "partial" and video.frame_count == 100  # segment 100 retried; segment 0 given up
    assert "segment from frame 0" in video.error and "died on this video 2 times" in video.error


class StreamsBackend(FakeBackend):
    """Actors that run several calls at once; a death kills every call in flight on that actor."""

    def __init__(self, script=None):
        super().__init__(script)
        self.in_flight: dict[str, set[int]] = {}
        self.most_at_once = 0
        self.company: list[tuple[str, int, frozenset]] = []  # (video, attempt, keys running beside it)
        self.doomed: set[int] = set()

    def submit(self, actor, task, attempt):
        ref = super().submit(actor, task, attempt)
        running = self.in_flight.setdefault(actor, set())
        self.company.append((task.key, attempt, frozenset(self.calls[r][2].key for r in running)))
        running.add(ref)
        self.most_at_once = max(self.most_at_once, len(running))
        return ref

    def result(self, ref):
        kind, actor, task, attempt = self.calls[ref]
        if kind == "process":
            self.in_flight[actor].discard(ref)
            if ref in self.doomed:
                self.calls.pop(ref)
                raise ActorDied("the actor died under another call")
            if self.script.get((task.key, attempt)) == "die":
                self.doomed |= self.in_flight[actor]  # the whole process goes, with its other streams
        return super().result(ref)


def test_an_actor_with_streams_runs_that_many_tasks_at_once():
    backend = StreamsBackend()
    statuses = run(ActorPool(["gpu"], backend, 3, lambda s: None, streams=3), videos(7))
    assert all(s.status == "ok" and s.attempts == 1 for s in statuses.values()) and len(statuses) == 7
    assert backend.most_at_once == 3


def test_a_video_that_kills_a_shared_actor_is_given_up_without_costing_its_neighbours_attempts():
    always = {("v1-000", attempt): "die" for attempt in range(1, 5)}
    backend, recorded = StreamsBackend(always), []
    statuses = run(ActorPool(["gpu"], backend, 2, recorded.append, streams=2), videos(4))
    bad = statuses.pop("v1-000")
    assert bad.status == "failed" and "died on this video 2 times" in bad.error
    assert all(s.status == "ok" and s.attempts == 1 for s in statuses.values()), statuses  # no attempt lost
    # Every retry after dying in company ran alone; only the deaths while alone counted.
    retried = [(key, attempt, beside) for key, attempt, beside in backend.company if key == "v1-000"]
    assert retried[0][1] == 1 and all(not beside for _, _, beside in retried[1:]), retried
    assert [attempt for _, attempt, _ in retried[1:]] == [1, 2]
    assert recorded == [bad]


def test_a_task_waiting_on_an_actor_that_dies_is_no_suspect_and_loses_no_attempt():
    """One stream and one task waiting behind it: the death is the running task's alone."""
    always = {("v0-000", attempt): "die" for attempt in range(1, 5)}
    backend, recorded = StreamsBackend(always), []
    statuses = run(ActorPool(["cpu"], backend, 2, recorded.append, ahead=1), videos(3))
    bad = statuses.pop("v0-000")
    assert bad.status == "failed" and bad.attempts == 2 and "died on this video 2 times" in bad.error
    assert all(s.status == "ok" and s.attempts == 1 for s in statuses.values()), statuses
    assert [attempt for key, attempt, _ in backend.company if key == "v0-000"] == [1, 2]  # never retried alone


def test_a_gpu_actors_streams_are_handed_large_and_small_frames_together():
    """Largest first alone would run both 720p videos together (the model waiting on decoding), then both
    small ones (the decoders waiting on the model): the mixer puts a small one beside each large one, and
    at the tail the queue's order stands."""
    from job.balance import StreamMixer

    todo = [Video(f"{name}-000", f"/v/{name}.mp4", f"{name}.mp4") for name in ("hd0", "hd1", "sd0", "sd1", "q0", "q1")]
    pixels = {f"{name}-000": size for name, size in [("hd0", 921600), ("hd1", 921600), ("sd0", 174080),
                                                      ("sd1", 174080), ("q0", 25344), ("q1", 25344)]}
    backend = StreamsBackend()
    statuses = run(ActorPool(["gpu"], backend, 3, lambda s: None, streams=2, mixer=StreamMixer(pixels)), todo)
    assert len(statuses) == 6 and all(s.status == "ok" for s in statuses.values())
    assert [task.key for task in backend.submitted[:2]] == ["hd0-000", "q0-000"]
    plain = StreamsBackend()
    run(ActorPool(["gpu"], plain, 3, lambda s: None, streams=2), todo)
    assert [task.key for task in plain.submitted[:2]] == ["hd0-000", "hd1-000"]  # without sizes: the order
