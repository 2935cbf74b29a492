"""Track ids for finished videos' detections, with the `trackers` library; runs in the driver after detection.

A tracker needs every detected frame in order, those without detections too (they age lost tracks),
with its presentation time (so variable frame rate and frame_stride age tracks by time, not by
call). The detected frames' times are read again from the video's packets (`decode.probe`, no
decoding); a video that can no longer be read is tracked over the frames that have detections.

Tracking is not detection: a tracker's settings are not part of the detection settings, so turning
it on or changing it recomputes tracks from the committed detections without detecting again.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from importlib.metadata import version

import numpy as np
import polars as pl

from job.config import TrackerConfig
from job.errors import ConfigError
from job.layout import TRACK_SUMMARY, TRACKS
from job.output import OutputDir
from job.status import VideoStatus
from job.storage import parquet_bytes

log = logging.getLogger(__name__)

# Config name -> the library's class; arguments the config cannot express (classes, the video's fps) excluded.
CLASSES = {"bytetrack": "ByteTrackTracker", "sort": "SORTTracker", "ocsort": "OCSORTTracker"}
NOT_SETTABLE = {"self", "frame_rate", "state_estimator_class", "iou"}


def check(tracker: TrackerConfig) -> None:
    """Stops at start-up (ConfigError) when the library is missing or a parameter is not the tracker's."""
    if tracker.name is None:
        return
    try:
        import trackers
    except ImportError:
        raise ConfigError(f'tracker={tracker.name} needs the trackers library: pip install -e ".[track]" '
                          f"(or pip install trackers), or run without tracker=") from None
    settable = set(inspect.signature(getattr(trackers, CLASSES[tracker.name]).__init__).parameters) - NOT_SETTABLE
    unknown = sorted(set(tracker.params) - settable)
    if unknown:
        raise ConfigError(f"tracker.params.{unknown[0]} is not a parameter of {tracker.name}; it takes "
                          f"{', '.join(sorted(settable))} (frame_rate is always the video's)")


def new_tracker(tracker: TrackerConfig, fps: float | None):
    import trackers

    cls = getattr(trackers, CLASSES[tracker.name])
    return cls(**tracker.params, **({"frame_rate": fps} if fps else {}))


def settings_of(tracker: TrackerConfig) -> dict:
    """What a video's tracks depend on besides its detections."""

    return {"tracker": tracker.name, "params": dict(sorted(tracker.params.items())),
            "trackers_version": version("trackers")}


def track_ids(rows: pl.DataFrame, frame_indices: np.ndarray, timestamps_s: np.ndarray, tracker) -> pl.DataFrame:
    """`rows` (one video's detections) with a `track_id` column: the tracker fed frame by frame in order.

    `frame_indices`/`timestamps_s`: every detected frame, with or without detections. The library
    may reorder a frame's detections, so each carries its row number through `data`.
    """
    import supervision as sv

    rows = rows.sort("frame_index", "score", "class_id", "x1", descending=[False, True, False, False])
    ids = np.full(rows.height, -1, dtype=np.int64)
    frames = rows["frame_index"].to_numpy()
    boxes = rows.select("x1", "y1", "x2", "y2").to_numpy().astype(np.float32)
    scores, classes = rows["score"].to_numpy(), rows["class_id"].to_numpy()
    starts = np.searchsorted(frames, frame_indices, side="left")
    ends = np.searchsorted(frames, frame_indices, side="right")
    for start, end, timestamp in zip(starts, ends, timestamps_s, strict=True):
        if end > start:
            detections = sv.Detections(xyxy=boxes[start:end], confidence=scores[start:end],
                                       class_id=classes[start:end], data={"row": np.arange(start, end)})
        else:
            detections = sv.Detections.empty()
        tracked = tracker.update(detections, timestamp=float(timestamp))
        if len(tracked):
            ids[tracked.data["row"]] = tracked.tracker_id
    return rows.with_columns(pl.Series("track_id", ids).replace(-1, None).cast(pl.Int64))


