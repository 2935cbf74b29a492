"""Long videos cut into segments that any actor can take; segments' outcomes merged into one row.

A unit of work is a `Task`: a whole video, or the frames [start, end) of one. A whole-video task
for a video longer than `ray.segment_frames` is cut on the worker that opens it (from the demuxed
keyframes, `cut_points`) and comes back as a `Split`; the pool then queues its segments. Frame
indices, timestamps and parts stay global, so a split video's output is the unsplit one's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from job.discover import Video
from job.status import VideoStatus


@dataclass(frozen=True)
class Task:
    video: Video
    start: int = 0
    end: int | None = None  # None: the whole video
    # How a whole video is cut, chosen when it is handed out (balance.TailSizer): its segment length
    # (None: ray.segment_frames), or the frames to cut it at (() : run it whole), which win.
    segment_frames: int | None = None
    cuts: tuple[int, ...] | None = None

    @property
    def is_segment(self) -> bool:
        return self.end is not None

    @property
    def key(self) -> str:
        """Names this unit of work for attempts and progress."""
        return f"{self.video.video_id}@{self.start}" if self.is_segment else self.video.video_id

    def describe(self) -> str:
        return f"{self.video.relative_path} [frames {self.start}-{self.end - 1}]" if self.is_segment \
            else self.video.relative_path


@dataclass(frozen=True)
class Split:
    """A worker's answer for a long video: process it as these segments (cut points, then the frame count)."""

    video: Video
    bounds: tuple[int, ...]  # [0, cut1, cut2, ..., frames]

    def tasks(self) -> list[Task]:
        return [Task(self.video, start, end) for start, end in zip(self.bounds, self.bounds[1:], strict=False)]


def is_long(frames: int, segment_frames: int) -> bool:
    """Whether a video of `frames` is cut into segments of about `segment_frames` (at least 1.5 of them)."""
    return frames >= segment_frames + segment_frames // 2


def cut_points(keyframes: np.ndarray, frames: int, segment_frames: int) -> list[int]:
    """Segment bounds [0, ..., frames]: a video of at least 1.5 `segment_frames` is cut into
    round(frames / segment_frames) (at least 2) segments of about equal length, so that no short
    segment is left over and the actors given a video's segments finish them together.
    """
    if not is_long(frames, segment_frames):
        return [0, frames]
    count = max(2, round(frames / segment_frames))
    return snap_cuts(keyframes, frames, [round(k * frames / count) for k in range(1, count)])


def snap_cuts(keyframes: np.ndarray, frames: int, cuts: Sequence[int]) -> list[int]:
    """Segment bounds [0, ..., frames] from ideal cuts (ascending; those outside the video dropped).

    A cut goes to the keyframe nearest its ideal frame when one is within a quarter of the shorter
    segment beside it (the segment then starts decoding where it starts); else to the ideal frame
    itself, and the segment decodes from the keyframe before it, dropping those frames (decoding costs
    a small fraction of detecting, benchmarks/throughput.md), so videos with few keyframes still split.
    """
    keys = np.unique(keyframes)
    ideal = [0, *(c for c in cuts if 0 < c < frames), frames]
    bounds = [0]
    for before, cut, after in zip(ideal, ideal[1:-1], ideal[2:], strict=False):
        window = min(cut - before, after - cut) // 4
        near = keys[(keys > bounds[-1]) & (keys < frames) & (np.abs(keys - cut) <= window)]
        cut = int(near[np.argmin(np.abs(near - cut))]) if near.size else cut
        if cut > bounds[-1]:
            bounds.append(cut)
    return [*bounds, frames]


def merge(video: Video, segments: list[VideoStatus]) -> VideoStatus:
    """One row for a split video: counts summed over its segments, the first damage as its error."""
    ordered = sorted(segments, key=lambda s: s.segment_start)
    first = next((s for s in ordered if s.width is not None), ordered[0])
    merged = dataclasses.replace(first, video_id=video.video_id, path=video.relative_path, segment_start=0)
    merged.frame_count = sum(s.frame_count or 0 for s in ordered)
    merged.frames_processed = sum(s.frames_processed for s in ordered)
    merged.frames_this_run = sum(s.frames_this_run for s in ordered)
    merged.detections = sum(s.detections for s in ordered)
    merged.seconds = round(sum(s.seconds or 0.0 for s in ordered), 3)
    merged.attempts = max(s.attempts for s in ordered)
    merged.retryable = any(s.retryable for s in ordered)
    damaged = [s for s in ordered if s.status != "ok"]
    if not damaged:
        merged.status, merged.error = "ok", None
    else:
        merged.status = "failed" if all(s.status == "failed" for s in ordered) else "partial"
        merged.error = "; ".join(f"segment from frame {s.segment_start}: {s.error}" for s in damaged)
    return merged
