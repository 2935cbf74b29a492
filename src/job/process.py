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
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from job import write
from job.decode import DecodeProgress, FrameBatch, VideoError, VideoInfo, iter_batches, probe
from job.detect import Detector
from job.discover import Video, local_copy
from job.errors import FetchError, OutputWriteError

log = logging.getLogger(__name__)
T = TypeVar("T")

# Called with (frames just detected, frames newly known to be expected) for the progress bar.
ProgressCallback = Callable[[int, int], None]


def process_video(video: Video, cfg: dict[str, Any], detector: Detector,
                  on_progress: ProgressCallback | None = None, attempts: int = 1) -> dict[str, Any]:
    """Runs one video to its final status row, committing detections as it goes.

    Never raises for a bad video: the reason goes into the row's `error`.
    """
    try:
        with local_copy(video.path) as path:
            return _process_local(video, path, cfg, detector, on_progress, attempts)
    except FetchError as exc:  # the object store would not give us the video
        row = _new_row(video, detector, attempts)
        row["error"], row["retryable"] = f"cannot fetch the video: {exc}", True
        return _finish(cfg["output_dir"], row, time.monotonic())


def _process_local(
    video: Video,
    path: str,
    cfg: dict[str, Any],
    detector: Detector,
    on_progress: ProgressCallback | None = None,
    attempts: int = 1,
) -> dict[str, Any]:
    on_progress = on_progress or (lambda done, expected: None)
    output_dir = cfg["output_dir"]
    stride = cfg["frame_stride"]
    started = time.monotonic()
    row = _new_row(video, detector, attempts)
    try:
        info = probe(path)
    except VideoError as exc:
        row["error"] = str(exc)
        return _finish(output_dir, row, started)
    row.update(width=info.width, height=info.height, fps=info.fps, duration_s=info.duration_s,
               codec=info.codec, rotation=info.rotation)

    start = write.committed_end(output_dir, video.video_id)
    expected = info.container_frames or (len(info.pts_s) if info.pts_s is not None else 0)
    on_progress(0, max(0, math.ceil(expected / stride) - math.ceil(start / stride)))
    committer = _PartCommitter(output_dir, video.video_id, start, cfg, detector.class_names)
    progress = DecodeProgress()
    failure = None
    try:
        batches = iter_batches(path, info, batch_size(cfg, detector), stride, start, cfg["decoder"], progress,
                               threads=torch.get_num_threads())
        for batch in prefetch(batches, _prefetch_depth(cfg, detector)):
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
        row["retryable"] = True

    frame_count = progress.frames_decoded
    row["frame_count"] = frame_count
    row["frames_processed"] = committer.frames_processed
    row["detections"] = committer.detections
    damage = failure or progress.damage or _missing_frames(info, frame_count)
    if damage is None:
        row["status"] = "ok"
    else:
        row["status"] = "partial" if committer.end > 0 else "failed"
        row["error"] = damage
        if frame_count == 0 and failure is None:
            row["error"] = f"no frame could be decoded ({info.codec}): {damage}"
    return _finish(output_dir, row, started)


def _new_row(video: Video, detector: Detector, attempts: int) -> dict[str, Any]:
    return {
        "video_id": video.video_id, "path": video.relative_path, "status": "failed", "error": None,
        "frame_count": None, "frames_processed": 0, "detections": 0, "attempts": attempts,
        "worker": f"{socket.gethostname()}:{os.getpid()}", "device": str(detector.device),
        # Whether a rerun should try again: not for facts about the file, yes for crashes and bugs.
        "retryable": False,
    }


def batch_size(cfg: dict[str, Any], detector: Detector) -> int:
    """cfg's batch_size, or the device's default when it is null (see config.JobConfig)."""
    if cfg["batch_size"] is not None:
        return cfg["batch_size"]
    return 16 if detector.device.type == "cuda" else 4


def _prefetch_depth(cfg: dict[str, Any], detector: Detector) -> int:
    if cfg["prefetch_batches"] is not None:
        return cfg["prefetch_batches"]
    return 2 if detector.device.type == "cuda" else 0


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

    def __init__(self, output_dir: Path, video_id: str, start: int, cfg: dict[str, Any], class_names: list[str]):
        self.output_dir, self.video_id, self.class_names = output_dir, video_id, class_names
        self.every = cfg["output"]["commit_every_frames"]
        self.compression = cfg["output"]["compression"]
        self.end = start  # frames [0, end) are committed
        self.frames_processed = math.ceil(start / cfg["frame_stride"])
        # Rows in committed parts: an earlier run's, read from their footers once, plus ours.
        self.detections = write.count_detections(output_dir, video_id) if start else 0
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
        rows = write.detections_frame(
            indices,
            np.concatenate([t for _, t, _ in self._pending]),
            [d.boxes.numpy() for d in dets],
            [d.scores.numpy() for d in dets],
            [d.labels.numpy() for d in dets],
            self.class_names,
        )
        end = int(indices[-1]) + 1
        try:
            write.commit_part(self.output_dir, self.video_id, self.end, end, rows, self.compression)
        except OSError as exc:
            raise OutputWriteError.from_os_error(self.output_dir, exc) from exc
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


def _finish(output_dir: Path, row: dict[str, Any], started: float) -> dict[str, Any]:
    row["seconds"] = round(time.monotonic() - started, 3)
    try:
        write.write_status(output_dir, row)
    except OSError as exc:
        raise OutputWriteError.from_os_error(output_dir, exc) from exc
    return row
