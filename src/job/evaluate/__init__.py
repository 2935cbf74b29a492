"""How good a run's detections and tracks are against ground truth: COCO AP and precision/recall per
threshold (faster-coco-eval, pycocotools' numbers), HOTA/MOTA/IDF1 (the trackers library's metrics).

Only annotated frames count: a detection on a frame nobody annotated is no false positive, and a video
without annotations is listed as not evaluated. A run at score_threshold 0.5 holds no detections below it,
so precision and recall are given at its threshold and above; to see lower ones, run at a low threshold
and filter (the summary says so).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import polars as pl

from job.config import EvaluationConfig
from job.errors import ConfigError
from job.ground_truth import GroundTruth, match_videos
from job.ground_truth import read as read_ground_truth
from job.layout import (
    EVALUATION_DETECTION,
    EVALUATION_SUMMARY,
    EVALUATION_TRACKING,
    VIDEOS_TABLE,
    tracks_file,
)
from job.output import OutputDir
from job.storage import json_bytes, parquet_bytes

log = logging.getLogger(__name__)

DETECTION_SCHEMA = {"video_id": pl.String, "class_name": pl.String, "ap": pl.Float64, "ap50": pl.Float64,
                    "ap75": pl.Float64, "ar100": pl.Float64, "score_threshold": pl.Float64,
                    "precision": pl.Float64, "recall": pl.Float64, "f1": pl.Float64,
                    "true_positives": pl.Int64, "false_positives": pl.Int64, "false_negatives": pl.Int64}
TRACKING_SCHEMA = {"video_id": pl.String, "class_name": pl.String, "hota": pl.Float64, "deta": pl.Float64,
                   "assa": pl.Float64, "mota": pl.Float64, "motp": pl.Float64, "idf1": pl.Float64,
                   "id_switches": pl.Int64}
THRESHOLD_STEP = 0.05


@dataclass
class Evaluation:
    detection: pl.DataFrame
    tracking: pl.DataFrame | None
    summary: dict = field(default_factory=dict)


def evaluate_run(output: OutputDir, settings: EvaluationConfig) -> Evaluation:
    """Evaluates the run in `output` against `settings.ground_truth` and writes evaluation/."""
    truth = read_ground_truth(settings.ground_truth)
    manifest, videos = output.finished_run()
    threshold = float(manifest["config"]["score_threshold"])
    matched, unmatched = match_videos(sorted(truth.frames["video"].unique()), dict(zip(videos["path"],
                                                                                  videos["video_id"])))
    if not matched:
        raise ConfigError(f"ground_truth={settings.ground_truth}: none of its videos ({', '.join(unmatched[:5])}) "
                          f"is a video of this run (matched by path under video_dir, or by a unique stem)")
    chosen = {f.name: getattr(settings, f.name) for f in fields(EvaluationConfig) if f.name != "ground_truth"}
    inputs = {"ground_truth_sha256": truth.digest, "settings": chosen,
              "videos_table_sha256": hashlib.sha256(output.store.get(VIDEOS_TABLE)).hexdigest(),
              "tracks": {video_id: output.tracks_state(video_id) for video_id in sorted(matched.values())}}
    previous = output.store.get(EVALUATION_SUMMARY)
    detection_bytes = output.store.get(EVALUATION_DETECTION)
    if previous is not None and detection_bytes is not None and json.loads(previous).get("inputs") == inputs:
        tracking_bytes = output.store.get(EVALUATION_TRACKING)
        log.info("evaluation is up to date with these detections, tracks and ground truth")
        return Evaluation(pl.read_parquet(detection_bytes),
                          pl.read_parquet(tracking_bytes) if tracking_bytes is not None else None,
                          json.loads(previous))
    truth_boxes, frames = _mapped(truth, matched, settings)
    detections = pl.concat([output.parts.read(video_id).with_columns(video_id=pl.lit(video_id))
                            for video_id in matched.values()], how="diagonal_relaxed")
    detections = detections.join(frames, on=["video_id", "frame_index"], how="semi")  # annotated frames only
    classes = sorted(set(truth_boxes.filter(~pl.col("ignore"))["class_name"]))
    detection = detection_metrics(truth_boxes, detections, frames, classes, threshold, settings.iou)
    tracking = None
    if output.has_tracks():
        tracks = pl.concat([pl.read_parquet(data).with_columns(video_id=pl.lit(video_id))
                            for video_id in matched.values()
                            if (data := output.store.get(tracks_file(video_id))) is not None], how="diagonal_relaxed")
        tracks = tracks.join(frames, on=["video_id", "frame_index"], how="semi")
        tracking = tracking_metrics(truth_boxes, tracks, frames, classes, settings.iou)
    not_evaluated = sorted(set(videos["video_id"]) - set(matched.values()))
    for note in truth.notes:
        log.warning("ground truth: %s", note)
    summary = {"ground_truth": settings.ground_truth, "format": truth.format, "ground_truth_sha256": truth.digest,
               "ground_truth_notes": truth.notes,
               "settings": asdict(settings), "run_score_threshold": threshold,
               "videos_evaluated": sorted(matched.values()), "videos_not_evaluated": not_evaluated,
               "annotated_videos_not_in_the_run": unmatched,
               "inputs": inputs,
               "note": (f"precision and recall are given at the run's score_threshold ({threshold:g}) and above: "
                        f"its detections below it were never kept. To compare lower thresholds, run once at the "
                        f"lowest threshold you consider and evaluate that run.")}
    output.store.put(EVALUATION_DETECTION, parquet_bytes(detection))
    if tracking is not None:
        output.store.put(EVALUATION_TRACKING, parquet_bytes(tracking))
    output.store.put(EVALUATION_SUMMARY, json_bytes(summary))  # last: it says what the tables were made from
    return Evaluation(detection, tracking, summary)


def _mapped(truth: GroundTruth, matched: dict[str, str], settings: EvaluationConfig) -> tuple[pl.DataFrame,
                                                                                              pl.DataFrame]:
    """The true boxes and annotated frames of matched videos, by run video_id, classes mapped to the run's."""
    names = pl.DataFrame({"video": list(matched), "video_id": list(matched.values())})
    boxes = truth.boxes.join(names, on="video").with_columns(
        pl.col("class_name").replace(dict(settings.classes or {})),
        (pl.col("ignore") | pl.col("class_name").is_in(list(settings.ignore_classes))).alias("ignore"))
    return boxes, truth.frames.join(names, on="video").select("video_id", "frame_index")


