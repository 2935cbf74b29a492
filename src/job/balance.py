"""How the pool cuts the videos it hands out, so that the actors finish together (`TailSizer`), and which
task a stream of a GPU actor takes next, so that its model and its decoders are busy at once (`StreamMixer`).

Only the last videos are cut short: a cut away from a keyframe decodes from the keyframe before it, and
splitting costs a round trip, so videos run whole while the work still queued gives every actor more.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from job.segments import Task, is_long
from job.status import VideoStatus

# Enough units of work per actor that the last ones end close together, but no segment so short that
# its own start (opening the file, scanning its packets, seeking) weighs next to detecting its frames.
UNITS_PER_ACTOR = 4
MIN_SEGMENT_FRAMES = 120
# How far down the queue (next out first) a GPU actor's next task is looked for: beyond it the order stays
# the plan's (largest first), and the choice costs the same however many videos are queued.
MIX_WINDOW = 16
# The last video's pieces are sized to fill each actor up to the same end, so shorter ones pay: a piece
# idles an actor for as long as it takes to detect, and starting one costs far less than 30 frames.
MIN_TAIL_PIECE_FRAMES = 30


def tail_segment_frames(segment_frames: int | None, video_frames: int | None, queued_frames: int,
                        actors: int) -> int | None:
    """The segment length to cut a video about to start with: `ray.segment_frames` while the work still
    queued (this video's `video_frames` included) gives every actor more than this video, else short
    enough that the actors finish it together instead of one finishing it alone while the others wait.

    Only the last videos are cut so: a cut away from a keyframe decodes from the keyframe before it,
    and splitting costs a round trip, so splitting every video to balance a few would waste both.
    """
    if segment_frames is None or actors < 2 or not video_frames or video_frames * actors <= queued_frames:
        return segment_frames
    share = math.ceil(queued_frames / (actors * UNITS_PER_ACTOR))
    return min(segment_frames, max(MIN_SEGMENT_FRAMES, share))


def last_video_cuts(video_frames: int, running_left: list[float]) -> list[int]:
    """Where to cut the last video, handed to an actor while the others finish tasks with
    `running_left` frames to go, so that all end together: each actor gets a piece that fills it up to
    the same end, the next actor to be free the largest (the pool hands the segments out in order).

    Actors whose task ends after that get none; pieces under MIN_TAIL_PIECE_FRAMES stay with the first.
    """
    left = sorted(running_left)
    target = (video_frames + sum(left)) / (len(left) + 1)
    while left and left[-1] >= target:
        left.pop()
        target = (video_frames + sum(left)) / (len(left) + 1)
    pieces = sorted((p for p in (target - r for r in left) if p >= MIN_TAIL_PIECE_FRAMES), reverse=True)
    sizes = [video_frames - sum(pieces), *pieces]
    return [round(sum(sizes[:k])) for k in range(1, len(sizes))]


class TailSizer:
    """The pool's `sizer`: how each whole video handed out is cut, so that the actors finish together.

    The last video, while other actors are busy, is cut unevenly by `last_video_cuts` (their tasks'
    frames left come from the frames per second finished tasks took); other videos get
    `tail_segment_frames`. Frame counts are the containers' (`WorkEstimate.frames_by_video`).

    With every video's frame size known (`pixels_by_video`), the work queued is weighed in pixels, not
    frames: decoding costs by the pixel, so a few 720p frames outweigh many small ones, and a large video
    counted by its frames alone could run whole on one stream long after the rest of the run has ended
    (benchmarks/gpu.md).
    """

    def __init__(self, frames_by_video: dict[str, int], segment_frames: int | None, actors: int,
                 pixels_by_video: dict[str, int] | None = None) -> None:
        """The two dicts may still be filling (`plan.HeaderRead`)."""
        self.frames_by_video, self.segment_frames, self.actors = frames_by_video, segment_frames, actors
        self.pixels_by_video = pixels_by_video or {}
        self.frames_timed, self.seconds_timed = 0, 0.0

    def frames(self, task: Task) -> int:
        return task.end - task.start if task.is_segment else self.frames_by_video.get(task.video.video_id, 0)

    def done(self, status: VideoStatus) -> None:
        """Learns an actor's speed from a finished task."""
        if status.frame_count and status.seconds:
            self.frames_timed += status.frame_count
            self.seconds_timed += status.seconds

    def size(self, task: Task, queued: list[Task], running: list[tuple[Task, float]]) -> Task:
        """`task` with its cuts; `running` is each task in progress with the seconds it has run."""
        video_frames = self.frames_by_video.get(task.video.video_id)
        if self.segment_frames is None or self.actors < 2 or not video_frames:
            return task
        if not queued and running and self.seconds_timed and video_frames <= self.segment_frames:
            per_second = self.frames_timed / self.seconds_timed
            left = [max(0.0, self.frames(t) - seconds * per_second) for t, seconds in running]
            return dataclasses.replace(task, cuts=tuple(last_video_cuts(video_frames, left)))
        queued_frames = self._queued_work(task, video_frames, queued, self.pixels_by_video)
        if queued_frames is None:  # a frame size not known (yet): by frames alone
            queued_frames = self._queued_work(task, video_frames, queued, {})
        return dataclasses.replace(task, segment_frames=tail_segment_frames(self.segment_frames, video_frames,
                                                                            queued_frames, self.actors))

    def _queued_work(self, task: Task, video_frames: int, queued: list[Task], pixels: dict[str, int]) -> int | None:
        """The work queued, `task` included, in frames of `task`'s video: each task's frames weighed by its
        pixels a frame against `task`'s (with `pixels` empty, every weight is 1); None if a weight is missing.

        Summed only as far as the decision needs (next out first): all of it on every hand-out made the
        pool quadratic in the number of videos."""
        def weight(video_id: str) -> int | None:
            return pixels.get(video_id) if pixels else 1

        own = weight(task.video.video_id)
        if not own:
            return None
        queued_work, enough = video_frames * own, video_frames * own * self.actors
        for other in reversed(queued):
            if queued_work >= enough:
                break
            other_weight = weight(other.video.video_id)
            if not other_weight:
                return None
            queued_work += self.frames(other) * other_weight
        return math.ceil(queued_work / own)


class StreamMixer:
    """The pool's `mixer`: a GPU actor's next task is the one (among the next `MIX_WINDOW` queued) whose
    frames are least like those of the tasks it already holds, in pixels a frame (the containers' headers:
    `WorkEstimate.pixels_by_video`).

    Why: a stream decoding small frames feeds the model faster than it can run (the model's time goes by
    frames), one decoding large frames keeps a CPU busy while the model waits (the decoder's time goes
    by pixels). Largest first, a mixed bucket would run all its large videos together, the model idle,
    then all its small ones, the CPUs idle (benchmarks/gpu.md); held together, each fills the other's waits.
    """

    def __init__(self, pixels_by_video: dict[str, int], frames_by_video: dict[str, int] | None = None) -> None:
        self.pixels_by_video = pixels_by_video
        self.frames_by_video = frames_by_video or {}

    def pick(self, candidates: Sequence[Task], held: Sequence[Task]) -> int:
        """The index in `candidates` (next out first) to hand an actor holding `held`: the next out, unless
        sizes are known and another differs from the held tasks' at least twice as much (on a log scale:
        4x the pixels is as far as a quarter). A held whole video that will come back split holds its
        stream only for a moment, so its size does not count (else the task held ahead beside a small
        video about to split would be a second large one, and both streams would decode large frames)."""
        held_sizes = [self.pixels_by_video.get(task.video.video_id) for task in held
                      if not self.comes_back_split(task)]
        sizes = [self.pixels_by_video.get(task.video.video_id) for task in candidates]
        if not held_sizes or not all(held_sizes) or not sizes or sizes[0] is None:
            return 0
        middle = sum(math.log2(size) for size in held_sizes) / len(held_sizes)
        distances = [abs(math.log2(size) - middle) if size else -1.0 for size in sizes]
        farthest = max(range(len(distances)), key=distances.__getitem__)  # the first of equals
        return farthest if distances[farthest] >= distances[0] + 1.0 else 0

    def comes_back_split(self, task: Task) -> bool:
        """Whether a whole video, as the sizer cut it, is answered with its segments instead of decoded."""
        if task.is_segment:
            return False
        if task.cuts:
            return True
        frames = self.frames_by_video.get(task.video.video_id)
        return frames is not None and task.segment_frames is not None and is_long(frames, task.segment_frames)
