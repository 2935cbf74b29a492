"""One video through decode -> detect -> write, with resume; knows nothing of Ray.

On a GPU, decoding runs in a background thread feeding a bounded queue so the GPU never waits on
the decoder (memory stays at `prefetch_batches` batches whatever the video's length). On CPU the
model's threads already fill every core the actor has: a decode thread beside them stalls torch's
thread pool at each barrier (measured: 40 vs 48 frames/s on 2 cores), so batches are decoded
inline, by all the cores, between model calls.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import numpy as np
import torch

from job.config import JobConfig, OutputConfig
from job.decode import DecodeProgress, FrameBatch, VideoError, VideoInfo, iter_batches, probe
from job.detect import Detector
from job.discover import Video
from job.errors import FetchError, OutputWriteError
from job.storage import fingerprint, local_copy
from job.write import OutputDir, VideoStatus, detections_frame

log = logging.getLogger(__name__)
T = TypeVar("T")

# Called with (frames just detected, frames newly known to be expected) for the progress bar.
ProgressCallback = Callable[[int, int], None]


def process_video(video: Video, settings: JobConfig, output: OutputDir, detector: Detector,
                  on_progress: ProgressCallback | None = None, attempts: int = 1) -> VideoStatus:
    """Runs one video to its final status, committing detections as it goes.

    `settings` must be resolved for the detector's device (`config.for_device`).
    Never raises for a bad video: the reason goes into the status's `error`.
    """
    try:
        content = fingerprint(video.path)
    except OSError:
        content = None  # unreadable: probe says why
    try:
        with local_copy(video.path) as path:
            return _process_local(video, path, settings, output, detector, content, on_progress, attempts)
    except FetchError as exc:  # the object store would not give us the video
        status = _new_status(video, detector, attempts)
        status.error, status.retryable = f"cannot fetch the video: {exc}", True
        return _finish(output, status, time.monotonic())


def _process_local(
    video: Video,
    path: str,
    settings: JobConfig,
    output: OutputDir,
    detector: Detector,
    content: str | None,
    on_progress: ProgressCallback | None = None,
    attempts: int = 1,
) -> VideoStatus:
    on_progress = on_progress or (lambda done, expected: None)
    stride = settings.frame_stride
    started = time.monotonic()
    status = _new_status(video, detector, attempts)
    status.fingerprint = content
    try:
        info = probe(path)
    except VideoError as exc:
        status.error = str(exc)
        return _finish(output, status, started)
    status.width, status.height, status.fps = info.width, info.height, info.fps
    status.duration_s, status.codec, status.rotation = info.duration_s, info.codec, info.rotation

    start = output.resume_point(video.video_id, content, video.relative_path)
    expected = info.container_frames or (len(info.pts_s) if info.pts_s is not None else 0)
    on_progress(0, max(0, math.ceil(expected / stride) - math.ceil(start / stride)))
    committer = _PartCommitter(output, video.video_id, start, stride, settings.output, detector.class_names)
    progress = DecodeProgress()
    failure = None
    try:
        batches = iter_batches(path, info, settings.batch_size, stride, start, settings.decoder.value, progress,
                               threads=torch.get_num_threads())
        for batch in prefetch(batches, settings.prefetch_batches):
            committer.add(batch, detector(batch.frames))
            on_progress(len(batch.frame_indices), 0)
        committer.flush()
    except OutputWriteError:
        raise  # not this video's fault: the run must stop and say so
    except VideoError as exc:
        failure = str(exc)
    except Exception as exc:  # a bug or a resource error: record it, keep what was committed
        log.exception("video %s failed while processing", video.relative_path)
        failure = f"{type(exc).__name__}: {exc}"
        status.retryable = True

    frame_count = progress.frames_decoded
    status.frame_count = frame_count
    status.frames_processed = committer.frames_processed
    status.frames_this_run = committer.frames_processed - math.ceil(start / stride)
    status.detections = committer.detections
    damage = failure or progress.damage or _missing_frames(info, frame_count)
    if damage is None:
        status.status = "ok"
    else:
        status.status = "partial" if committer.end > 0 else "failed"
        status.error = damage
        if frame_count == 0 and failure is None:
            status.error = f"no frame could be decoded ({info.codec}): {damage}"
    return _finish(output, status, started)


def _new_status(video: Video, detector: Detector, attempts: int) -> VideoStatus:
    return VideoStatus(video_id=video.video_id, path=video.relative_path, attempts=attempts,
                       worker=f"{socket.gethostname()}:{os.getpid()}", device=str(detector.device))


def prefetch(iterable: Iterable[T], depth: int) -> Iterator[T]:
    """Iterate `iterable` in a background thread, at most `depth` items ahead of the consumer.

    depth 0: no thread, items are produced in the consumer's thread as it asks for them.
    """
    if depth == 0:
        yield from iterable
        return
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for item in iterable:
                while not stop.is_set():
                    try:
                        items.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            items.put(done)
        except BaseException as exc:  # re-raised in the consumer
            items.put(exc)

    worker = threading.Thread(target=produce, name="decode", daemon=True)
    worker.start()
    try:
        while True:
            item = items.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while worker.is_alive():  # unblock a producer waiting on a full queue
            try:
                items.get_nowait()
            except queue.Empty:
                worker.join(timeout=0.1)


class _PartCommitter:
    """Groups batches into parts of about `commit_every_frames` decoded frames and commits them."""

    def __init__(self, output: OutputDir, video_id: str, start: int, frame_stride: int, settings: OutputConfig,
                 class_names: list[str]):
        self.output, self.video_id, self.class_names = output, video_id, class_names
        self.every = settings.commit_every_frames
        self.compression = settings.compression
        self.end = start  # frames [0, end) are committed
        self.frames_processed = math.ceil(start / frame_stride)
        # Rows in committed parts: an earlier run's, read from their footers once, plus ours.
        self.detections = output.count_detections(video_id) if start else 0
        # Indices, timestamps and detections only: holding the frames would cost a part's worth of pixels.
        self._pending: list[tuple[np.ndarray, np.ndarray, list]] = []

    def add(self, batch: FrameBatch, detections: list) -> None:
        self._pending.append((batch.frame_indices, batch.timestamps_s, detections))
        self.frames_processed += len(batch.frame_indices)
        if int(batch.frame_indices[-1]) + 1 - self.end >= self.every:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        indices = np.concatenate([i for i, _, _ in self._pending])
        dets = [d for _, _, ds in self._pending for d in ds]
        rows = detections_frame(
            indices,
            np.concatenate([t for _, t, _ in self._pending]),
            [d.boxes.numpy() for d in dets],
            [d.scores.numpy() for d in dets],
            [d.labels.numpy() for d in dets],
            self.class_names,
        )
        end = int(indices[-1]) + 1
        self.output.commit_part(self.video_id, self.end, end, rows, self.compression)
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


def _finish(output: OutputDir, status: VideoStatus, started: float) -> VideoStatus:
    status.seconds = round(time.monotonic() - started, 3)
    output.write_status(status)
    return status
