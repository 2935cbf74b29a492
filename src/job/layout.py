"""Where everything lives in output_dir, and how a reader reads the detections back.

    output_dir/
      predictions/video_id=<id>/part-<start>-<end>.parquet   detections of frames [start, end)
      tracks/video_id=<id>/tracks.parquet                     its detections with track_id (tracker=...)
      track_summary.parquet                                   one row per track
      analytics/line_crossings.parquet, zone_visits.parquet, counts.parquet   lines and zones (analytics=...)
      videos.parquet                                          one row per discovered file
      manifest.json                                           the last run: config, versions, totals
      _state/settings.json                                    what the detections depend on
      _state/videos/<id>.json                                 a video's final status (its commit record)
      _state/status_index.parquet                             those records as of the last run's end (planning)
      _state/progress/<id>.json                               the content fingerprint a video's parts come from
      _state/tracks/<id>.json                                 what a video's tracks were made from
      _state/segments/<id>/<start>.json                       a finished segment's status (a split video)
      _state/lease.json                                       the running job's lease (lease.py)
      _state/tmp/                                             local writes staged before their rename

Every path below is built here, one helper per kind of record, so the layout is written down once.
"""

from __future__ import annotations

import re

import polars as pl

PREDICTIONS = "predictions"
TRACKS = "tracks"
TRACK_SUMMARY = "track_summary.parquet"
VIDEOS_TABLE = "videos.parquet"
MANIFEST = "manifest.json"
STATE = "_state"
SETTINGS_RECORD = f"{STATE}/settings.json"
STATUS_DIR = f"{STATE}/videos"
STATUS_INDEX = f"{STATE}/status_index.parquet"  # every status record at the end of a run, with its version
PROGRESS_DIR = f"{STATE}/progress"
TRACKS_STATE_DIR = f"{STATE}/tracks"
SEGMENTS_DIR = f"{STATE}/segments"
ANALYTICS = "analytics"
LINE_CROSSINGS = f"{ANALYTICS}/line_crossings.parquet"
ZONE_VISITS = f"{ANALYTICS}/zone_visits.parquet"
ANALYTICS_COUNTS = f"{ANALYTICS}/counts.parquet"
ANALYTICS_RECORD = f"{STATE}/analytics.json"  # what the analytics tables were computed from
EVALUATION = "evaluation"
EVALUATION_DETECTION = f"{EVALUATION}/detection.parquet"
EVALUATION_TRACKING = f"{EVALUATION}/tracking.parquet"
EVALUATION_SUMMARY = f"{EVALUATION}/summary.json"

PREDICTION_SCHEMA = {
    "frame_index": pl.Int64,
    "timestamp_s": pl.Float64,
    "class_id": pl.Int64,
    "class_name": pl.String,
    "score": pl.Float32,
    "x1": pl.Float32,
    "y1": pl.Float32,
    "x2": pl.Float32,
    "y2": pl.Float32,
}

PART = re.compile(r"^part-(\d{10})-(\d{10})\.parquet$")


def partition(video_id: str) -> str:
    """The directory of a video's parts."""
    return f"{PREDICTIONS}/video_id={video_id}"


def part(video_id: str, start: int, end: int) -> str:
    """A part of frames [start, end): its name is its commit record."""
    return f"{partition(video_id)}/part-{start:010d}-{end:010d}.parquet"


def status_record(video_id: str) -> str:
    """A video's final status: present once it is finished."""
    return f"{STATUS_DIR}/{video_id}.json"


def progress_record(video_id: str) -> str:
    """The fingerprint (and cuts) a started video's parts come from."""
    return f"{PROGRESS_DIR}/{video_id}.json"


def segments_dir(video_id: str) -> str:
    return f"{SEGMENTS_DIR}/{video_id}"


def segment_record(video_id: str, start: int) -> str:
    """A finished segment's status, by its first frame."""
    return f"{segments_dir(video_id)}/{start}.json"


def tracks_dir(video_id: str) -> str:
    return f"{TRACKS}/video_id={video_id}"


def tracks_file(video_id: str) -> str:
    return f"{tracks_dir(video_id)}/tracks.parquet"


def tracks_record(video_id: str) -> str:
    """What a video's tracks were made from (written after its tracks file)."""
    return f"{TRACKS_STATE_DIR}/{video_id}.json"


def scan_predictions(output_dir: str, storage_options: dict[str, str] | None = None) -> pl.LazyFrame:
    """All detections, with video_id from the partition directory; the way users read the output.

    video_id is taken from the part's own directory, not by Hive parsing of the whole path: polars reads
    every `key=value` directory as a partition, and a sweep's run directories (`score_threshold=0.25`)
    would then be columns the schema does not know.
    """
    return pl.scan_parquet(
        f"{output_dir}/{PREDICTIONS}/**/*.parquet",
        hive_partitioning=False,
        schema=PREDICTION_SCHEMA,
        storage_options=storage_options,
        include_file_paths="_part_path",
    ).select(
        pl.exclude("_part_path"),
        pl.col("_part_path").str.extract(r"video_id=([^/]+)/[^/]+$").alias("video_id"),
    )
