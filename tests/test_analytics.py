"""Counting lines and zones from tracks: exact counts on tracks whose motion is known."""

from __future__ import annotations

import polars as pl
import pytest

from job.analytics import counts, video_analytics
from job.config import AnalyticsConfig, LineConfig, ZoneConfig
from job.layout import PREDICTION_SCHEMA

W, H = 200, 100
# Walking up the frame's middle, from the bottom to the top: its left is the frame's left, so `in` is rightward.
UP_THE_MIDDLE = {"start": [0.5, 1.0], "end": [0.5, 0.0]}


def track(track_id, xs, ys=None, class_name="person", times=None, size=0.1):
    """A track whose box's bottom-centre goes through (xs, ys) in fractions of the frame, one frame each."""
    ys = ys if ys is not None else [0.5] * len(xs)
    times = times if times is not None else [i / 25 for i in range(len(xs))]
    rows = []
    for i, (x, y) in enumerate(zip(xs, ys)):
        rows.append({"frame_index": i, "timestamp_s": times[i], "class_id": 1, "class_name": class_name,
                     "score": 0.9, "x1": (x - size / 2) * W, "y1": (y - size) * H, "x2": (x + size / 2) * W,
                     "y2": y * H, "track_id": track_id})
    return rows


def tracks(*rows_of_tracks) -> pl.DataFrame:
    return pl.DataFrame([r for rows in rows_of_tracks for r in rows],
                        schema={**PREDICTION_SCHEMA, "track_id": pl.Int64})


def analyse(frame, lines=(), zones=(), path="cam/a.mp4"):
    return video_analytics("v", path, frame, W, H, AnalyticsConfig(lines=list(lines), zones=list(zones)))


def test_crossings_are_counted_each_way_exactly():
    there_and_back = track(1, [0.2, 0.3, 0.6, 0.8, 0.6, 0.4, 0.2, 0.4, 0.7])  # right, left, right
    crossings, _ = analyse(tracks(there_and_back), [LineConfig(name="door", **UP_THE_MIDDLE)])
    assert crossings["direction"].to_list() == ["in", "out", "in"]
    assert crossings["frame_index"].to_list() == [2, 5, 8]  # the first frame on the new side
    assert crossings["timestamp_s"].to_list() == [2 / 25, 5 / 25, 8 / 25]
    # The same line walked the other way round swaps in and out.
    reversed_line = LineConfig(name="door", start=[0.5, 0.0], end=[0.5, 1.0])
    assert analyse(tracks(there_and_back), [reversed_line])[0]["direction"].to_list() == ["out", "in", "out"]


def test_a_track_jittering_on_the_line_counts_once_per_real_crossing():
    jitter = track(1, [0.2, 0.3, 0.49, 0.51, 0.49, 0.51, 0.52, 0.49, 0.6, 0.7, 0.8, 0.8])
    line = dict(name="door", **UP_THE_MIDDLE)
    assert analyse(tracks(jitter), [LineConfig(**line, min_frames=3)])[0]["direction"].to_list() == ["in"]
    assert len(analyse(tracks(jitter), [LineConfig(**line, min_frames=1)])[0]) == 5  # every flicker


def test_a_line_counts_only_what_crosses_between_its_ends():
    upper_half = LineConfig(name="gate", start=[0.5, 0.5], end=[0.5, 0.0])
    below = track(1, [0.2, 0.4, 0.6, 0.8], ys=[0.9] * 4)  # passes x = 0.5 under the gate's lower end
    through = track(2, [0.2, 0.4, 0.6, 0.8], ys=[0.3] * 4)
    crossings, _ = analyse(tracks(below, through), [upper_half])
    assert crossings["track_id"].to_list() == [2]


def test_unconfirmed_detections_are_never_counted():
    unconfirmed = [{**row, "track_id": None} for row in track(0, [0.2, 0.8, 0.2, 0.8])]
    negative = track(-1, [0.2, 0.8, 0.2, 0.8])
    crossings, visits = analyse(tracks(unconfirmed, negative), [LineConfig(name="door", **UP_THE_MIDDLE)],
                                [ZoneConfig(name="all", polygon=[[0, 0], [1, 0], [1, 1], [0, 1]])])
    assert crossings.height == 0 and visits.height == 0


