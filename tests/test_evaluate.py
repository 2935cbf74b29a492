"""Evaluation against ground truth: numbers worked out by hand and equal to pycocotools' on the same data,
readers fed files written as the tools that make them write them, and a sweep ranked end to end."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from job.evaluate import coco_ap, detection_metrics, tracking_metrics
from job.ground_truth import match_videos, read

TESTS = Path(__file__).resolve().parent
TRUTH = [  # video_id, frame, track, class, x1, y1, x2, y2, ignore
    ("v", 0, 1, "person", 10.0, 10.0, 50.0, 90.0, False),
    ("v", 0, 2, "person", 100.0, 10.0, 140.0, 90.0, False),
    ("v", 1, 1, "person", 12.0, 10.0, 52.0, 90.0, False),
]
DETECTIONS = [  # video_id, frame, class, score, x1, y1, x2, y2
    ("v", 0, "person", 0.9, 10.0, 10.0, 50.0, 90.0),     # exact: a true positive
    ("v", 0, "person", 0.8, 200.0, 10.0, 240.0, 90.0),   # on nothing: a false positive
    ("v", 1, "person", 0.7, 18.0, 10.0, 58.0, 90.0),     # shifted 6 px: IoU 34/46 = 0.74, a true positive
    ("v", 2, "person", 0.95, 0.0, 0.0, 10.0, 10.0),      # a frame nobody annotated: not counted
]                                                         # and box 2 of frame 0 is missed


def truth_frame(rows=TRUTH) -> pl.DataFrame:
    return pl.DataFrame(rows, orient="row", schema={"video_id": pl.String, "frame_index": pl.Int64, "track_id": pl.Int64,
                                                    "class_name": pl.String, "x1": pl.Float64, "y1": pl.Float64,
                                                    "x2": pl.Float64, "y2": pl.Float64, "ignore": pl.Boolean})


def detections_frame(rows=DETECTIONS) -> pl.DataFrame:
    return pl.DataFrame(rows, orient="row", schema={"video_id": pl.String, "frame_index": pl.Int64,
                                                    "class_name": pl.String, "score": pl.Float32, "x1": pl.Float32,
                                                    "y1": pl.Float32, "x2": pl.Float32, "y2": pl.Float32})


ANNOTATED = pl.DataFrame({"video_id": ["v", "v"], "frame_index": [0, 1]})


def test_precision_recall_and_f1_per_threshold_as_worked_out_by_hand():
    dets = detections_frame().join(ANNOTATED, on=["video_id", "frame_index"], how="semi")
    table = detection_metrics(truth_frame(), dets, ANNOTATED, ["person"], 0.5, 0.5)
    overall = table.filter(pl.col("video_id").is_null() & pl.col("class_name").is_null()).sort("score_threshold")
    assert overall["score_threshold"].to_list()[:4] == [0.5, 0.55, 0.6, 0.65]
    at = {row["score_threshold"]: row for row in overall.iter_rows(named=True)}
    # At 0.5: 2 true positives, 1 false positive, 1 miss.
    assert (at[0.5]["true_positives"], at[0.5]["false_positives"], at[0.5]["false_negatives"]) == (2, 1, 1)
    assert at[0.5]["precision"] == pytest.approx(2 / 3) and at[0.5]["recall"] == pytest.approx(2 / 3)
    assert at[0.5]["f1"] == pytest.approx(2 / 3)
    # At 0.75 the shifted one (0.7) is gone; at 0.85 the false positive (0.8) too.
    assert (at[0.75]["true_positives"], at[0.75]["false_positives"]) == (1, 1)
    assert (at[0.85]["true_positives"], at[0.85]["false_positives"], at[0.85]["precision"]) == (1, 0, 1.0)
    # Detections on frames nobody annotated were never passed in: a frame 2 box would be a false positive.


def test_ap_equals_pycocotools_on_the_same_coco_json():
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    dets = detections_frame().join(ANNOTATED, on=["video_id", "frame_index"], how="semi")
    ours = coco_ap(truth_frame(), dets, ANNOTATED, ["person"])
    gt = COCO()
    gt.dataset = {"images": [{"id": 1}, {"id": 2}], "categories": [{"id": 1, "name": "person"}],
                  "annotations": [{"id": i + 1, "image_id": f + 1, "category_id": 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                                   "area": (x2 - x1) * (y2 - y1), "iscrowd": 0}
                                  for i, (_, f, _, _, x1, y1, x2, y2, _) in enumerate(TRUTH)]}
    gt.createIndex()
    dt = gt.loadRes([{"image_id": f + 1, "category_id": 1, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": s}
                     for _, f, _, s, x1, y1, x2, y2 in DETECTIONS if f < 2])
    reference = COCOeval(gt, dt, "bbox")
    reference.evaluate()
    reference.accumulate()
    reference.summarize()
    expected = (reference.stats[0], reference.stats[1], reference.stats[2], reference.stats[8])
    assert ours == pytest.approx(expected, abs=1e-6)
    assert 0 < ours[1] < 1  # a miss and a false positive: neither 0 nor perfect


def test_perfect_detections_give_ap_1_and_an_ignored_box_counts_neither_way():
    truth = truth_frame([*TRUTH, ("v", 1, 9, "person", 200.0, 10.0, 240.0, 90.0, True)])
    perfect = detections_frame([("v", f, c, 0.9, x1, y1, x2, y2) for _, f, _, c, x1, y1, x2, y2, _ in TRUTH]
                               + [("v", 1, "person", 0.6, 200.0, 10.0, 240.0, 90.0)])  # on the ignored box
    assert coco_ap(truth, perfect, ANNOTATED, ["person"]) == pytest.approx((1.0, 1.0, 1.0, 1.0))
    table = detection_metrics(truth, perfect, ANNOTATED, ["person"], 0.5, 0.5)
    row = table.filter(pl.col("video_id").is_null() & pl.col("class_name").is_null() &
                       (pl.col("score_threshold") == 0.5)).row(0, named=True)
    assert (row["true_positives"], row["false_positives"], row["false_negatives"]) == (3, 0, 0)


def test_an_identity_switch_made_on_purpose():
    frames = pl.DataFrame({"video_id": ["v"] * 10, "frame_index": list(range(10))})
    truth = truth_frame([("v", i, 1, "person", 10.0 + i, 10.0, 50.0 + i, 90.0, False) for i in range(10)])
    tracks = pl.DataFrame([{"video_id": "v", "frame_index": i, "class_name": "person", "score": 0.9,
                            "x1": 10.0 + i, "y1": 10.0, "x2": 50.0 + i, "y2": 90.0, "track_id": 5 if i < 5 else 6}
                           for i in range(10)])
    table = tracking_metrics(truth, tracks, frames, ["person"], 0.5)
    row = table.filter(pl.col("class_name") == "person").row(0, named=True)
    assert row["id_switches"] == 1
    assert row["mota"] == pytest.approx(1 - 1 / 10)  # no miss, no false positive, one switch in 10
    assert row["idf1"] == pytest.approx(0.5)  # the best one-to-one assignment keeps 5 of 10 frames
    assert row["motp"] == pytest.approx(1.0) and row["deta"] == pytest.approx(1.0)
    assert row["assa"] < 1.0 and row["hota"] < 1.0


def test_the_readers_read_files_as_the_tools_write_them(tmp_path):
    sequence = tmp_path / "mot" / "clip"
    (sequence / "gt").mkdir(parents=True)
    # MOTChallenge's devkit: frame (1-based), id, left, top, width, height, conf, class, visibility.
    (sequence / "gt" / "gt.txt").write_text("1,1,10,20,30,40,1,1,1.0\n2,1,12,20,30,40,1,1,0.8\n2,2,5,5,10,10,0,1,1\n")
    (sequence / "seqinfo.ini").write_text("[Sequence]\nname=clip\nframeRate=25\nseqLength=3\nimWidth=320\n"
                                          "imHeight=240\n")
    mot = read(str(tmp_path / "mot"))
    assert mot.frames["frame_index"].to_list() == [0, 1, 2]  # seqLength frames, one without boxes
    assert mot.boxes.select("frame_index", "track_id", "class_name", "x1", "y1", "x2", "y2", "ignore").rows() == [
        (0, 1, "pedestrian", 10.0, 20.0, 40.0, 60.0, False), (1, 1, "pedestrian", 12.0, 20.0, 42.0, 60.0, False),
        (1, 2, "pedestrian", 5.0, 5.0, 15.0, 15.0, True)]
    coco = {"videos": [{"id": 7, "name": "cam/clip.mp4"}],
            "images": [{"id": 1, "video_id": 7, "frame_index": 0, "file_name": "cam/clip/0.jpg"},
                       {"id": 2, "video_id": 7, "frame_index": 4, "file_name": "cam/clip/4.jpg"}],
            "annotations": [{"id": 1, "image_id": 2, "category_id": 3, "bbox": [1, 2, 3, 4], "track_id": 11,
                             "iscrowd": 0, "area": 12}],
            "categories": [{"id": 3, "name": "car"}]}
    (tmp_path / "tao.json").write_text(json.dumps(coco))
    tao = read(str(tmp_path / "tao.json"))
    assert tao.frames.rows() == [("cam/clip.mp4", 0), ("cam/clip.mp4", 4)]
    assert tao.boxes.select("video", "frame_index", "track_id", "class_name", "x2", "y2").rows() == [
        ("cam/clip.mp4", 4, 11, "car", 4.0, 6.0)]
    matched, unmatched = match_videos(["cam/clip.mp4", "clip", "other"], {"cam/clip.mp4": "c-1", "x/y.mp4": "y-2"})
    assert matched == {"cam/clip.mp4": "c-1", "clip": "c-1"} and unmatched == ["other"]


def square_video(path: Path, frames: int = 12) -> list[tuple[int, int, int, int]]:
    """A white square moving right on black; returns its true box per frame (x1, y1, x2, y2)."""
    from job.samples import write_video

    images, boxes = [], []
    for i in range(frames):
        image = np.zeros((120, 160, 3), dtype=np.uint8)
        image[40:60, 10 + 6 * i:30 + 6 * i] = 255
        images.append(image)
        boxes.append((10 + 6 * i, 40, 30 + 6 * i, 60))
    write_video(path, images, size=(160, 120))
    return boxes


@pytest.mark.slow
def test_a_sweep_is_ranked_by_map_and_the_numbers_are_right(tmp_path):
    from cli import run_cli

    boxes = square_video(tmp_path / "videos" / "square.mp4")
    (tmp_path / "gt" / "square" / "gt").mkdir(parents=True)
    (tmp_path / "gt" / "square" / "gt" / "gt.txt").write_text("".join(
        f"{i + 1},1,{x1},{y1},{x2 - x1},{y2 - y1},1,1,1\n" for i, (x1, y1, x2, y2) in enumerate(boxes)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    sweep = tmp_path / "sweep"
    # level 0.8 finds the square; level 1.01 finds nothing (no pixel is brighter than white).
    result = run_cli("-m", "model._target_=plugins.build", "+model.builder_args.level=0.8,1.01",
                     f"video_dir={tmp_path / 'videos'}", f"output_dir={sweep}", "device=cpu", "ray.num_cpus=2",
                     "ray.num_actors=1", "tracker=bytetrack", "evaluate.classes={pedestrian: bright square}",
                     f"evaluate.ground_truth={tmp_path / 'gt'}", env=env, timeout=900)
    assert result.returncode == 0, result.output[-3000:]
    good = next(sweep.glob("*level=0.8*"))
    detection = pl.read_parquet(good / "evaluation" / "detection.parquet")
    overall = detection.filter(pl.col("video_id").is_null() & pl.col("class_name").is_null() &
                               (pl.col("score_threshold") == 0.5)).row(0, named=True)
    assert overall["ap50"] == pytest.approx(1.0) and (overall["precision"], overall["recall"]) == (1.0, 1.0)
    assert overall["true_positives"] == 12
    tracking = pl.read_parquet(good / "evaluation" / "tracking.parquet")
    assert tracking.filter(pl.col("class_name").is_null() & pl.col("video_id").is_null())["idf1"].item() > 0.5
    summary = json.loads((good / "evaluation" / "summary.json").read_text())
    assert "run once at the lowest threshold" in summary["note"]

    ranked = run_cli(str(sweep), "--by", "map", module="job.compare")
    assert ranked.returncode == 0, ranked.output
    assert f"best by map: {good.name}" in ranked.output

    unquoted = run_cli(f"output_dir={good}", f"ground_truth={tmp_path / 'gt'}", module="job.evaluate")
    assert unquoted.returncode == 2 and "quote a value holding '='" in unquoted.output, unquoted.output
    again = run_cli(f"output_dir='{good}'", f"ground_truth={tmp_path / 'gt'}", "classes={pedestrian: bright square}",
                    module="job.evaluate", env=env)
    assert again.returncode == 0, again.output
    assert "mAP" in again.output and "AP50 100.0%" in again.output
    assert "evaluation is up to date" in again.output  # nothing changed since the run's own evaluation
    assert pl.read_parquet(good / "evaluation" / "detection.parquet").equals(detection)
    mapped_otherwise = run_cli(f"output_dir='{good}'", f"ground_truth={tmp_path / 'gt'}", module="job.evaluate",
                               env=env)  # no class map: the ground truth's pedestrians match no detection
    assert mapped_otherwise.returncode == 0 and "up to date" not in mapped_otherwise.output
    assert "AP50 0.0%" in mapped_otherwise.output, mapped_otherwise.output[-2000:]
    report = run_cli(f"output_dir='{good}'", module="job.report", env=env)
    assert report.returncode == 0, report.output[-2000:]
    page = (good / "report" / "index.html").read_text()
    assert "<h2>Against the ground truth</h2>" in page and 'src="pr_curves.png"' in page
    assert (good / "report" / "pr_curves.png").stat().st_size > 5000
    wrong = run_cli(f"output_dir='{good}'", f"ground_truth={tmp_path / 'nowhere'}", module="job.evaluate")
    assert wrong.returncode == 2 and len(wrong.output.strip().splitlines()) == 1, wrong.output


CVAT = """<?xml version="1.0" encoding="utf-8"?>
<annotations>
  <version>1.1</version>
  <meta>
    <task>
      <id>3</id>
      <name>yard</name>
      <size>6</size>
      <mode>interpolation</mode>
      <original_size><width>320</width><height>240</height></original_size>
      <source>cam1/yard.mp4</source>
    </task>
  </meta>
  <track id="0" label="person" source="manual">
    <box frame="0" keyframe="1" outside="0" occluded="0" xtl="10.00" ytl="20.00" xbr="40.00" ybr="80.00" z_order="0"></box>
    <box frame="1" keyframe="0" outside="0" occluded="0" xtl="12.00" ytl="20.00" xbr="42.00" ybr="80.00" z_order="0"></box>
    <box frame="2" keyframe="1" outside="1" occluded="0" xtl="14.00" ytl="20.00" xbr="44.00" ybr="80.00" z_order="0"></box>
  </track>
  <track id="1" label="car" source="manual">
    <box frame="1" keyframe="1" outside="0" occluded="0" xtl="100.00" ytl="100.00" xbr="200.00" ybr="160.00" z_order="0"></box>
    <box frame="4" keyframe="1" outside="0" occluded="0" xtl="130.00" ytl="100.00" xbr="230.00" ybr="160.00" z_order="0"></box>
  </track>
</annotations>
"""


def test_cvat_for_video_is_read_as_the_file_holds_it_and_keyframe_gaps_are_said(tmp_path):
    (tmp_path / "yard.xml").write_text(CVAT)
    truth = read(str(tmp_path / "yard.xml"))
    assert truth.format == "cvat" and truth.frames["frame_index"].to_list() == [0, 1, 2, 3, 4, 5]
    assert truth.boxes.select("video", "frame_index", "track_id", "class_name", "x1", "x2").rows() == [
        ("cam1/yard.mp4", 0, 0, "person", 10.0, 40.0), ("cam1/yard.mp4", 1, 0, "person", 12.0, 42.0),
        ("cam1/yard.mp4", 1, 1, "car", 100.0, 200.0), ("cam1/yard.mp4", 4, 1, "car", 130.0, 230.0)]
    assert len(truth.notes) == 1 and "keyframes only" in truth.notes[0]  # the car's frames 2-3 are not in the file
