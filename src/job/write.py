"""Output layout and the commit protocol that makes results exactly-once and resumable.

    output_dir/
      predictions/video_id=<id>/part-<start>-<end>.parquet   detections of frames [start, end)
      videos.parquet                                          one row per discovered file
      manifest.json                                           the last run: config, versions, totals
      _state/settings.json                                    what the detections depend on
      _state/videos/<id>.json                                 a video's final status (its commit record)

Every file is written to a temporary name, fsynced and renamed, so a reader never sees a torn
file and a kill at any moment leaves only whole parts. A part's name is its commit record: on
rerun a video resumes at the end of its unbroken chain of parts from frame 0.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

PREDICTIONS = "predictions"
VIDEOS_TABLE = "videos.parquet"
MANIFEST = "manifest.json"
STATE = "_state"

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

VIDEO_SCHEMA = {
    "video_id": pl.String,
    "path": pl.String,
    "status": pl.String,  # ok | partial | failed
    "error": pl.String,
    "frame_count": pl.Int64,
    "frames_processed": pl.Int64,
    "detections": pl.Int64,
    "width": pl.Int64,
    "height": pl.Int64,
    "fps": pl.Float64,
    "duration_s": pl.Float64,
    "codec": pl.String,
    "rotation": pl.Int64,
    "seconds": pl.Float64,
    "attempts": pl.Int64,
    "worker": pl.String,  # host:pid of the Ray actor that finished it
    "device": pl.String,
}

_PART = re.compile(r"^part-(\d{10})-(\d{10})\.parquet$")


class SettingsMismatchError(RuntimeError):
    """output_dir holds results made with different detection settings."""


class OutputNotWritableError(RuntimeError):
    pass


def atomic_write(path: Path, write) -> None:
    """Write through `write(handle)` to a hidden temp file, fsync, rename over `path`, fsync the dir."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: Path, data: Any) -> None:
    payload = json.dumps(data, indent=2, sort_keys=True, default=str).encode()
    atomic_write(path, lambda handle: handle.write(payload))


def check_writable(output_dir: Path) -> None:
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(output_dir / STATE / ".write_check", lambda handle: handle.write(b"ok"))
        (output_dir / STATE / ".write_check").unlink()
    except OSError as exc:
        raise OutputNotWritableError(
            f"output_dir={output_dir} is not writable ({exc.strerror or exc}); pass a directory you can write to"
        ) from exc


def ensure_settings(output_dir: Path, settings: dict[str, Any]) -> None:
    """Record the detection settings, or refuse if output_dir already holds results of others."""
    path = output_dir / STATE / "settings.json"
    if path.exists():
        stored = json.loads(path.read_text())
        changed = {k: (stored.get(k), v) for k, v in settings.items() if stored.get(k) != v}
        if changed:
            described = ", ".join(f"{k}: stored {old!r}, now {new!r}" for k, (old, new) in changed.items())
            raise SettingsMismatchError(
                f"output_dir={output_dir} holds detections made with other settings ({described}); "
                f"mixing them would corrupt the table. Use a new output_dir, or rerun with the stored settings."
            )
        return
    atomic_write_json(path, settings)


def partition_dir(output_dir: Path, video_id: str) -> Path:
    return output_dir / PREDICTIONS / f"video_id={video_id}"


def committed_end(output_dir: Path, video_id: str) -> int:
    """Frame index a rerun resumes at; removes temp files and parts outside the chain from 0."""
    directory = partition_dir(output_dir, video_id)
    if not directory.is_dir():
        return 0
    parts = []
    for entry in directory.iterdir():
        match = _PART.match(entry.name)
        if match:
            parts.append((int(match.group(1)), int(match.group(2)), entry))
        elif entry.name.endswith(".tmp"):
            entry.unlink(missing_ok=True)  # a write that was killed before its rename
    end = 0
    for start, stop, entry in sorted(parts):
        if start == end:
            end = stop
        else:
            entry.unlink(missing_ok=True)  # cannot happen with sequential commits; never keep a gap
    return end


def commit_part(output_dir: Path, video_id: str, start: int, end: int, rows: pl.DataFrame, compression: str) -> None:
    path = partition_dir(output_dir, video_id) / f"part-{start:010d}-{end:010d}.parquet"
    atomic_write(path, lambda handle: rows.write_parquet(handle, compression=compression, statistics=True))


def detections_frame(
    frame_indices: Iterable[int],
    timestamps_s: Iterable[float],
    boxes: list[np.ndarray],
    scores: list[np.ndarray],
    labels: list[np.ndarray],
    class_names: list[str],
) -> pl.DataFrame:
    """Flatten per-frame detections into prediction rows."""
    counts = [len(s) for s in scores]
    if sum(counts) == 0:
        return pl.DataFrame(schema=PREDICTION_SCHEMA)
    box = np.concatenate(boxes).reshape(-1, 4)
    label = np.concatenate(labels).astype(np.int64)
    names = np.asarray(class_names, dtype=object)[label]
    return pl.DataFrame(
        {
            "frame_index": np.repeat(np.fromiter(frame_indices, dtype=np.int64), counts),
            "timestamp_s": np.repeat(np.fromiter(timestamps_s, dtype=np.float64), counts),
            "class_id": label,
            "class_name": names.tolist(),
            "score": np.concatenate(scores).astype(np.float32),
            "x1": box[:, 0], "y1": box[:, 1], "x2": box[:, 2], "y2": box[:, 3],
        },
        schema=PREDICTION_SCHEMA,
    )


def status_path(output_dir: Path, video_id: str) -> Path:
    return output_dir / STATE / "videos" / f"{video_id}.json"


def write_status(output_dir: Path, row: dict[str, Any]) -> None:
    atomic_write_json(status_path(output_dir, row["video_id"]), row)


def read_status(output_dir: Path, video_id: str) -> dict[str, Any] | None:
    path = status_path(output_dir, video_id)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def write_videos_table(output_dir: Path, rows: list[dict[str, Any]]) -> None:
    frame = pl.DataFrame([{k: row.get(k) for k in VIDEO_SCHEMA} for row in rows], schema=VIDEO_SCHEMA)
    frame = frame.sort("path")
    atomic_write(output_dir / VIDEOS_TABLE, lambda handle: frame.write_parquet(handle))


def write_manifest(output_dir: Path, manifest: dict[str, Any]) -> None:
    atomic_write_json(output_dir / MANIFEST, manifest)


def scan_predictions(output_dir: str | os.PathLike) -> pl.LazyFrame:
    """All detections, with video_id from the Hive partition; the way users read the output."""
    return pl.scan_parquet(
        f"{output_dir}/{PREDICTIONS}/**/*.parquet",
        hive_partitioning=True,
        hive_schema={"video_id": pl.String},
        schema=PREDICTION_SCHEMA,
    )


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
