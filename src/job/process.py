"""One task (a video, or a segment of one) through decode -> detect -> commit, with resume; no Ray here.

On a GPU, decoding runs ahead, so the GPU never waits on the decoder, with memory bounded by
`prefetch_batches` batches whatever the video's length: in a child process per stream (`decode_process`; the
default), or with `decode_processes=false` or NVDEC in a background thread (`prefetch`), as the stream's own
YUV planes that the GPU converts (`colour_on_device`); and each batch goes into the model (`Detector.submit`)
before the one before it is committed. On CPU each actor has one CPU by default and the model one thread,
so batches are decoded inline, between model calls (a decode thread beside torch's stalled its thread pool
at every barrier: benchmarks/throughput.md).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import ExitStack, closing

import numpy as np
import torch

from job.config import JobConfig, OutputConfig, decodes_in_child_processes
from job.decode import (
    BatchBuffers,
    DecodeProgress,
    FrameBatch,
    VideoError,
    VideoInfo,
    iter_batches,
    keyframe_indices,
    probe_file,
)
from job.decode_process import DecodeProcess, DecodeProcessError
from job.detect import BatchDetections, Detector, PendingDetections
from job.errors import FetchError, OutputWriteError
from job.output import OutputDir
from job.parts import detection_rows
from job.prefetch import prefetch
from job.segments import Split, Task, cut_points, snap_cuts
from job.status import VideoStatus
from job.storage import file_identity, fingerprint
from job.video_cache import VideoCache, local_copy

log = logging.getLogger(__name__)

# Called with (frames just detected, frames newly known to be expected) for the progress bar.
ProgressCallback = Callable[[int, int], None]


def process_task(task: Task, settings: JobConfig, output: OutputDir, detector: Detector,
                 on_progress: ProgressCallback | None = None, attempts: int = 1,
                 cache: VideoCache | None = None, *, decode_threads: int = 1,
                 decode_process: DecodeProcess | None = None) -> VideoStatus | Split:
    """Runs a task from the pool to its final status, committing detections as it goes: a whole video
    (`Task(video)`; or, for a long one, an answer saying how to split it, nothing processed) or a segment
    of a split one. The one entry point of this module.

    `settings` must be resolved for the detector's device (`config.for_device`). Never raises for a bad
    video: the reason goes into the status's `error`. With a `cache`, an object-store video is read from
    the node's shared copy (else from a copy of its own).

    `decode_threads`: the CPUs the decoder may use (the actor's); the model's own thread count is fixed
    apart from them (`detect.CPU_INFERENCE_THREADS`), so results never depend on the layout.
    `decode_process`: the stream's child for `settings.decode_processes`, kept between tasks (else one
    is started for this task).
    """
    if task.is_segment:
        return _process_segment(task, settings, output, detector, on_progress, attempts, cache,
                               decode_threads=decode_threads, decode_process=decode_process)
    return _process(task, settings, output, detector, on_progress, attempts, cache, decode_threads, decode_process)


def _process_segment(task: Task, settings: JobConfig, output: OutputDir, detector: Detector,
                    on_progress: ProgressCallback | None = None, attempts: int = 1,
                    cache: VideoCache | None = None, *, decode_threads: int = 1,
                    decode_process: DecodeProcess | None = None) -> VideoStatus:
    """Runs the frames [task.start, task.end) of a split video, resuming after its committed parts;
    its status is recorded as the segment's (the driver merges a video's segments into its row)."""
    done = output.statuses.read_segment(task.video.video_id, task.start)
    if done is not None:  # finished by an earlier run
        done.frames_this_run = 0
        return done
    result = _process(task, settings, output, detector, on_progress, attempts, cache, decode_threads,
                      decode_process)
    assert isinstance(result, VideoStatus)
    return result


def _process(task: Task, settings: JobConfig, output: OutputDir, detector: Detector,
             on_progress: ProgressCallback | None, attempts: int, cache: VideoCache | None,
             decode_threads: int, decode_process: DecodeProcess | None) -> VideoStatus | Split:
    video = task.video
    identity = file_identity(video.path)  # before the fingerprint: a file changed in between is hashed next time
    try:
        content = video.fingerprint or fingerprint(video.path)
    except OSError:
        content = None  # unreadable: probe says why
    try:
        with cache.local_copy(video.path, content) if cache else local_copy(video.path) as path:
            return _process_local(task, path, settings, output, detector, content, on_progress, attempts,
                                  decode_threads, identity, decode_process)
    except FetchError as exc:  # the object store would not give us the video
        status = _new_status(task, detector, attempts)
        status.error, status.retryable = f"cannot fetch the video: {exc}", True
        return _finish(output, status, time.monotonic(), task)


def _process_local(
    task: Task,
    path: str,
    settings: JobConfig,
    output: OutputDir,
    detector: Detector,
    content: str | None,
    on_progress: ProgressCallback | None = None,
    attempts: int = 1,
    decode_threads: int = 1,
    identity: str | None = None,
    decode_process: DecodeProcess | None = None,
) -> VideoStatus | Split:
    video = task.video
    on_progress = on_progress or (lambda done, expected: None)
    stride = settings.frame_stride
    started = time.monotonic()
    status = _new_status(task, detector, attempts)
    status.fingerprint, status.file_identity = content, identity
    try:
        info = probe_file(path, identity if path == video.path else None)  # a fresh local copy: probed anew
    except VideoError as exc:
        status.error = str(exc)
        return _finish(output, status, started, task)
    status.width, status.height, status.fps = info.width, info.height, info.fps
    status.duration_s, status.codec, status.rotation = info.duration_s, info.codec, info.rotation

    if task.is_segment:
        first, start = task.start, output.parts.committed_end(video.video_id, task.start, task.end)
        expected = task.end - task.start
    else:
        resume = output.parts.resume_point(video.video_id, content, video.relative_path)
        first, start = 0, resume.frame
        split = _split(task, info, settings.ray.segment_frames, output, start, resume.split)
        if split is not None:
            return split
        expected = info.container_frames or (len(info.pts_s) if info.pts_s is not None else 0)
    already = _wanted_before(start, stride) - _wanted_before(first, stride)  # frames committed by an earlier run
    on_progress(0, max(0, _wanted_before(first + expected, stride) - _wanted_before(first, stride) - already))
    committer = _PartCommitter(output, video.video_id, start, stride, settings.output, detector.class_names,
                               first, task.end)
    progress = DecodeProgress()
    failure = None
    try:
        with ExitStack() as stack:
            batches, buffers = _decoded(path, info, settings, start, task.end, progress, decode_threads,
                                        detector, decode_process, stack)
            detected = stack.enter_context(closing(_detected(batches, detector, ahead=settings.prefetch_batches > 0)))
            for batch, detections in detected:
                committer.add(batch, detections)  # the detections are on the CPU: the frames are done
                buffers.give_back(batch)
                on_progress(len(batch.frame_indices), 0)
        committer.flush()
    except OutputWriteError:
        raise  # not this video's fault: the run must stop and say so
    except VideoError as exc:
        failure = str(exc)
    except Exception as exc:  # a bug or a resource error: record it, keep what was committed
        log.exception("%s failed while processing", task.describe())
        failure = str(exc) if isinstance(exc, DecodeProcessError) else f"{type(exc).__name__}: {exc}"
        status.retryable = True

    frame_count = progress.frames_decoded - first
    status.frame_count = frame_count
    status.frames_processed = committer.frames_processed
    status.frames_this_run = committer.frames_processed - already
    status.detections = committer.detections
    if task.is_segment:
        missing = None if frame_count >= expected else (
            f"only {frame_count} of its {expected} frames could be decoded (damaged data)")
    else:
        missing = _missing_frames(info, frame_count)
    damage = failure or progress.damage or missing
    if damage is None:
        status.status = "ok"
    else:
        status.status = "partial" if committer.end > first else "failed"
        status.error = damage
        if frame_count == 0 and failure is None:
            status.error = f"no frame could be decoded ({info.codec}): {damage}"
    return _finish(output, status, started, task)


def _decoded(path: str, info: VideoInfo, settings: JobConfig, start: int, end: int | None,
             progress: DecodeProgress, threads: int, detector: Detector, child: DecodeProcess | None,
             stack: ExitStack) -> tuple[Iterator[FrameBatch], DecodeProcess | BatchBuffers]:
    """The batches to detect on, decoded ahead or inline as `settings` say, and where to hand them back;
    whatever decodes them is stopped when `stack` closes."""
    keep = settings.prefetch_batches + 3  # once the read-ahead is full, every batch goes into one handed back
    options = {"batch_size": settings.batch_size, "frame_stride": settings.frame_stride, "start_frame": start,
               "decoder": settings.decoder.value, "progress": progress, "threads": threads, "end_frame": end,
               "planar": settings.colour_on_device}
    if decodes_in_child_processes(settings):
        if child is None:
            child = stack.enter_context(DecodeProcess(keep, pin=detector.device.type == "cuda"))
        batches = stack.enter_context(closing(child.batches(path, info, **options)))
        return batches, child
    buffers = BatchBuffers(keep=keep)
    decoded = iter_batches(path, info, device=detector.device, buffers=buffers, **options)
    return stack.enter_context(closing(prefetch(decoded, settings.prefetch_batches))), buffers


def _detected(batches: Iterator[FrameBatch], detector: Detector,
              ahead: bool) -> Iterator[tuple[FrameBatch, BatchDetections]]:
    """Each batch with its detections, in order. `ahead` (decoding ahead, as on a GPU): a batch is submitted
    to the model before the one before it is handed back, so the model runs while this stream commits and
    fetches its next batch; each stream keeps the model's queue fed. Inline (on CPU), one at a time: the
    model's thread and the decoder would only take turns on the same cores."""
    if not ahead:
        for batch in batches:
            yield batch, detector.detect_batch(batch.frames, batch.planar)
        return
    in_model: deque[tuple[FrameBatch, PendingDetections]] = deque()
    try:
        for batch in batches:
            in_model.append((batch, detector.submit(batch.frames, batch.planar)))
            if len(in_model) > 1:
                batch, pending = in_model.popleft()
                yield batch, pending.result()
        while in_model:
            batch, pending = in_model.popleft()
            yield batch, pending.result()
    finally:
        for _, pending in in_model:  # stopped early: their frames are read until the model is done with them
            pending.wait()


