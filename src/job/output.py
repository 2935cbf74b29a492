"""The commit protocol on output_dir's layout (`layout.py`): parts, records, tables, all exactly once.

Every object appears atomically (`storage.Store.put`), so a reader never sees a torn file and a kill
at any moment leaves only whole parts. A part's name is its commit record: on rerun a video resumes
at the end of its unbroken chain of parts from frame 0.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from job.errors import ConfigError, SettingsMismatchError
from job.layout import (
    ANALYTICS_COUNTS,
    ANALYTICS_RECORD,
    LINE_CROSSINGS,
    MANIFEST,
    PART,
    PREDICTION_SCHEMA,
    PREDICTIONS,
    PROGRESS_DIR,
    SETTINGS_RECORD,
    STATE,
    STATUS_DIR,
    STATUS_INDEX,
    TRACKS,
    TRACKS_STATE_DIR,
    VIDEOS_TABLE,
    ZONE_VISITS,
    part,
    partition,
    progress_record,
    segment_record,
    segments_dir,
    status_record,
    tracks_dir,
    tracks_file,
    tracks_record,
)
from job.status import VIDEO_SCHEMA, VideoStatus
from job.storage import TMP_DIR, Store

log = logging.getLogger(__name__)


def json_bytes(data: Any) -> bytes:
    return json.dumps(data, indent=2, sort_keys=True, default=str).encode()


def parquet_bytes(frame: pl.DataFrame, **options: Any) -> bytes:
    buffer = io.BytesIO()
    frame.write_parquet(buffer, **options)
    return buffer.getvalue()


@dataclasses.dataclass(frozen=True)
class ResumePoint:
    """Where a video's detection resumes, and the segment bounds recorded for it (a split video)."""

    frame: int
    split: list[int] | None = None