def test_a_class_filter_and_a_video_glob_choose_what_a_line_counts():
    person, car = track(1, [0.2, 0.8], class_name="person"), track(2, [0.2, 0.8], class_name="car")
    people_only = LineConfig(name="door", classes=["person"], **UP_THE_MIDDLE)
    crossings, _ = analyse(tracks(person, car), [people_only])
    assert crossings["class_name"].to_list() == ["person"]
    both = LineConfig(name="door", **UP_THE_MIDDLE)
    table = counts(*analyse(tracks(person, car), [both]))
    assert table.select("class_name", "in", "out").rows() == [("car", 1, 0), ("person", 1, 0)]
    other_camera = LineConfig(name="door", videos="cam2/*", **UP_THE_MIDDLE)
    assert analyse(tracks(person), [other_camera], path="cam/a.mp4")[0].height == 0
    assert analyse(tracks(person), [other_camera], path="cam2/a.mp4")[0].height == 1


def test_a_zone_entered_and_left_twice_gives_two_visits_with_their_dwell_in_seconds():
    # Variable frame rate: the dwell comes from the timestamps, not from frame counts.
    times = [0.0, 0.1, 0.5, 0.6, 1.5, 1.6, 1.7, 3.0, 3.2]
    xs = [0.1, 0.1, 0.7, 0.8, 0.1, 0.1, 0.8, 0.8, 0.8]  # in at 0.5 s, out at 1.5 s, in at 1.7 s to the end
    dock = ZoneConfig(name="dock", polygon=[[0.6, 0.0], [1.0, 0.0], [1.0, 1.0], [0.6, 1.0]])
    crossings, visits = analyse(tracks(track(7, xs, times=times)), zones=[dock])
    assert visits.select("enter_frame_index", "exit_frame_index", "open").rows() == [(2, 4, False), (6, None, True)]
    assert visits["dwell_s"].to_list() == pytest.approx([1.0, 1.5])  # 0.5 -> 1.5 s; 1.7 -> last seen 3.2 s
    table = counts(crossings, visits)
    assert table.select("name", "kind", "visits", "mean_dwell_s", "max_dwell_s").rows() == [
        ("dock", "zone", 2, pytest.approx(1.25), pytest.approx(1.5))]


def test_zone_flicker_shorter_than_min_frames_is_no_visit():
    xs = [0.1, 0.7, 0.1, 0.1, 0.7, 0.7, 0.7, 0.1]
    dock = ZoneConfig(name="dock", polygon=[[0.6, 0.0], [1.0, 0.0], [1.0, 1.0], [0.6, 1.0]], min_frames=2)
    _, visits = analyse(tracks(track(1, xs)), zones=[dock])
    assert visits.select("enter_frame_index", "exit_frame_index", "open").rows() == [(4, None, True)]


SITE = """
defaults:
  - base_analytics
lines:
  - name: door
    start: [0.51, 1.0]
    end: [0.51, 0.0]
zones:
  - name: right
    polygon: [[0.76, 0.0], [1.0, 0.0], [1.0, 1.0], [0.76, 1.0]]
"""


def moving_square(width=320, height=240, frames=27):
    """A white square on black whose box moves right by 10 px a frame (display coordinates)."""
    import numpy as np

    images = []
    for i in range(frames):
        image = np.zeros((height, width, 3), dtype=np.uint8)
        image[100:140, 10 + 10 * i:50 + 10 * i] = 255
        images.append(image)
    return images