def _split(task: Task, info: VideoInfo, segment_frames: int | None, output: OutputDir,
           start: int, recorded: list[int] | None) -> Split | None:
    """How to cut a long video (the cuts `recorded` by an earlier run win), or None to run it whole.

    A video an earlier unsplit run has committed parts of is finished whole: new cuts could cross its parts.
    """
    video = task.video
    if recorded:
        return Split(video, tuple(recorded))
    keyframes = keyframe_indices(info)
    segment_frames = task.segment_frames or segment_frames
    if start > 0 or keyframes is None:
        return None
    if task.cuts is not None:
        bounds = snap_cuts(keyframes, len(info.frame_pts), task.cuts)
    elif segment_frames is not None:
        bounds = cut_points(keyframes, len(info.frame_pts), segment_frames)
    else:
        return None
    if len(bounds) <= 2:
        return None
    output.parts.record_split(video.video_id, bounds)
    return Split(video, tuple(bounds))


def _wanted_before(index: int, stride: int) -> int:
    """How many of the frames [0, index) are detected: 0, stride, 2 * stride, ..."""
    return math.ceil(index / stride)


def _new_status(task: Task, detector: Detector, attempts: int) -> VideoStatus:
    return VideoStatus(video_id=task.video.video_id, path=task.video.relative_path, attempts=attempts,
                       worker=f"{socket.gethostname()}:{os.getpid()}", device=str(detector.device),
                       segment_start=task.start)