class OutputDir:
    """The job's output layout on a `Store`: parts, status records, settings, tables, manifest."""

    def __init__(self, store: Store | str) -> None:
        self.store = store if isinstance(store, Store) else Store(store)

    @property
    def location(self) -> str:
        return self.store.location

    def ensure_settings(self, settings: dict[str, Any]) -> None:
        """Record the detection settings, or refuse if output_dir already holds results of others."""
        if self.check_settings(settings):
            self.store.put(SETTINGS_RECORD, json_bytes(settings))

    def check_settings(self, settings: dict[str, Any]) -> bool:
        """Refuse if output_dir holds results made with other settings; whether they need recording."""
        stored_bytes = self.store.get(SETTINGS_RECORD)
        if stored_bytes is not None:
            stored = json.loads(stored_bytes)
            changed = {k: (stored.get(k), v) for k, v in settings.items() if stored.get(k) != v}
            if not changed:
                return False
            if self.has_results():
                described = ", ".join(f"{k}: stored {old!r}, now {new!r}" for k, (old, new) in changed.items())
                raise SettingsMismatchError(
                    f"output_dir={self.location} holds detections made with other settings ({described}); "
                    f"mixing them would corrupt the table. Use a new output_dir, or rerun with the stored settings."
                )
            # An earlier start failed before detecting anything (e.g. weights it could not load): its
            # settings protect nothing, so the corrected command may go ahead.
            log.warning("output_dir=%s: replacing the settings of an earlier run that wrote no results", self.location)
        return True

    def clear_staging(self) -> None:
        """Remove temp files that killed writes left in the staging directory (call under the lease)."""
        for name in self.store.names(TMP_DIR):
            self.store.delete(f"{TMP_DIR}/{name}")

    def has_results(self) -> bool:
        """Whether any video has committed a part or a final status here."""
        return bool(self.store.entries(PREDICTIONS)) or bool(self.store.names(STATUS_DIR))

    def foreign_entries(self) -> list[str]:
        """What output_dir holds that this job did not write, when it holds no job state at all."""
        entries = self.store.entries()
        if STATE in entries:
            return []
        return sorted(name for name in entries if name != ".hydra_logs")

    def committed_end(self, video_id: str, start: int = 0, end: int | None = None) -> int:
        """Frame index a rerun resumes the frames [start, end) of `video_id` at: the end of the unbroken
        chain of its parts from `start`. Parts in the range outside that chain are removed."""
        reached = start
        for first, stop, name in self._parts(video_id, start, end):
            if first == reached:
                reached = stop
            else:  # cannot happen with sequential commits; never keep a gap
                self.store.delete(f"{partition(video_id)}/{name}")
        return reached

    def _parts(self, video_id: str, start: int = 0, end: int | None = None) -> list[tuple[int, int, str]]:
        """(first frame, end frame, name) of the video's parts within the frames [start, end), in frame order."""
        parts = []
        for name in self.store.names(partition(video_id)):
            match = PART.match(name)
            if match and int(match.group(1)) >= start and (end is None or int(match.group(2)) <= end):
                parts.append((int(match.group(1)), int(match.group(2)), name))
        return sorted(parts)

    def resume_point(self, video_id: str, fingerprint: str | None, path: str | None = None) -> ResumePoint:
        """Where to resume `video_id` whose content now has `fingerprint`: after its committed parts, or at 0.

        Parts of other content (the file was replaced since they were committed) are deleted first,
        with the video's status; the fingerprint is recorded before the first new part is committed, so
        a video without the record has no parts to look for (one request fewer per new video).
        """
        record = progress_record(video_id)
        stored_bytes = self.store.get(record)
        stored = json.loads(stored_bytes) if stored_bytes is not None else None
        if stored is not None and stored.get("fingerprint") == fingerprint:
            return ResumePoint(self.committed_end(video_id), stored.get("split"))
        if stored is not None:
            log.warning("%s changed since its detections were made: detecting it again", video_id)
            self.store.delete(status_record(video_id))
            self._remove_segment_records(video_id)
            for name in self.store.names(partition(video_id)):
                self.store.delete(f"{partition(video_id)}/{name}")
        self.store.put(record, json_bytes({"fingerprint": fingerprint, "path": path}))
        return ResumePoint(0, None)

    def recorded_video_ids(self) -> set[str]:
        """Every video this output_dir holds anything of: a status, a started video, or a partition."""
        ids = {name.removesuffix(".json") for name in self.store.names(STATUS_DIR)}
        ids |= {name.removesuffix(".json") for name in self.store.names(PROGRESS_DIR)}
        ids |= {name.removeprefix("video_id=") for name in self.store.entries(PREDICTIONS)
                if name.startswith("video_id=")}
        return ids

    def missing_status(self, video_id: str) -> VideoStatus:
        """The row of a video whose file is gone from video_dir: its last status, marked missing."""
        status = self.read_status(video_id)
        if status is None:  # started but never finished
            progress = self.store.get(progress_record(video_id))
            path = json.loads(progress).get("path") if progress is not None else None
            status = VideoStatus(video_id=video_id, path=path or f"(unknown: {video_id})")
            status.detections = self.count_detections(video_id)
        status.status = "missing"
        status.error = "the file is no longer in video_dir; its detections are kept (prune=true removes them)"
        return status

    def remove_video(self, video_id: str) -> None:
        """Everything of one video: its parts, partition, status and progress record (for prune=true)."""
        for name in self.store.names(partition(video_id)):
            self.store.delete(f"{partition(video_id)}/{name}")
        self.store.delete_dir(partition(video_id))
        self.store.delete(status_record(video_id))
        self.store.delete(progress_record(video_id))
        self._remove_segment_records(video_id)
        self.remove_tracks(video_id)

    def record_split(self, video_id: str, bounds: list[int]) -> None:
        """Recorded before any segment is processed, so a rerun cuts the video where its parts are."""
        record = progress_record(video_id)
        stored = self.store.get(record)
        progress = json.loads(stored) if stored is not None else {}
        self.store.put(record, json_bytes({**progress, "split": bounds}))

    def write_segment_status(self, status: VideoStatus) -> None:
        self.store.put(segment_record(status.video_id, status.segment_start), status.to_json())

    def read_segment_status(self, video_id: str, start: int) -> VideoStatus | None:
        data = self.store.get(segment_record(video_id, start))
        return VideoStatus.from_json(data) if data is not None else None

    def _remove_segment_records(self, video_id: str) -> None:
        for name in self.store.names(segments_dir(video_id)):
            self.store.delete(f"{segments_dir(video_id)}/{name}")
        self.store.delete_dir(segments_dir(video_id))

    def video_detections(self, video_id: str) -> pl.DataFrame:
        """One video's committed detections (all its parts), for tracking."""
        parts = [pl.read_parquet(self.store.get(f"{partition(video_id)}/{name}"))
                 for _, _, name in self._parts(video_id)]
        return pl.concat(parts) if parts else pl.DataFrame(schema=PREDICTION_SCHEMA)

    def has_tracks(self) -> bool:
        return bool(self.store.entries(TRACKS)) or bool(self.store.names(TRACKS_STATE_DIR))

    def tracks_state(self, video_id: str) -> dict | None:
        stored = self.store.get(tracks_record(video_id))
        return json.loads(stored) if stored is not None else None

    def write_tracks(self, video_id: str, rows: pl.DataFrame, state: dict) -> None:
        """The tracks file first, then the record of what it was made from: a kill between leaves it to redo."""
        self.store.put(tracks_file(video_id), parquet_bytes(rows, compression="zstd"))
        self.store.put(tracks_record(video_id), json_bytes(state))

    def remove_tracks(self, video_id: str) -> None:
        self.store.delete(tracks_record(video_id))
        self.store.delete(tracks_file(video_id))
        self.store.delete_dir(tracks_dir(video_id))

    def analytics_record(self) -> dict | None:
        stored = self.store.get(ANALYTICS_RECORD)
        return json.loads(stored) if stored is not None else None

    def write_analytics(self, crossings: pl.DataFrame, visits: pl.DataFrame, counts: pl.DataFrame,
                        record: dict) -> None:
        """The three tables, each whole, then the record of what they were made from: a kill before the
        record leaves them to be made again (the same rows)."""
        self.store.put(LINE_CROSSINGS, parquet_bytes(crossings))
        self.store.put(ZONE_VISITS, parquet_bytes(visits))
        self.store.put(ANALYTICS_COUNTS, parquet_bytes(counts))
        self.store.put(ANALYTICS_RECORD, json_bytes(record))

    def analytics_tables(self) -> tuple[pl.DataFrame, pl.DataFrame]:
        """(line crossings, zone visits) as last written."""
        return tuple(pl.read_parquet(self.store.get(name)) for name in (LINE_CROSSINGS, ZONE_VISITS))

    def commit_part(self, video_id: str, start: int, end: int, rows: pl.DataFrame, compression: str) -> None:
        data = parquet_bytes(rows, compression=compression, statistics=True)
        self.store.put(part(video_id, start, end), data)

    def count_detections(self, video_id: str, start: int = 0, end: int | None = None) -> int:
        """Rows in the committed parts of `video_id` within the frames [start, end), read from their footers."""
        total = 0
        for _, _, name in self._parts(video_id, start, end):
            with self.store.open_input_file(f"{partition(video_id)}/{name}") as handle:
                total += pq.ParquetFile(handle).metadata.num_rows
        return total

    def write_status(self, status: VideoStatus) -> None:
        self.store.put(status_record(status.video_id), status.to_json())

    def read_status(self, video_id: str) -> VideoStatus | None:
        data = self.store.get(status_record(video_id))
        return VideoStatus.from_json(data) if data is not None else None

    def read_statuses(self, video_ids: list[str]) -> dict[str, VideoStatus]:
        """The final statuses of these videos, where they have one: from the status index for the records
        unchanged since it was written (one listing and one GET for all of them), else from their records
        (in parallel). A rerun of a finished bucket so costs a few requests, not one per video."""
        versions = self.store.versions(STATUS_DIR)
        index = self._status_index()
        found, to_read = {}, []
        for video_id in video_ids:
            version = versions.get(f"{video_id}.json")
            if version is None:
                continue
            indexed = index.get(video_id)
            if indexed is not None and indexed[0] == version:
                found[video_id] = VideoStatus.from_json(indexed[1].encode())
            else:
                to_read.append(video_id)
        with ThreadPoolExecutor(16) as pool:
            for video_id, status in zip(to_read, pool.map(self.read_status, to_read), strict=True):
                if status is not None:
                    found[video_id] = status
        return found

    def write_status_index(self, statuses: dict[str, VideoStatus]) -> None:
        """Every status record with its version, for the next run's planning. A record this run wrote is
        taken from `statuses` (less what the driver fills in afterwards), one an earlier run wrote from the old
        index where unchanged, else read."""
        versions = self.store.versions(STATUS_DIR)
        index = self._status_index()
        rows = []
        for name, version in sorted(versions.items()):
            video_id = name.removesuffix(".json")
            if video_id in statuses:
                record = dataclasses.replace(statuses[video_id], tracks=None, line_crossings=None,
                                             zone_visits=None).to_json().decode()
            elif video_id in index and index[video_id][0] == version:
                record = index[video_id][1]
            else:
                stored = self.read_status(video_id)
                if stored is None:
                    continue
                record = stored.to_json().decode()
            rows.append((video_id, version, record))
        table = pl.DataFrame(rows, schema={"video_id": pl.String, "version": pl.String, "record": pl.String},
                             orient="row")
        self.store.put(STATUS_INDEX, parquet_bytes(table, compression="zstd"))

    def _status_index(self) -> dict[str, tuple[str, str]]:
        data = self.store.get(STATUS_INDEX)
        if data is None:
            return {}
        return {video_id: (version, record) for video_id, version, record in pl.read_parquet(data).iter_rows()}

    def finished_run(self) -> tuple[dict, pl.DataFrame]:
        """(manifest, videos table) of the run that finished here, for what reads a run's results."""
        manifest_bytes, table_bytes = self.store.get(MANIFEST), self.store.get(VIDEOS_TABLE)
        if manifest_bytes is None or table_bytes is None:
            raise ConfigError(f"output_dir={self.location} has no {MANIFEST} and {VIDEOS_TABLE}: pass the "
                              f"output_dir of a run that finished")
        return json.loads(manifest_bytes), pl.read_parquet(table_bytes)

    def write_videos_table(self, statuses: list[VideoStatus]) -> None:
        rows = [{k: getattr(s, k) for k in VIDEO_SCHEMA} for s in statuses]
        frame = pl.DataFrame(rows, schema=VIDEO_SCHEMA)
        self.store.put(VIDEOS_TABLE, parquet_bytes(frame.sort("path")))

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        self.store.put(MANIFEST, json_bytes(manifest))


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
    # class_names[i] names label i + 1 (label 0 is the background); a plug-in's stray label gets class_<id>.
    lookup = np.asarray(["__background__", *class_names,
                         *(f"class_{i}" for i in range(len(class_names) + 1, int(label.max(initial=0)) + 1))],
                        dtype=object)
    names = lookup[label]
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
