"""Tracks: the job's track ids against the trackers library run by hand, reruns, and tracks added later."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from fractions import Fraction

import av
import numpy as np
import polars as pl
import pytest
import supervision as sv
from media import VFR_PTS_MS
from trackers import ByteTrackTracker

from job import layout, track
from job.config import TrackerConfig
from job.errors import ConfigError
from job.run import run
from job.samples import scene, write_video

TRACKS_SCAN = "tracks/**/*.parquet"
SORT = ["video_id", "frame_index", "x1", "y1", "class_id"]
# The library's defaults except the two score thresholds, lowered to the test model's scores (0.25-0.75).
PARAMS = {"track_activation_threshold": 0.3, "high_conf_det_threshold": 0.35}
TRACKER = ["tracker=bytetrack", *(f"+tracker.params.{key}={value}" for key, value in PARAMS.items())]


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("track-videos")
    write_video(directory / "steady.mp4", 48, size=(320, 240))
    vfr_ms = [t * 3 for t in VFR_PTS_MS] + [3100 + 40 * i for i in range(28)]
    write_video(directory / "vfr.mkv", [scene(i, 320, 240) for i in range(len(vfr_ms))], size=(320, 240),
                pts_ms=vfr_ms)
    return directory


def tracks_of(out) -> pl.DataFrame:
    return pl.scan_parquet(out / TRACKS_SCAN, hive_partitioning=True).collect()


def partition_by_track(rows: pl.DataFrame, decimals: int | None = None) -> set[frozenset]:
    """The detections grouped by track id, as sets of (frame, box) keys: equal whatever the ids are called.

    `decimals` rounds the boxes, for runs whose thread counts differ (float rounding in the model).
    """
    box = [pl.col(c).round(decimals) if decimals is not None else pl.col(c) for c in ("x1", "y1", "x2", "y2")]
    keyed = rows.filter(pl.col("track_id").is_not_null()).with_columns(
        pl.concat_str("frame_index", *box, "class_id", separator="/").alias("key"))
    return {frozenset(group["key"]) for _, group in keyed.group_by("track_id")}


def presentation_times(path) -> list[float]:
    """Every frame's PTS in seconds from the first, decoded with PyAV here (independent of the job's probe)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stamps = [frame.pts for frame in container.decode(stream)]
        time_base = stream.time_base or Fraction(1, 1)
    return [float((stamp - stamps[0]) * time_base) for stamp in stamps]


def by_hand(rows: pl.DataFrame, times: list[float], stride: int, fps: float) -> pl.DataFrame:
    """The library's ByteTrack with PARAMS, fed every detected frame (empty ones too) with its time."""
    tracker = ByteTrackTracker(frame_rate=fps, **PARAMS)
    ids = {}
    for index in range(0, len(times), stride):
        frame = rows.filter(pl.col("frame_index") == index)
        keys = frame.select(pl.concat_str("frame_index", "x1", "y1", "x2", "y2", "class_id", separator="/"))
        detections = sv.Detections(
            xyxy=frame.select("x1", "y1", "x2", "y2").to_numpy().astype(np.float32).reshape(-1, 4),
            confidence=frame["score"].to_numpy(), class_id=frame["class_id"].to_numpy(),
            data={"key": np.asarray(keys.to_series().to_list(), dtype=object)},
        ) if frame.height else sv.Detections.empty()
        tracked = tracker.update(detections, timestamp=times[index])
        for key, track_id in zip(tracked.data.get("key", []), tracked.tracker_id, strict=True):
            ids[key] = None if track_id == -1 else int(track_id)
    keyed = rows.with_columns(
        pl.concat_str("frame_index", "x1", "y1", "x2", "y2", "class_id", separator="/").alias("key"))
    return keyed.with_columns(pl.col("key").replace_strict(ids, default=None, return_dtype=pl.Int64)
                              .alias("track_id")).drop("key")


@pytest.mark.slow
def test_track_ids_partition_the_detections_as_the_library_does(ray_session, video_dir, make_cfg, tmp_path):
    out = tmp_path / "out"
    run(make_cfg(video_dir, *TRACKER, "frame_stride=2"))
    tracked = tracks_of(out)
    videos = pl.read_parquet(out / "videos.parquet")
    detections = layout.scan_predictions(str(out)).collect()
    assert tracked.drop("track_id").sort(pl.all()).equals(detections.select(tracked.drop("track_id").columns)
                                                          .sort(pl.all()))
    for row in videos.iter_rows(named=True):
        mine = tracked.filter(pl.col("video_id") == row["video_id"])
        expected = by_hand(mine.drop("track_id"), presentation_times(video_dir / row["path"]), 2, row["fps"])
        assert partition_by_track(mine) == partition_by_track(expected), row["path"]
        assert len(partition_by_track(mine)) >= 2, "the test needs real tracks to compare"
        assert mine["track_id"].null_count() < mine.height
        assert row["tracks"] == mine["track_id"].n_unique() - (mine["track_id"].null_count() > 0)

    summary = pl.read_parquet(out / "track_summary.parquet")
    assert summary.height == sum(videos["tracks"])
    for track_row in summary.iter_rows(named=True):
        rows = tracked.filter((pl.col("video_id") == track_row["video_id"]) & (pl.col("track_id") ==
                                                                                track_row["track_id"]))
        assert track_row["frames"] == rows.height
        assert (track_row["first_frame_index"], track_row["last_frame_index"]) == (
            rows["frame_index"].min(), rows["frame_index"].max())
        assert track_row["class_name"] == rows["class_name"].mode().sort()[0]


