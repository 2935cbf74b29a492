"""output_dir as a whole (`layout.py`): the detections' commit protocol (`parts.py`) and the status
records (`records.py`) it holds, and what is one per run: the settings record, tracks, analytics, the
videos table and the manifest.

Every object appears atomically (`storage.Store.put`), so a reader never sees a torn file and a kill
at any moment leaves only whole objects.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import polars as pl

from job.errors import ConfigError, SettingsMismatchError
from job.layout import (
    ANALYTICS_COUNTS,
    ANALYTICS_RECORD,
    LINE_CROSSINGS,
    MANIFEST,
    PREDICTIONS,
    PROGRESS_DIR,
    SETTINGS_RECORD,
    STATE,
    STATUS_DIR,
    TRACKS,
    TRACKS_STATE_DIR,
    VIDEOS_TABLE,
    ZONE_VISITS,
    progress_record,
    tracks_dir,
    tracks_file,
    tracks_record,
)
from job.parts import Parts
from job.records import StatusRecords
from job.status import VIDEO_SCHEMA, VideoStatus
from job.storage import TMP_DIR, Store, json_bytes, parquet_bytes

log = logging.getLogger(__name__)


class OutputDir:
    """The job's output layout on a `Store`: parts, status records, settings, tables, manifest."""

    def __init__(self, store: Store | str) -> None:
        self.store = store if isinstance(store, Store) else Store(store)
        self.statuses = StatusRecords(self.store)
        self.parts = Parts(self.store, self.statuses)

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

    def recorded_video_ids(self) -> set[str]:
        """Every video this output_dir holds anything of: a status, a started video, or a partition."""
        ids = self.statuses.ids()
        ids |= {name.removesuffix(".json") for name in self.store.names(PROGRESS_DIR)}
        ids |= {name.removeprefix("video_id=") for name in self.store.entries(PREDICTIONS)
                if name.startswith("video_id=")}
        return ids

    def missing_status(self, video_id: str) -> VideoStatus:
        """The row of a video whose file is gone from video_dir: its last status, marked missing."""
        status = self.statuses.read(video_id)
        if status is None:  # started but never finished
            path = self.parts.recorded_path(video_id)
            status = VideoStatus(video_id=video_id, path=path or f"(unknown: {video_id})")
            status.detections = self.parts.count(video_id)
        status.status = "missing"
        status.error = "the file is no longer in video_dir; its detections are kept (prune=true removes them)"
        return status

    def remove_video(self, video_id: str) -> None:
        """Everything of one video: its parts, partition, status and progress record (for prune=true);
        the progress record last, as a rerun finds parts by it."""
        self.parts.remove(video_id)
        self.statuses.remove(video_id)
        self.store.delete(progress_record(video_id))
        self.remove_tracks(video_id)

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