def detection_metrics(truth: pl.DataFrame, detections: pl.DataFrame, frames: pl.DataFrame, classes: list[str],
                      run_threshold: float, iou: float) -> pl.DataFrame:
    """Rows per (video, class), (video, all classes), (all videos, class) and (all, all); one per threshold."""
    thresholds = _thresholds(run_threshold)
    rows = []
    video_ids = sorted(set(frames["video_id"]))
    for video_id in [*video_ids, None]:
        for class_name in [*classes, None]:
            picked_frames = frames if video_id is None else frames.filter(pl.col("video_id") == video_id)
            gt, dt = _subset(truth, video_id, class_name), _subset(detections, video_id, class_name)
            if class_name is None:
                gt, dt = gt.filter(pl.col("class_name").is_in(classes)), dt.filter(pl.col("class_name").is_in(classes))
            ap = coco_ap(gt, dt, picked_frames, classes if class_name is None else [class_name])
            for threshold in thresholds:
                tp, fp, fn = _matches(gt, dt.filter(pl.col("score") >= threshold), iou)
                precision = tp / (tp + fp) if tp + fp else None
                recall = tp / (tp + fn) if tp + fn else None
                f1 = (2 * precision * recall / (precision + recall)) if precision and recall else (
                    0.0 if precision is not None and recall is not None else None)
                rows.append((video_id, class_name, *ap, threshold, precision, recall, f1, tp, fp, fn))
    return pl.DataFrame(rows, schema=DETECTION_SCHEMA, orient="row")


def _thresholds(run_threshold: float) -> list[float]:
    steps = np.arange(np.ceil(run_threshold / THRESHOLD_STEP) * THRESHOLD_STEP, 1.0, THRESHOLD_STEP)
    return sorted({round(run_threshold, 6), *(round(float(t), 6) for t in steps if t >= run_threshold)})


