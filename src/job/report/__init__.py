"""The results report: `python -m job.report output_dir=OUT` (or `report=true` on the job) writes OUT/report/.

Made from the output alone (videos.parquet, manifest.json, predictions/) plus the videos, decoded
again for the pictures. Per video with detections, in report/<video_id>/: preview.mp4 (the first
`preview_seconds` with boxes drawn), timeline.png (detections per class over time) and sheet.jpg
(the frames with the most detections); report/index.html links them with relative links.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import tempfile

import polars as pl

from job.analytics import COUNTS_SCHEMA
from job.config import ReportConfig
from job.decode import VideoError, detected_frames, probe
from job.discover import discover_videos
from job.errors import JobError
from job.layout import ANALYTICS_COUNTS, EVALUATION_DETECTION, TRACK_SUMMARY
from job.output import OutputDir
from job.report import draw, evaluation, page, pictures, timeline
from job.video_cache import local_copy

log = logging.getLogger(__name__)
REPORT = "report"


def make_report(cfg: ReportConfig) -> str:
    """Writes the report; returns where its index.html is."""
    from tqdm import tqdm

    output = OutputDir(cfg.output_dir)
    manifest, videos = output.finished_run()
    videos = videos.sort("path")
    if cfg.videos:
        videos = videos.filter(pl.col("path").map_elements(lambda p: fnmatch.fnmatchcase(p, cfg.videos),
                                                           return_dtype=pl.Boolean))
    video_dir = cfg.video_dir or manifest["config"]["video_dir"]
    frame_stride = int(manifest["config"].get("frame_stride", 1))
    analytics = manifest["config"].get("analytics") or {}  # the lines and zones drawn, with their counts
    counts_bytes = output.store.get(ANALYTICS_COUNTS)
    counts = pl.read_parquet(counts_bytes) if counts_bytes is not None else pl.DataFrame(schema=COUNTS_SCHEMA)
    try:
        located = {video.video_id: video.path for video in discover_videos(video_dir)}
        not_found = f"not in video_dir={video_dir} any more (moved or deleted; pass video_dir= where it is now)"
    except JobError as exc:
        located, not_found = {}, str(exc)
    entries = []
    per_class: list[pl.DataFrame] = []
    for row in tqdm(videos.iter_rows(named=True), total=videos.height, desc="report", unit="video",
                    dynamic_ncols=True):
        entry = page.VideoEntry(row)
        entries.append(entry)
        if not row["detections"]:
            entry.note = "no detections" if row["status"] != "failed" else "failed: see error"
            continue
        rows = _selected(output.parts.read(row["video_id"]), cfg)
        per_class.append(rows.group_by("class_name").len("detections"))
        if rows.height == 0:
            entry.note = "no detections at this min_score / these classes"
            continue
        if row["video_id"] not in located:
            entry.note = f"cannot be read again: {not_found}"
            continue
        try:
            _pictures(output, located[row["video_id"]], row, rows, frame_stride, cfg, analytics, counts)
        except (VideoError, OSError) as exc:
            entry.note = f"cannot be read again: {exc}"
            continue
        entry.pictures = row["video_id"]
    classes = _class_table(output, per_class, videos["video_id"].to_list(), cfg)
    index = f"{REPORT}/index.html"
    scores, curves = None, None
    if (detection_bytes := output.store.get(EVALUATION_DETECTION)) is not None:
        detection = pl.read_parquet(detection_bytes)
        scores = evaluation.overall_per_class(detection)
        curves = "pr_curves.png"
        output.store.put(f"{REPORT}/{curves}", timeline.png(evaluation.pr_curves(detection)))
    output.store.put(index, page.render(cfg.output_dir, manifest, entries, classes, scores, curves).encode())
    return output.store.path(index)


def _class_table(output: OutputDir, per_class: list[pl.DataFrame], video_ids: list[str],
                 cfg: ReportConfig) -> pl.DataFrame:
    """Detections per class over the report's videos, and distinct objects (tracks) beside them when the run
    has tracks."""
    if not per_class:
        return pl.DataFrame(schema={"class_name": pl.String, "detections": pl.Int64})
    table = pl.concat(per_class).group_by("class_name").agg(pl.col("detections").sum().cast(pl.Int64))
    summary = output.store.get(TRACK_SUMMARY)
    if summary is not None:
        tracks = pl.read_parquet(summary).filter(pl.col("video_id").is_in(video_ids) &
                                                 (pl.col("max_score") >= cfg.min_score))
        if cfg.classes:
            tracks = tracks.filter(pl.col("class_name").is_in([str(name) for name in cfg.classes]))
        objects = tracks.group_by("class_name").len("objects").with_columns(pl.col("objects").cast(pl.Int64))
        table = table.join(objects, on="class_name", how="left").with_columns(pl.col("objects").fill_null(0))
    return table.sort(["detections", "class_name"], descending=[True, False])


def _selected(rows: pl.DataFrame, cfg: ReportConfig) -> pl.DataFrame:
    rows = rows.filter(pl.col("score") >= cfg.min_score)
    if cfg.classes:
        rows = rows.filter(pl.col("class_name").is_in([str(name) for name in cfg.classes]))
    return rows


def _pictures(output: OutputDir, video_path: str, row: dict, rows: pl.DataFrame, frame_stride: int,
              cfg: ReportConfig, analytics: dict, counts: pl.DataFrame) -> None:
    folder = f"{REPORT}/{row['video_id']}"
    with local_copy(video_path) as path, tempfile.TemporaryDirectory(prefix="job-report-") as scratch:
        info = probe(path)
        _, detected = detected_frames(info, row["frame_count"] or 0, frame_stride)
        figure = timeline.plot(timeline.timeline_data(rows, detected), row["path"])
        output.store.put(f"{folder}/timeline.png", timeline.png(figure))
        preview = os.path.join(scratch, "preview.mp4")
        overlays = draw.overlays_for(analytics, row["path"], counts.filter(pl.col("video_id") == row["video_id"]),
                                     info.width, info.height)
        frames = pictures.render(path, info, rows, frame_stride, cfg.preview_seconds,
                                 pictures.sheet_frames(rows, cfg.sheet_frames), preview, overlays)
        with open(preview, "rb") as handle:
            output.store.put(f"{folder}/preview.mp4", handle.read())
        output.store.put(f"{folder}/sheet.jpg", pictures.contact_sheet(frames))
