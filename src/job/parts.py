"""The commit protocol of a video's detections: parts, the progress record they come from, resume.

A part's name is its commit record (`part-<start>-<end>.parquet`, frames [start, end)): on rerun a video
resumes at the end of its unbroken chain of parts from its first frame. Parts are only ever of the content
whose fingerprint the progress record holds, written before the first part: a replaced file's parts are
deleted, with its status, before anything new is committed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from job.layout import PART, PREDICTION_SCHEMA, part, partition, progress_record
from job.records import StatusRecords
from job.storage import Store, json_bytes, parquet_bytes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResumePoint:
    """Where a video's detection resumes, and the segment bounds recorded for it (a split video)."""

    frame: int
    split: list[int] | None = None


class Parts:
    """`predictions/video_id=<id>/part-*.parquet` and `_state/progress/<id>.json`."""

    def __init__(self, store: Store, statuses: StatusRecords) -> None:
        self.store, self.statuses = store, statuses

    def commit(self, video_id: str, start: int, end: int, rows: pl.DataFrame, compression: str) -> None:
        self.store.put(part(video_id, start, end), parquet_bytes(rows, compression=compression, statistics=True))

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
            self.statuses.remove(video_id)
            self.remove(video_id)
        self.store.put(record, json_bytes({"fingerprint": fingerprint, "path": path}))
        return ResumePoint(0, None)

    def record_split(self, video_id: str, bounds: list[int]) -> None:
        """Recorded before any segment is processed, so a rerun cuts the video where its parts are."""
        record = progress_record(video_id)
        stored = self.store.get(record)
        progress = json.loads(stored) if stored is not None else {}
        self.store.put(record, json_bytes({**progress, "split": bounds}))

    def recorded_path(self, video_id: str) -> str | None:
        """The path a started video's progress record names (for the row of one whose file is gone)."""
        stored = self.store.get(progress_record(video_id))
        return json.loads(stored).get("path") if stored is not None else None

    def committed_end(self, video_id: str, start: int = 0, end: int | None = None) -> int:
        """Frame index a rerun resumes the frames [start, end) of `video_id` at: the end of the unbroken
        chain of its parts from `start`. Parts in the range outside that chain are removed."""
        reached = start
        for first, stop, name in self.listed(video_id, start, end):
            if first == reached:
                reached = stop
            else:  # cannot happen with sequential commits; never keep a gap
                self.store.delete(f"{partition(video_id)}/{name}")
        return reached

    def listed(self, video_id: str, start: int = 0, end: int | None = None) -> list[tuple[int, int, str]]:
        """(first frame, end frame, name) of the video's parts within the frames [start, end), in frame order."""
        parts = []
        for name in self.store.names(partition(video_id)):
            match = PART.match(name)
            if match and int(match.group(1)) >= start and (end is None or int(match.group(2)) <= end):
                parts.append((int(match.group(1)), int(match.group(2)), name))
        return sorted(parts)

    def count(self, video_id: str, start: int = 0, end: int | None = None) -> int:
        """Rows in the committed parts of `video_id` within the frames [start, end), read from their footers."""
        total = 0
        for _, _, name in self.listed(video_id, start, end):
            with self.store.open_input_file(f"{partition(video_id)}/{name}") as handle:
                total += pq.ParquetFile(handle).metadata.num_rows
        return total

    def read(self, video_id: str) -> pl.DataFrame:
        """One video's committed detections (all its parts), for tracking."""
        parts = [pl.read_parquet(self.store.get(f"{partition(video_id)}/{name}"))
                 for _, _, name in self.listed(video_id)]
        return pl.concat(parts) if parts else pl.DataFrame(schema=PREDICTION_SCHEMA)

    def remove(self, video_id: str) -> None:
        """Every part of the video, and its partition directory (the progress record stays)."""
        for name in self.store.names(partition(video_id)):
            self.store.delete(f"{partition(video_id)}/{name}")
        self.store.delete_dir(partition(video_id))


def detections_frame(
    frame_indices: Iterable[int],
    timestamps_s: Iterable[float],
    boxes: list[np.ndarray],
    scores: list[np.ndarray],
    labels: list[np.ndarray],
    class_names: list[str],
) -> pl.DataFrame:
    """Flatten per-frame detections into prediction rows."""
    if not scores:
        return pl.DataFrame(schema=PREDICTION_SCHEMA)
    return detection_rows(frame_indices, timestamps_s, [len(s) for s in scores], np.concatenate(boxes),
                          np.concatenate(scores), np.concatenate(labels), class_names)


def detection_rows(frame_indices: Iterable[int], timestamps_s: Iterable[float], counts: Sequence[int],
                   boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, class_names: list[str]) -> pl.DataFrame:
    """Prediction rows from frames' detections laid end to end (`counts[i]` of them frame i's)."""
    if sum(counts) == 0:
        return pl.DataFrame(schema=PREDICTION_SCHEMA)
    box = boxes.reshape(-1, 4)
    label = labels.astype(np.int64)
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
            "score": scores.astype(np.float32),
            "x1": box[:, 0], "y1": box[:, 1], "x2": box[:, 2], "y2": box[:, 3],
        },
        schema=PREDICTION_SCHEMA,
    )