def _subset(frame: pl.DataFrame, video_id: str | None, class_name: str | None) -> pl.DataFrame:
    if video_id is not None:
        frame = frame.filter(pl.col("video_id") == video_id)
    if class_name is not None:
        frame = frame.filter(pl.col("class_name") == class_name)
    return frame


def coco_ap(truth: pl.DataFrame, detections: pl.DataFrame, frames: pl.DataFrame,
            classes: list[str]) -> tuple[float | None, float | None, float | None, float | None]:
    """(AP@[.5:.95], AP50, AP75, AR@100) by faster-coco-eval; None where there is nothing true to find."""
    try:
        from faster_coco_eval import COCO, COCOeval_faster
    except ImportError:
        raise ConfigError('evaluation needs faster-coco-eval: pip install -e ".[eval]"') from None

    if truth.filter(~pl.col("ignore")).height == 0:
        return None, None, None, None
    image_ids = {key: i + 1 for i, key in enumerate(frames.select("video_id", "frame_index").rows())}
    category_ids = {name: i + 1 for i, name in enumerate(classes)}
    annotations = [
        {"id": i + 1, "image_id": image_ids[(r["video_id"], r["frame_index"])], "category_id": category_ids[r["class_name"]],
         "bbox": [r["x1"], r["y1"], r["x2"] - r["x1"], r["y2"] - r["y1"]],
         "area": (r["x2"] - r["x1"]) * (r["y2"] - r["y1"]), "iscrowd": int(r["ignore"])}
        for i, r in enumerate(truth.iter_rows(named=True)) if r["class_name"] in category_ids]
    coco = COCO({"images": [{"id": i} for i in image_ids.values()], "annotations": annotations,
                 "categories": [{"id": i, "name": n} for n, i in category_ids.items()]})
    results = [{"image_id": image_ids[(r["video_id"], r["frame_index"])], "category_id": category_ids[r["class_name"]],
                "bbox": [r["x1"], r["y1"], r["x2"] - r["x1"], r["y2"] - r["y1"]], "score": r["score"]}
               for r in detections.iter_rows(named=True) if r["class_name"] in category_ids]
    if not results:
        return 0.0, 0.0, 0.0, 0.0
    evaluation = COCOeval_faster(coco, coco.loadRes(results), "bbox", print_function=lambda *a, **k: None)
    evaluation.params.imgIds = list(image_ids.values())
    evaluation.params.catIds = list(category_ids.values())
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    stats = [None if v < 0 else float(v) for v in (evaluation.stats[0], evaluation.stats[1], evaluation.stats[2],
                                                     evaluation.stats[8])]
    return stats[0], stats[1], stats[2], stats[3]


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in a (N, 4) with every box in b (M, 4), x1 y1 x2 y2."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def _matches(truth: pl.DataFrame, detections: pl.DataFrame, iou: float) -> tuple[int, int, int]:
    """(true positives, false positives, false negatives): per frame and class, each detection in score
    order takes the unmatched true box it overlaps most (IoU >= iou), as COCO matches; one that overlaps
    only an ignored box counts neither way."""
    tp = fp = 0
    truth_groups = {k: g for k, g in truth.group_by("video_id", "frame_index", "class_name")}
    for key, group in detections.group_by("video_id", "frame_index", "class_name"):
        found = truth_groups.get(key)
        boxes = group.sort("score", descending=True).select("x1", "y1", "x2", "y2").to_numpy().astype(np.float64)
        if found is None:
            fp += len(boxes)
            continue
        true_boxes = found.select("x1", "y1", "x2", "y2").to_numpy().astype(np.float64)
        ignored = found["ignore"].to_numpy()
        overlaps = box_iou(boxes, true_boxes)
        taken = np.zeros(len(true_boxes), dtype=bool)
        for row in overlaps:
            candidates = np.where(~taken & ~ignored & (row >= iou), row, -1.0)
            best = int(np.argmax(candidates)) if len(candidates) else -1
            if best >= 0 and candidates[best] >= 0:
                taken[best] = True
                tp += 1
            elif not (ignored & (row >= iou)).any():
                fp += 1
    positives = truth.filter(~pl.col("ignore")).height
    return tp, fp, positives - tp


