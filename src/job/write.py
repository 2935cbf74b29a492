"""Output layout and the commit protocol that makes results exactly-once and resumable.

    output_dir/
      predictions/video_id=<id>/part-<start>-<end>.parquet   detections of frames [start, end)
      videos.parquet                                          one row per discovered file
      manifest.json                                           the last run: config, versions, totals
      _state/settings.json                                    what the detections depend on
      _state/videos/<id>.json                                 a video's final status (its commit record)

Every file appears atomically (locally: temp name, fsync, rename; on object stores: one PUT),
so a reader never sees a torn file and a kill at any moment leaves only whole parts. A part's name is its commit record: on
rerun a video resumes at the end of its unbroken chain of parts from frame 0.
"""

from __future__ import annotations

import io
import json
import os
import re
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from job.discover import filesystem_for, is_uri

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


class Output:
    """output_dir on a local filesystem or an object store, behind one atomic `put`.

    Locally an object is written to a hidden temp name, fsynced and renamed. Object stores have no
    rename, but a PUT (or a completed multipart upload) is itself atomic: the object appears whole or
    not at all. So on both, every object a reader can list is complete, and its presence is the commit.
    """

    def __init__(self, output_dir: str | os.PathLike) -> None:
        text = str(output_dir)
        if is_uri(text):
            self.fs, self.root = filesystem_for(text)
            self.local = False
        else:
            self.fs, self.root = pafs.LocalFileSystem(), os.path.abspath(text.removeprefix("file://"))
            self.local = True

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def put(self, relative: str, data: bytes) -> None:
        if self.local:
            atomic_write(Path(self.path(relative)), lambda handle: handle.write(data))
        else:
            with self.fs.open_output_stream(self.path(relative)) as stream:
                stream.write(data)

    def get(self, relative: str) -> bytes | None:
        try:
            with self.fs.open_input_stream(self.path(relative)) as stream:
                return stream.read()
        except FileNotFoundError:
            return None

    def names(self, relative_dir: str) -> list[str]:
        selector = pafs.FileSelector(self.path(relative_dir), allow_not_found=True)
        return [info.base_name for info in self.fs.get_file_info(selector) if info.type == pafs.FileType.File]

    def delete(self, relative: str) -> None:
        try:
            self.fs.delete_file(self.path(relative))
        except FileNotFoundError:
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


def _json_bytes(data: Any) -> bytes:
    return json.dumps(data, indent=2, sort_keys=True, default=str).encode()


def _parquet_bytes(frame: pl.DataFrame, **options: Any) -> bytes:
    buffer = io.BytesIO()
    frame.write_parquet(buffer, **options)
    return buffer.getvalue()


def check_writable(output_dir: str | os.PathLike) -> None:
    out = Output(output_dir)
    try:
        if out.local:
            Path(out.root).mkdir(parents=True, exist_ok=True)
        out.put(f"{STATE}/.write_check", b"ok")
        out.delete(f"{STATE}/.write_check")
    except OSError as exc:
        raise OutputNotWritableError(
            f"output_dir={output_dir} is not writable ({getattr(exc, 'strerror', None) or exc}); "
            f"pass a location you can write to"
        ) from exc


def ensure_settings(output_dir: str | os.PathLike, settings: dict[str, Any]) -> None:
    """Record the detection settings, or refuse if output_dir already holds results of others."""
    out = Output(output_dir)
    stored_bytes = out.get(f"{STATE}/settings.json")
    if stored_bytes is not None:
        stored = json.loads(stored_bytes)
        changed = {k: (stored.get(k), v) for k, v in settings.items() if stored.get(k) != v}
        if changed:
            described = ", ".join(f"{k}: stored {old!r}, now {new!r}" for k, (old, new) in changed.items())
            raise SettingsMismatchError(
                f"output_dir={output_dir} holds detections made with other settings ({described}); "
                f"mixing them would corrupt the table. Use a new output_dir, or rerun with the stored settings."
            )
        return
    out.put(f"{STATE}/settings.json", _json_bytes(settings))


def partition(video_id: str) -> str:
    return f"{PREDICTIONS}/video_id={video_id}"


def partition_dir(output_dir: str | os.PathLike, video_id: str) -> Path:
    """The partition's local directory (local output_dir only)."""
    return Path(output_dir) / partition(video_id)


def committed_end(output_dir: str | os.PathLike, video_id: str) -> int:
    """Frame index a rerun resumes at; removes temp files and parts outside the chain from 0."""
    out = Output(output_dir)
    directory = partition(video_id)
    parts = []
    for name in out.names(directory):
        match = _PART.match(name)
        if match:
            parts.append((int(match.group(1)), int(match.group(2)), name))
        elif name.endswith(".tmp"):
            out.delete(f"{directory}/{name}")  # a local write that was killed before its rename
    end = 0
    for start, stop, name in sorted(parts):
        if start == end:
            end = stop
        else:
            out.delete(f"{directory}/{name}")  # cannot happen with sequential commits; never keep a gap
    return end


def commit_part(output_dir: str | os.PathLike, video_id: str, start: int, end: int, rows: pl.DataFrame,
                compression: str) -> None:
    data = _parquet_bytes(rows, compression=compression, statistics=True)
    Output(output_dir).put(f"{partition(video_id)}/part-{start:010d}-{end:010d}.parquet", data)


def count_detections(output_dir: str | os.PathLike, video_id: str) -> int:
    out = Output(output_dir)
    total = 0
    for name in out.names(partition(video_id)):
        if _PART.match(name):
            with out.fs.open_input_file(out.path(partition(video_id), name)) as handle:
                total += pq.ParquetFile(handle).metadata.num_rows
    return total


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


def write_status(output_dir: str | os.PathLike, row: dict[str, Any]) -> None:
    Output(output_dir).put(f"{STATE}/videos/{row['video_id']}.json", _json_bytes(row))


def read_status(output_dir: str | os.PathLike, video_id: str) -> dict[str, Any] | None:
    data = Output(output_dir).get(f"{STATE}/videos/{video_id}.json")
    return json.loads(data) if data is not None else None


def write_videos_table(output_dir: str | os.PathLike, rows: list[dict[str, Any]]) -> None:
    frame = pl.DataFrame([{k: row.get(k) for k in VIDEO_SCHEMA} for row in rows], schema=VIDEO_SCHEMA)
    Output(output_dir).put(VIDEOS_TABLE, _parquet_bytes(frame.sort("path")))


def write_manifest(output_dir: str | os.PathLike, manifest: dict[str, Any]) -> None:
    Output(output_dir).put(MANIFEST, _json_bytes(manifest))


def scan_predictions(output_dir: str | os.PathLike, storage_options: dict[str, str] | None = None) -> pl.LazyFrame:
    """All detections, with video_id from the Hive partition; the way users read the output."""
    return pl.scan_parquet(
        f"{output_dir}/{PREDICTIONS}/**/*.parquet",
        hive_partitioning=True,
        hive_schema={"video_id": pl.String},
        schema=PREDICTION_SCHEMA,
        storage_options=storage_options,
    )


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
