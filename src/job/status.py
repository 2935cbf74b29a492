"""A video's outcome (`VideoStatus`): filled by its worker, kept by the driver, one row of videos.parquet."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

import polars as pl


def _column(dtype: Any, default: Any = None) -> Any:
    return field(default=default, metadata={"dtype": dtype})


@dataclass
class VideoStatus:
    """One video's outcome: the worker fills it, the driver keeps it, `videos.parquet` holds one per file."""

    video_id: str = _column(pl.String)
    path: str = _column(pl.String)
    status: str = _column(pl.String, "failed")  # ok | partial | failed | missing (the file is gone)
    error: str | None = _column(pl.String)
    frame_count: int | None = _column(pl.Int64)
    frames_processed: int = _column(pl.Int64, 0)
    detections: int = _column(pl.Int64, 0)
    width: int | None = _column(pl.Int64)
    height: int | None = _column(pl.Int64)
    fps: float | None = _column(pl.Float64)
    duration_s: float | None = _column(pl.Float64)
    codec: str | None = _column(pl.String)
    rotation: int | None = _column(pl.Int64)
    seconds: float | None = _column(pl.Float64)
    attempts: int = _column(pl.Int64, 1)
    worker: str | None = _column(pl.String)  # host:pid of the Ray actor that finished it
    device: str | None = _column(pl.String)
    tracks: int | None = _column(pl.Int64)  # distinct confirmed tracks (with a tracker), filled in by the driver
    line_crossings: int | None = _column(pl.Int64)  # with analytics lines: crossings of all lines, both ways
    zone_visits: int | None = _column(pl.Int64)  # with analytics zones: visits of all zones
    # Kept in the status record, not in the table: whether a rerun should try again (not for facts
    # about the file, yes for crashes and bugs), and the frames this attempt detected (the rest of
    # frames_processed was committed by an earlier run).
    retryable: bool = False
    frames_this_run: int = 0
    fingerprint: str | None = None  # storage.fingerprint of the content the detections came from
    file_identity: str | None = None  # storage.file_identity of a local file, taken before its fingerprint
    segment_start: int = 0  # a segment's status (segments.py): its first frame

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> VideoStatus:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in json.loads(data).items() if k in known})


VIDEO_SCHEMA = {f.name: f.metadata["dtype"] for f in dataclasses.fields(VideoStatus) if "dtype" in f.metadata}
