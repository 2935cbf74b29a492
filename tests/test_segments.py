"""Segments: a long video cut at keyframes decodes, detects and resumes exactly as when it is run whole."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import polars as pl
import pytest
import torch
from conftest import THRESHOLD
from media import VFR_PTS_MS
from processes import kill_tree

from job import layout
from job.decode import DecodeProgress, iter_batches, keyframe_indices, probe
from job.run import run
from job.samples import scene, write_video
from job.segments import cut_points, snap_cuts

KEYS = ["frame_index", "class_id", "x1", "y1"]
ROW = ["path", "status", "error", "frame_count", "frames_processed", "detections"]


def decode_range(path, info, start=0, end=None, stride=1):
    progress = DecodeProgress()
    batches = list(iter_batches(str(path), info, batch_size=4, frame_stride=stride, start_frame=start,
                                 progress=progress, end_frame=end))
    if not batches:
        return np.zeros(0, np.int64), np.zeros(0), torch.zeros(0), progress
    return (np.concatenate([b.frame_indices for b in batches]), np.concatenate([b.timestamps_s for b in batches]),
            torch.cat([b.frames for b in batches]), progress)


@pytest.mark.parametrize("kind", ["b_frames_open_gop", "vfr", "rotated", "cut_between_keyframes"])
def test_segments_decoded_one_by_one_are_the_whole_video(tmp_path, kind):
    """Open GOPs and B-frames: frames shown before a cut's keyframe but decoded after it belong to the
    segment before; a cut with no keyframe near it decodes from the keyframe before and keeps its own
    frames; indices and timestamps stay the video's."""
    if kind == "cut_between_keyframes":  # one keyframe every 40 frames, B-frames: every cut falls inside a GOP
        path = write_video(tmp_path / "long_gop.mp4", 75, size=(160, 120), options={"g": "40", "bf": "2"})
    elif kind == "b_frames_open_gop":
        path = write_video(tmp_path / "open.mp4", 90, size=(160, 120),
                           options={"g": "12", "bf": "3", "x264-params": "open-gop=1:log-level=none"})
    elif kind == "vfr":
        pts = [t * 3 + 3100 * (i // len(VFR_PTS_MS)) for i, t in enumerate(VFR_PTS_MS * 4)]
        path = write_video(tmp_path / "vfr.mkv", [scene(i, 160, 120) for i in range(len(pts))], size=(160, 120),
                           pts_ms=pts, options={"g": "7"})
    else:
        path = write_video(tmp_path / "rotated.mp4", 60, size=(160, 96), rotation=90, options={"g": "9"})
    info = probe(str(path))
    whole_indices, whole_times, whole_frames, _ = decode_range(path, info)
    bounds = cut_points(keyframe_indices(info), len(info.frame_pts), 15)
    assert len(bounds) >= 4, bounds
    if kind == "cut_between_keyframes":
        assert set(bounds[1:-1]).isdisjoint(keyframe_indices(info).tolist()), (bounds, keyframe_indices(info))
    pieces = [decode_range(path, info, start, end) for start, end in zip(bounds, bounds[1:], strict=False)]
    assert all(progress.damage is None and progress.frames_decoded == end
               for (_, _, _, progress), end in zip(pieces, bounds[1:], strict=True))
    assert np.concatenate([p[0] for p in pieces]).tolist() == whole_indices.tolist() == list(range(bounds[-1]))
    assert np.array_equal(np.concatenate([p[1] for p in pieces]), whole_times)
    assert torch.equal(torch.cat([p[2] for p in pieces]), whole_frames)


def test_a_video_is_cut_into_even_segments_at_keyframes_near_the_ideal_cuts():
    no_keys = np.array([0])
    assert cut_points(no_keys, 179, 120) == [0, 179]  # under 1.5 segments: whole
    assert cut_points(no_keys, 200, 120) == [0, 100, 200]  # two even halves, no 120 + 80
    assert cut_points(no_keys, 10_000, 1800) == [0, 1667, 3333, 5000, 6667, 8333, 10_000]
    assert cut_points(np.array([0, 90, 110, 130]), 200, 120) == [0, 90, 200]  # 90 and 110 equally near: the first
    assert cut_points(np.array([0, 60, 126, 140]), 200, 120) == [0, 100, 200]  # none within a quarter segment
    # Uneven cuts (the last video's): the window is a quarter of the shorter segment beside the cut.
    assert snap_cuts(np.array([0, 120, 140]), 200, [128]) == [0, 120, 200]
    assert snap_cuts(np.array([0, 120, 140]), 200, [180]) == [0, 180, 200]  # 140 is 40 away, window 5
    assert snap_cuts(np.array([0]), 200, [0, 200, 250]) == [0, 200]  # cuts outside the video: none


@pytest.fixture(scope="module")
def long_video(tmp_path_factory):
    directory = tmp_path_factory.mktemp("long")
    write_video(directory / "long.mp4", 150, size=(320, 240), options={"g": "15", "bf": "2"})
    write_video(directory / "short.mp4", 12, size=(320, 240))
    return directory


def results(out):
    detections = layout.scan_predictions(str(out)).collect().sort("video_id", *KEYS)
    return detections, pl.read_parquet(out / "videos.parquet").select(ROW).sort("path")


@pytest.mark.slow
@pytest.mark.parametrize("stride", [1, 4])
def test_a_split_video_on_two_actors_gives_the_unsplit_results(ray_session, long_video, make_cfg, tmp_path, stride):
    whole = run(make_cfg(long_video, "ray.segment_frames=null", f"frame_stride={stride}",
                         output_dir=tmp_path / "whole"))
    split = run(make_cfg(long_video, "ray.segment_frames=40", f"frame_stride={stride}",
                         output_dir=tmp_path / "split"))
    assert split.frames == whole.frames and split.detections == whole.detections
    split_rows, split_videos = results(tmp_path / "split")
    whole_rows, whole_videos = results(tmp_path / "whole")
    assert split_videos.equals(whole_videos)
    assert split_rows.select("video_id", "frame_index", "class_id").equals(
        whole_rows.select("video_id", "frame_index", "class_id"))
    for column in ("timestamp_s", "score", "x1", "y1", "x2", "y2"):
        assert (split_rows[column] - whole_rows[column]).abs().max() < 1e-3, column
    parts = sorted(p.name for p in (tmp_path / "split" / "predictions").glob("video_id=long-*/part-*.parquet"))
    starts = {int(name.split("-")[1]) for name in parts}
    # 150 frames in 4 even segments (ideal cuts 38, 75, 112), each cut at the nearest keyframe (GOP 15).
    assert {0, 45, 75, 105} <= starts, parts
    # Each segment a task of its own, done by whichever actor was free (actors start work as each is ready, so
    # how many took one depends on when the second loaded; tests/test_pool.py checks that free ones do).
    records = list((tmp_path / "split" / "_state" / "segments").glob("long-*/*.json"))
    assert len(records) == 4 and all(json_worker(path) for path in records)


def json_worker(path):
    import json

    return json.loads(path.read_text())["worker"]


@pytest.mark.slow
def test_sigkill_while_a_split_video_runs_then_rerun_gives_the_clean_results(long_video, weights_path, tmp_path,
                                                                            ray_session, make_cfg):
    run(make_cfg(long_video, "ray.segment_frames=null", output_dir=tmp_path / "clean"))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "job", f"video_dir={long_video}", f"output_dir={out}",
               f"model.weights={weights_path}", f"score_threshold={THRESHOLD}", "device=cpu", "ray.num_cpus=2",
               "ray.num_actors=2", "ray.cpus_per_actor=1", "batch_size=4", "output.commit_every_frames=8",
               "ray.segment_frames=40", f"hydra.run.dir={tmp_path / 'hydra'}"]
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        segment_parts = lambda: [p for p in out.glob("predictions/video_id=long-*/part-*.parquet")  # noqa: E731
                                 if not p.name.startswith("part-0000000000")]
        while len(segment_parts()) < 2:
            assert process.poll() is None and time.monotonic() < deadline, "the run ended before the kill"
            time.sleep(0.01)
    finally:
        kill_tree(process)
    assert not list((out / "_state" / "videos").glob("long-*.json")), "the kill came after the video was done"
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    rows, videos = results(out)
    clean_rows, clean_videos = results(tmp_path / "clean")
    assert videos.equals(clean_videos)
    assert rows.select("video_id", "frame_index", "class_id").equals(
        clean_rows.select("video_id", "frame_index", "class_id"))
    for column in ("score", "x1", "y1", "x2", "y2"):
        assert (rows[column] - clean_rows[column]).abs().max() < 1e-3, column