def frames_to_feed(path: str | None, status: VideoStatus, frame_stride: int,
                    rows: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(frame indices, timestamps) of every frame the detector saw: from the video's packets when it can
    be read, else the frames that have detections."""
    from job.decode import VideoError, detected_frames, probe
    from job.video_cache import local_copy

    if path is not None and status.frame_count:
        try:
            with local_copy(path) as local:
                info = probe(local)
            return detected_frames(info, status.frame_count, frame_stride)
        except (VideoError, OSError) as exc:
            log.warning("%s: tracking over the frames with detections only (the video cannot be read: %s)",
                        status.path, exc)
    frames = rows.select("frame_index", "timestamp_s").unique("frame_index").sort("frame_index")
    return frames["frame_index"].to_numpy(), frames["timestamp_s"].to_numpy()


@dataclass
class TrackedVideo:
    video_id: str
    path: str | None  # where to read the video's frame times (None: gone)
    status: VideoStatus


def update_tracks(output: OutputDir, tracker: TrackerConfig, videos: Iterable[TrackedVideo],
                  frame_stride: int) -> dict[str, int]:
    """Brings tracks/ in line with the detections: recomputes what is missing or stale, drops what
    no longer matches; writes track_summary.parquet. Returns distinct confirmed tracks for each video
    that has tracks."""
    from tqdm import tqdm

    videos = list(videos)
    settings = settings_of(tracker) if tracker.name else None
    stale = [v for v in videos if not _current(output.tracks_state(v.video_id), settings, v.status)]
    if settings is None:
        for video in stale:
            output.remove_tracks(video.video_id)
    else:
        todo = [v for v in stale if v.status.status in ("ok", "partial", "missing") and v.status.detections]
        for video in stale:
            if video not in todo:
                output.remove_tracks(video.video_id)
        for video in tqdm(todo, desc="tracking", unit="video", disable=not todo, dynamic_ncols=True):
            rows = output.parts.read(video.video_id)
            indices, times = frames_to_feed(video.path if video.status.status != "missing" else None,
                                             video.status, frame_stride, rows)
            tracked = track_ids(rows, indices, times, new_tracker(tracker, video.status.fps))
            output.write_tracks(video.video_id, tracked, _state(settings, video.status))
    summary = write_track_summary(output)
    counts = {} if summary is None else dict(summary.group_by("video_id").len().iter_rows())
    return {v.video_id: counts.get(v.video_id, 0) for v in videos if output.tracks_state(v.video_id) is not None}


def _state(settings: dict, status: VideoStatus) -> dict:
    return {**settings, "detections": _detections_identity(status)}


def _detections_identity(status: VideoStatus) -> dict:
    return {k: getattr(status, k) for k in ("fingerprint", "frame_count", "frames_processed", "detections")}


def _current(stored: dict | None, settings: dict | None, status: VideoStatus) -> bool:
    """Whether a video's tracks (or their absence) fit its detections and the tracker asked for.

    Without a tracker, tracks made earlier stay while the detections they came from are unchanged.
    """
    if stored is None:
        return settings is None
    if stored.get("detections") != _detections_identity(status):
        return False
    return settings is None or all(stored.get(key) == value for key, value in settings.items())


def write_track_summary(output: OutputDir) -> pl.DataFrame | None:
    """track_summary.parquet from every video's tracks (removed when there are none); returns it."""
    if not any(name.startswith("video_id=") for name in output.store.entries(TRACKS)):
        output.store.delete(TRACK_SUMMARY)
        return None
    tracked = pl.concat([
        pl.read_parquet(data).with_columns(pl.lit(name.removeprefix("video_id=")).alias("video_id"))
        for name in sorted(output.store.entries(TRACKS))
        if (data := output.store.get(f"{TRACKS}/{name}/tracks.parquet")) is not None
    ], how="diagonal_relaxed")
    summary = (
        tracked.filter(pl.col("track_id").is_not_null())
        .sort("video_id", "track_id", "frame_index")
        .group_by("video_id", "track_id", maintain_order=True)
        .agg(
            pl.col("class_name").mode().sort().first().alias("class_name"),
            pl.col("frame_index").first().alias("first_frame_index"),
            pl.col("frame_index").last().alias("last_frame_index"),
            pl.col("timestamp_s").first().alias("first_timestamp_s"),
            pl.col("timestamp_s").last().alias("last_timestamp_s"),
            pl.col("frame_index").n_unique().cast(pl.Int64).alias("frames"),
            pl.col("score").mean().alias("mean_score"),
            pl.col("score").max().alias("max_score"),
        )
    )
    output.store.put(TRACK_SUMMARY, parquet_bytes(summary))
    return summary