def tracking_metrics(truth: pl.DataFrame, tracks: pl.DataFrame, frames: pl.DataFrame, classes: list[str],
                     iou: float) -> pl.DataFrame:
    """HOTA (DetA, AssA), MOTA, MOTP, IDF1 and ID switches per (video, class), with rows for all classes
    (class_name null) and all videos (video_id null), through the trackers library's implementations
    (TrackEval's definitions). Confirmed tracks only."""
    try:
        from trackers.eval import compute_clear_metrics, compute_hota_metrics, compute_identity_metrics
    except ImportError:
        raise ConfigError('tracking metrics need the trackers library: pip install -e ".[track]"') from None

    confirmed = tracks.filter(pl.col("track_id").is_not_null() & (pl.col("track_id") >= 0))
    truth = truth.filter(~pl.col("ignore"))
    rows = []
    video_ids = sorted(set(frames["video_id"]))
    for video_id in [*video_ids, None]:
        for class_name in [*classes, None]:
            gt_ids, tr_ids, similarity = [], [], []
            for offset, each in enumerate(video_ids if video_id is None else [video_id]):
                # All videos at once: one sequence of their frames, ids kept apart per video.
                _frames_of(truth, confirmed, frames, classes, each, class_name, offset * 10**9, gt_ids, tr_ids,
                           similarity)
            hota = compute_hota_metrics(gt_ids, tr_ids, similarity)
            clear = compute_clear_metrics(gt_ids, tr_ids, similarity, threshold=iou)
            identity = compute_identity_metrics(gt_ids, tr_ids, similarity, threshold=iou)
            rows.append((video_id, class_name, float(hota["HOTA"]), float(hota["DetA"]), float(hota["AssA"]),
                         float(clear["MOTA"]), float(clear["MOTP"]), float(identity["IDF1"]), int(clear["IDSW"])))
    return pl.DataFrame(rows, schema=TRACKING_SCHEMA, orient="row")


def _frames_of(truth: pl.DataFrame, tracks: pl.DataFrame, frames: pl.DataFrame, classes: list[str], video_id: str,
               class_name: str | None, offset: int, gt_ids: list, tr_ids: list, similarity: list) -> None:
    """Appends one video's annotated frames: true and tracked ids (shifted by `offset`) and their IoUs."""
    gt = _subset(truth, video_id, class_name).filter(pl.col("class_name").is_in(classes))
    tr = _subset(tracks, video_id, class_name).filter(pl.col("class_name").is_in(classes))
    gt_by = {k[0]: g for k, g in gt.group_by("frame_index")}
    tr_by = {k[0]: g for k, g in tr.group_by("frame_index")}
    empty = np.zeros((0, 4))
    for index in sorted(frames.filter(pl.col("video_id") == video_id)["frame_index"]):
        g, t = gt_by.get(index), tr_by.get(index)
        g_boxes = g.select("x1", "y1", "x2", "y2").to_numpy().astype(np.float64) if g is not None else empty
        t_boxes = t.select("x1", "y1", "x2", "y2").to_numpy().astype(np.float64) if t is not None else empty
        gt_ids.append(g["track_id"].to_numpy() + offset if g is not None else np.zeros(0, dtype=np.int64))
        tr_ids.append(t["track_id"].to_numpy() + offset if t is not None else np.zeros(0, dtype=np.int64))
        similarity.append(box_iou(g_boxes, t_boxes))


def headline(result: Evaluation) -> str:
    """One line: the overall scores, at the run's threshold."""
    overall = result.detection.filter(pl.col("video_id").is_null() & pl.col("class_name").is_null()).row(0, named=True)
    line = (f"mAP {_pct(overall['ap'])}, AP50 {_pct(overall['ap50'])}, at score >= {overall['score_threshold']:g}: "
            f"precision {_pct(overall['precision'])}, recall {_pct(overall['recall'])}, F1 {_pct(overall['f1'])}")
    if result.tracking is not None and result.tracking.height:
        track = result.tracking.filter(pl.col("class_name").is_null() & pl.col("video_id").is_null()).row(0, named=True)
        line += f"; HOTA {_pct(track['hota'])}, IDF1 {_pct(track['idf1'])}"
    return line + f"; {len(result.summary['videos_not_evaluated'])} videos without annotations not evaluated"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"
