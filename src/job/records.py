"""Status records: a video's final status (its commit record), a split video's segment statuses, and the
status index a rerun plans from. Each is one object on the `Store`, written whole."""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor

import polars as pl

from job.layout import STATUS_DIR, STATUS_INDEX, segment_record, segments_dir, status_record
from job.status import VideoStatus
from job.storage import Store, parquet_bytes


class StatusRecords:
    """`_state/videos/<id>.json`, `_state/segments/<id>/<start>.json` and `_state/status_index.parquet`."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def write(self, status: VideoStatus) -> None:
        self.store.put(status_record(status.video_id), status.to_json())

    def read(self, video_id: str) -> VideoStatus | None:
        data = self.store.get(status_record(video_id))
        return VideoStatus.from_json(data) if data is not None else None

    def ids(self) -> set[str]:
        """Every video with a final status here."""
        return {name.removesuffix(".json") for name in self.store.names(STATUS_DIR)}

    def remove(self, video_id: str) -> None:
        """Its final status and its segments' (the file was replaced, or pruned)."""
        self.store.delete(status_record(video_id))
        self.remove_segments(video_id)

    def write_segment(self, status: VideoStatus) -> None:
        self.store.put(segment_record(status.video_id, status.segment_start), status.to_json())

    def read_segment(self, video_id: str, start: int) -> VideoStatus | None:
        data = self.store.get(segment_record(video_id, start))
        return VideoStatus.from_json(data) if data is not None else None

    def remove_segments(self, video_id: str) -> None:
        for name in self.store.names(segments_dir(video_id)):
            self.store.delete(f"{segments_dir(video_id)}/{name}")
        self.store.delete_dir(segments_dir(video_id))

    def read_many(self, video_ids: list[str]) -> dict[str, VideoStatus]:
        """The final statuses of these videos, where they have one: from the status index for the records
        unchanged since it was written (one listing and one GET for all of them), else from their records
        (in parallel). A rerun of a finished bucket so costs a few requests, not one per video."""
        versions = self.store.versions(STATUS_DIR)
        index = self._index()
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
            for video_id, status in zip(to_read, pool.map(self.read, to_read), strict=True):
                if status is not None:
                    found[video_id] = status
        return found

    def write_index(self, statuses: dict[str, VideoStatus]) -> None:
        """Every status record with its version, for the next run's planning. A record this run wrote is
        taken from `statuses` (less what the driver fills in afterwards), one an earlier run wrote from the old
        index where unchanged, else read."""
        versions = self.store.versions(STATUS_DIR)
        index = self._index()
        rows = []
        for name, version in sorted(versions.items()):
            video_id = name.removesuffix(".json")
            if video_id in statuses:
                record = dataclasses.replace(statuses[video_id], tracks=None, line_crossings=None,
                                             zone_visits=None).to_json().decode()
            elif video_id in index and index[video_id][0] == version:
                record = index[video_id][1]
            else:
                stored = self.read(video_id)
                if stored is None:
                    continue
                record = stored.to_json().decode()
            rows.append((video_id, version, record))
        table = pl.DataFrame(rows, schema={"video_id": pl.String, "version": pl.String, "record": pl.String},
                             orient="row")
        self.store.put(STATUS_INDEX, parquet_bytes(table, compression="zstd"))

    def _index(self) -> dict[str, tuple[str, str]]:
        data = self.store.get(STATUS_INDEX)
        if data is None:
            return {}
        return {video_id: (version, record) for video_id, version, record in pl.read_parquet(data).iter_rows()}