def test_two_boxes_crossing_paths_keep_their_ids():
    """Synthetic detections: one box moving right, one moving left, overlapping halfway."""
    rows = []
    for frame in range(40):
        for name, x in (("car", 10 + 8 * frame), ("bus", 330 - 8 * frame)):
            rows.append({"frame_index": frame, "timestamp_s": frame / 25, "class_id": 3 if name == "car" else 6,
                         "class_name": name, "score": 0.9, "x1": x, "y1": 100.0, "x2": x + 40.0, "y2": 140.0})
    detections = pl.DataFrame(rows, schema=layout.PREDICTION_SCHEMA)
    frames = np.arange(40)
    tracked = track.track_ids(detections, frames, frames / 25,
                              track.new_tracker(TrackerConfig(name="bytetrack"), 25.0))
    confirmed = tracked.filter(pl.col("track_id").is_not_null())
    per_class = confirmed.group_by("class_name").agg(pl.col("track_id").n_unique().alias("ids"),
                                                     pl.len().alias("rows"))
    assert dict(per_class.select("class_name", "ids").iter_rows()) == {"car": 1, "bus": 1}
    assert confirmed["track_id"].n_unique() == 2 and confirmed.height >= 2 * 38


@pytest.mark.slow
def test_tracks_are_added_to_an_existing_output_without_detecting_again(ray_session, video_dir, make_cfg,
                                                                        tmp_path):
    out, reference = tmp_path / "out", tmp_path / "reference"
    run(make_cfg(video_dir, *TRACKER, output_dir=reference))
    run(make_cfg(video_dir))
    parts_before = {p: p.stat().st_mtime_ns for p in out.glob("predictions/*/*.parquet")}
    assert not (out / "tracks").exists() and pl.read_parquet(out / "videos.parquet")["tracks"].null_count() == 2

    summary = run(make_cfg(video_dir, *TRACKER))
    assert summary.frames == 0  # nothing detected again
    assert {p: p.stat().st_mtime_ns for p in out.glob("predictions/*/*.parquet")} == parts_before
    assert tracks_of(out).sort(SORT).equals(tracks_of(reference).sort(SORT))
    assert pl.read_parquet(out / "videos.parquet")["tracks"].to_list() == \
        pl.read_parquet(reference / "videos.parquet")["tracks"].to_list()

    run(make_cfg(video_dir))  # the tracker off again: tracks made from unchanged detections stay
    assert tracks_of(out).sort(SORT).equals(tracks_of(reference).sort(SORT))
    run(make_cfg(video_dir, "tracker=sort", "+tracker.params.track_activation_threshold=0.3"))  # another tracker: tracks made again with it
    assert not tracks_of(out).sort(SORT).equals(tracks_of(reference).sort(SORT))


def test_a_tracker_parameter_it_does_not_take_stops_at_start_up():
    with pytest.raises(ConfigError, match="tracker.params.lost_buffer is not a parameter of sort"):
        track.check(TrackerConfig(name="sort", params={"lost_buffer": 3}))
    track.check(TrackerConfig(name="sort", params={"lost_track_buffer": 3}))


def test_tracker_without_the_library_stops_at_start_up_with_the_install_command(tmp_path, weights_path):
    shadow = tmp_path / "shadow" / "trackers"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named trackers')\n")
    (tmp_path / "videos").mkdir()
    write_video(tmp_path / "videos" / "a.mp4", 4)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shadow.parent), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "job", f"video_dir={tmp_path / 'videos'}",
                             f"output_dir={tmp_path / 'out'}", "tracker=bytetrack"],
                            capture_output=True, text=True, env=env, timeout=120)
    said = result.stdout + result.stderr
    assert result.returncode == 2, said
    assert 'pip install -e ".[track]"' in said and "Traceback" not in said
    assert not (tmp_path / "out" / "_state").exists()  # nothing written but the log


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_gives_the_tracks_of_a_clean_run(ray_session, video_dir, make_cfg, weights_path,
                                                                  tmp_path):
    from conftest import THRESHOLD
    from processes import kill_tree

    clean, out = tmp_path / "clean", tmp_path / "out"
    run(make_cfg(video_dir, *TRACKER, output_dir=clean))
    command = [sys.executable, "-m", "job", f"video_dir={video_dir}", f"output_dir={out}",
               f"model.weights={weights_path}", f"score_threshold={THRESHOLD}", "device=cpu", "ray.num_cpus=2",
               "ray.num_actors=1", "batch_size=4", "output.commit_every_frames=8", *TRACKER]
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not list(out.glob("predictions/*/part-*.parquet")):
            assert process.poll() is None and time.monotonic() < deadline, "the run ended before the kill"
            time.sleep(0.01)
    finally:
        kill_tree(process)
    assert not (out / "tracks").exists()
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert partition_by_track(tracks_of(out), decimals=1) == partition_by_track(tracks_of(clean), decimals=1)
    counts = ["video_id", "tracks"]
    assert pl.read_parquet(out / "videos.parquet").select(counts).equals(
        pl.read_parquet(clean / "videos.parquet").select(counts))


@pytest.mark.slow
def test_tracks_without_their_record_are_made_again(ray_session, video_dir, make_cfg, tmp_path):
    """What a kill between a video's tracks file and its record leaves: the rerun makes that video's tracks again."""
    out = tmp_path / "out"
    run(make_cfg(video_dir, *TRACKER))
    expected = tracks_of(out)
    (record,) = list((out / "_state" / "tracks").glob("*.json"))[:1]
    video_id = record.stem
    record.unlink()
    stale = out / "tracks" / f"video_id={video_id}" / "tracks.parquet"
    pl.read_parquet(stale).with_columns(pl.lit(None, pl.Int64).alias("track_id")).write_parquet(stale)
    summary = run(make_cfg(video_dir, *TRACKER))
    assert summary.frames == 0
    assert tracks_of(out).sort(SORT).equals(expected.sort(SORT))
    assert record.exists()