@pytest.mark.slow
def test_lines_and_zones_from_a_users_yaml_counted_over_a_directory_rotated_video_too(tmp_path):
    import os
    from pathlib import Path

    import numpy as np
    from cli import run_cli

    from job.samples import write_video

    shown = moving_square()
    write_video(tmp_path / "videos" / "plain.mp4", shown, size=(320, 240))
    # Stored turned, shown upright: its displayed frames (and boxes) are the plain video's.
    write_video(tmp_path / "videos" / "phone.mp4", [np.ascontiguousarray(np.rot90(f, -1)) for f in shown],
                size=(240, 320), rotation=90)
    (tmp_path / "configs" / "analytics").mkdir(parents=True)
    (tmp_path / "configs" / "analytics" / "site.yaml").write_text(SITE)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    command = [f"--config-dir={tmp_path / 'configs'}", "analytics=site", f"video_dir={tmp_path / 'videos'}",
               f"output_dir={out}", "model._target_=plugins.build", "tracker=bytetrack", "device=cpu",
               "ray.num_cpus=2", "ray.num_actors=1", f"hydra.run.dir={tmp_path / 'hydra'}"]
    result = run_cli(*command, "report=true", env=env, timeout=600)
    assert result.returncode == 0, result.output[-3000:]
    videos = pl.read_parquet(out / "videos.parquet").sort("path")
    # The report draws the line (yellow) on the preview and the sheet, where the square never goes.
    from PIL import Image

    from job.decode import iter_batches, probe

    for video_id in videos["video_id"]:
        preview = out / "report" / video_id / "preview.mp4"
        first = next(iter_batches(str(preview), probe(str(preview)), batch_size=1)).frames[0].int()
        column = first[30:90, 162:165].float().mean(dim=1)  # x = 163.2 px, above the square (rows 100-140)
        assert (column[:, 0] > 180).all() and (column[:, 1] > 180).all() and (column[:, 2] < 90).all(), column
        sheet = np.asarray(Image.open(out / "report" / video_id / "sheet.jpg").convert("RGB")).astype(int)
        assert ((sheet[..., 0] > 180) & (sheet[..., 1] > 180) & (sheet[..., 2] < 90)).sum() > 100
    assert videos.select("path", "rotation", "line_crossings", "zone_visits").rows() == [
        ("phone.mp4", 90, 1, 1), ("plain.mp4", 0, 1, 1)]
    crossings = pl.read_parquet(out / "analytics" / "line_crossings.parquet")
    by_video = dict(zip(videos["video_id"], videos["path"]))
    # Bottom-centre at x = 30 + 10 i px crosses x = 0.51 x 320 = 163.2 between frames 13 and 14: rightward, `in`.
    assert sorted((by_video[v], d, f) for v, d, f in crossings.select("video_id", "direction", "frame_index").rows()) \
        == [("phone.mp4", "in", 14), ("plain.mp4", "in", 14)]
    visits = pl.read_parquet(out / "analytics" / "zone_visits.parquet")
    # Enters x >= 0.76 x 320 = 243.2 px at frame 22 and is still inside when the video ends.
    assert visits.select("enter_frame_index", "exit_frame_index", "open").rows() == [(22, None, True)] * 2
    table = pl.read_parquet(out / "analytics" / "counts.parquet")
    assert table.select("name", "kind", "class_name", "in", "out", "visits").sort("name").rows() == [
        ("door", "line", "bright square", 1, 0, None), ("door", "line", "bright square", 1, 0, None),
        ("right", "zone", "bright square", None, None, 1), ("right", "zone", "bright square", None, None, 1)]
    compare = run_cli(str(out), module="job.compare")
    assert "line_crossings" in compare.output and "zone_visits" in compare.output, compare.output

    # A kill after the tables but before their record: the rerun makes the same rows, detecting nothing.
    before = {name: pl.read_parquet(out / "analytics" / name)
              for name in ("line_crossings.parquet", "zone_visits.parquet", "counts.parquet")}
    (out / "_state" / "analytics.json").unlink()
    rerun = run_cli(*command, env=env, timeout=600)
    assert rerun.returncode == 0 and "0 to process" not in rerun.output
    assert "to process" not in rerun.output  # nothing detected again
    for name, table in before.items():
        assert pl.read_parquet(out / "analytics" / name).equals(table), name

    without_tracker = run_cli(*[c for c in command if c != "tracker=bytetrack"], env=env)
    assert without_tracker.returncode == 2
    assert "analytics counts tracks: add tracker=bytetrack" in without_tracker.output
