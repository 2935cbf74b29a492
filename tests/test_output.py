"""write: atomic parts, the resume chain, settings check, tables."""

from __future__ import annotations

import os

import numpy as np
import polars as pl
import pytest

from job import layout, parts, status
from job.errors import OutputNotWritableError, SettingsMismatchError
from job.output import OutputDir
from job.status import VideoStatus
from job.storage import Store, atomic_write


def rows(n, start=0):
    return parts.detections_frame(
        range(start, start + n), [i * 0.04 for i in range(start, start + n)],
        [np.array([[1, 2, 3, 4]], dtype=np.float32)] * n, [np.array([0.9], dtype=np.float32)] * n,
        [np.array([1])] * n, ["person"],
    )


def test_parts_chain_and_resume_point(tmp_path):
    out = OutputDir(tmp_path)
    assert out.parts.committed_end("v-1") == 0
    out.parts.commit("v-1", 0, 10, rows(10), "zstd")
    out.parts.commit("v-1", 10, 25, rows(15, 10), "zstd")
    assert out.parts.committed_end("v-1") == 25
    directory = tmp_path / layout.partition("v-1")
    out.parts.commit("v-1", 40, 50, rows(10, 40), "zstd")  # a gap: must not be trusted
    assert out.parts.committed_end("v-1") == 25
    assert sorted(p.name for p in directory.iterdir()) == [
        "part-0000000000-0000000010.parquet", "part-0000000010-0000000025.parquet",
    ]
    table = layout.scan_predictions(tmp_path).collect()
    assert table["frame_index"].to_list() == list(range(25))
    assert set(table["video_id"]) == {"v-1"} and set(table["class_name"]) == {"person"}


def test_empty_parts_are_valid_and_typed(tmp_path):
    out = OutputDir(tmp_path)
    out.parts.commit("v-2", 0, 8, rows(0), "zstd")
    assert out.parts.committed_end("v-2") == 8
    assert layout.scan_predictions(tmp_path).collect().height == 0
    plain = pl.scan_parquet(f"{tmp_path}/predictions/**/*.parquet", hive_partitioning=True).collect()
    assert plain.height == 0


def test_atomic_write_leaves_no_temp_on_failure(tmp_path):
    def boom(handle):
        handle.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(tmp_path / "x.parquet", boom)
    assert os.listdir(tmp_path) == []


def test_settings_mismatch_refuses(tmp_path):
    out = OutputDir(tmp_path)
    out.ensure_settings({"score_threshold": 0.5, "model": "m"})
    out.parts.commit("v-1", 0, 1, rows(1), "zstd")
    out.ensure_settings({"score_threshold": 0.5, "model": "m"})
    with pytest.raises(SettingsMismatchError, match="score_threshold: stored 0.5, now 0.3"):
        out.ensure_settings({"score_threshold": 0.3, "model": "m"})


def test_settings_of_a_start_that_wrote_nothing_do_not_lock_the_output(tmp_path):
    """A first start that failed (weights it could not download) must not refuse the corrected command."""
    out = OutputDir(tmp_path)
    out.ensure_settings({"weights": "DEFAULT"})
    out.ensure_settings({"weights": "/models/mine.pth"})
    out.statuses.write(VideoStatus(video_id="a-1", path="a.mp4"))
    with pytest.raises(SettingsMismatchError, match="weights"):
        out.ensure_settings({"weights": "DEFAULT"})


def test_only_a_directory_without_job_state_and_with_other_files_is_foreign(tmp_path):
    assert OutputDir(tmp_path / "new").foreign_entries() == []
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / ".hydra_logs").mkdir()
    assert OutputDir(tmp_path / "theirs").foreign_entries() == []  # Hydra's log dir is made before the job runs
    (tmp_path / "theirs" / "videos.parquet").write_bytes(b"the user's own table")
    assert OutputDir(tmp_path / "theirs").foreign_entries() == ["videos.parquet"]
    (tmp_path / "theirs" / "_state").mkdir()
    assert OutputDir(tmp_path / "theirs").foreign_entries() == []


def test_unwritable_output_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a directory")
    with pytest.raises(OutputNotWritableError, match="not writable"):
        Store(blocker / "out").check_writable()


def test_videos_table_has_the_documented_schema(tmp_path):
    OutputDir(tmp_path).write_videos_table([VideoStatus(video_id="a-1", path="a.mp4", error="x")])
    table = pl.read_parquet(tmp_path / "videos.parquet")
    assert table.schema == pl.Schema(status.VIDEO_SCHEMA)
    assert "retryable" not in table.columns
    assert table.row(0, named=True)["frame_count"] is None
    assert table.row(0, named=True)["status"] == "failed"


def test_a_status_record_round_trips_with_what_the_table_leaves_out(tmp_path):
    out = OutputDir(tmp_path)
    status = VideoStatus(video_id="a-1", path="a.mp4", status="ok", frame_count=5, fps=25.0, retryable=True)
    out.statuses.write(status)
    assert out.statuses.read("a-1") == status
    assert out.statuses.read("b-2") is None


def test_a_failed_write_is_the_one_output_error_and_names_the_output(tmp_path):
    from job.errors import OutputWriteError

    blocker = tmp_path / "file"
    blocker.write_text("a file where a directory should be")
    with pytest.raises(OutputWriteError, match="rerun the same command to resume"):
        OutputDir(blocker).parts.commit("v-1", 0, 1, rows(1), "zstd")


def test_writes_are_staged_outside_the_partitions_so_a_video_reads_alone_mid_run(tmp_path):
    """pl.read_parquet on one partition fails if it holds anything but .parquet parts."""
    out = OutputDir(tmp_path)
    out.parts.commit("v-1", 0, 10, rows(10), "zstd")
    torn = tmp_path / "_state" / "tmp" / ".part-0000000010-0000000020.parquet.abc.tmp"
    torn.write_bytes(b"a write killed before its rename")
    assert [p.name for p in (tmp_path / layout.partition("v-1")).iterdir()] == ["part-0000000000-0000000010.parquet"]
    assert pl.read_parquet(tmp_path / layout.partition("v-1")).height == 10
    assert out.parts.committed_end("v-1") == 10


def test_planning_reads_the_status_index_and_only_the_records_written_since(tmp_path, monkeypatch):
    out = OutputDir(tmp_path)
    statuses = {f"v-{i}": VideoStatus(video_id=f"v-{i}", path=f"{i}.mp4", status="ok", frame_count=i) for i in range(3)}
    for item in statuses.values():
        out.statuses.write(item)
    out.statuses.write_index({**statuses, "v-0": VideoStatus(video_id="v-0", path="0.mp4", status="ok",
                                                           frame_count=0, tracks=7)})
    later = VideoStatus(video_id="v-1", path="1.mp4", status="partial", frame_count=99)  # after the index
    import time

    time.sleep(0.01)
    out.statuses.write(later)
    reads = []
    original = out.statuses.read
    monkeypatch.setattr(out.statuses, "read", lambda video_id: reads.append(video_id) or original(video_id))
    found = out.statuses.read_many(["v-0", "v-1", "v-2", "v-9"])
    assert reads == ["v-1"], "only the record written since the index is read"
    assert sorted(found) == ["v-0", "v-1", "v-2"]
    assert (found["v-1"].status, found["v-1"].frame_count) == ("partial", 99)
    assert found["v-0"].tracks is None  # what the driver fills in after the record is not in the index