class _PartCommitter:
    """Groups batches into parts of about `commit_every_frames` decoded frames and commits them."""

    def __init__(self, output: OutputDir, video_id: str, start: int, frame_stride: int, settings: OutputConfig,
                 class_names: list[str], first: int = 0, last: int | None = None):
        self.output, self.video_id, self.class_names = output, video_id, class_names
        self.every = settings.commit_every_frames
        self.compression = settings.compression
        self.end = start  # frames [first, end) are committed (first: 0, or a segment's first frame)
        self.frames_processed = _wanted_before(start, frame_stride) - _wanted_before(first, frame_stride)
        # Rows in committed parts: an earlier run's, read from their footers once, plus ours.
        self.detections = output.parts.count(video_id, first, last) if start > first else 0
        # Indices, timestamps and detections only: holding the frames would cost a part's worth of pixels.
        self._pending: list[tuple[np.ndarray, np.ndarray, BatchDetections]] = []

    def add(self, batch: FrameBatch, detections: BatchDetections) -> None:
        self._pending.append((batch.frame_indices, batch.timestamps_s, detections))
        self.frames_processed += len(batch.frame_indices)
        if int(batch.frame_indices[-1]) + 1 - self.end >= self.every:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        indices = np.concatenate([i for i, _, _ in self._pending])
        found = [d for _, _, d in self._pending]
        rows = detection_rows(
            indices,
            np.concatenate([t for _, t, _ in self._pending]),
            [count for d in found for count in d.counts],
            torch.cat([d.boxes for d in found]).numpy(),
            torch.cat([d.scores for d in found]).numpy(),
            torch.cat([d.labels for d in found]).numpy(),
            self.class_names,
        )
        end = int(indices[-1]) + 1
        self.output.parts.commit(self.video_id, self.end, end, rows, self.compression)
        self.end = end
        self.detections += rows.height
        self._pending = []


def _missing_frames(info: VideoInfo, frame_count: int) -> str | None:
    """Why the decodable frames fall short of what the container promises, if they do."""
    if info.container_frames and frame_count < info.container_frames:
        return (
            f"only {frame_count} of the {info.container_frames} frames the container lists could be decoded "
            f"(truncated or damaged file); results cover frames 0-{frame_count - 1}"
        )
    if info.duration_s and info.fps and frame_count and info.pts_s is not None and len(info.pts_s):
        last = info.pts_s[min(frame_count, len(info.pts_s)) - 1]
        tolerance = max(0.25, 3.0 / info.fps)
        if info.duration_s - last > tolerance + 1.0 / info.fps:
            return (
                f"decoding ended at {last:.2f} s of a {info.duration_s:.2f} s video (truncated or damaged "
                f"file); results cover frames 0-{frame_count - 1}"
            )
    return None


def _finish(output: OutputDir, status: VideoStatus, started: float, task: Task) -> VideoStatus:
    status.seconds = round(time.monotonic() - started, 3)
    if task.is_segment:
        output.statuses.write_segment(status)  # a split video's row is written when all its segments are done
    else:
        output.statuses.write(status)
    return status
