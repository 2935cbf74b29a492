"""The results report: `python -m job.report output_dir=OUT` (or `report=true` on the job) writes OUT/report/.

Made from the output alone (videos.parquet, manifest.json, predictions/) plus the videos, decoded
again for the pictures. Per video with detections, in report/<video_id>/: preview.mp4 (the first
`preview_seconds` with boxes drawn), timeline.png (detections per class over time) and sheet.jpg
(the frames with the most detections); report/index.html links them with relative links.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import tempfile

import polars as pl

from job.config import ReportConfig
from job.decode import VideoError, probe, timestamps_for
from job.discover import discover_videos
from job.errors import ConfigError, JobError
from job.report import page, pictures, timeline
from job.storage import local_copy
from job.write import MANIFEST, VIDEOS_TABLE, OutputDir

log = logging.getLogger(__name__)
REPORT = "report"


def make_report(cfg: ReportConfig) -> str:
    """Writes the report; returns where its index.html is."""
    from tqdm import tqdm

    output = OutputDir(cfg.output_dir)
    manifest_bytes, table_bytes = output.store.get(MANIFEST), output.store.get(VIDEOS_TABLE)
    if manifest_bytes is None or table_bytes is None:
        raise ConfigError(f"output_dir={cfg.output_dir} has no {MANIFEST} and {VIDEOS_TABLE}: pass the output_dir "
                          f"of a run that finished")
    manifest = json.loads(manifest_bytes)
    videos = pl.read_parquet(table_bytes).sort("path")
    if cfg.videos:
        videos = videos.filter(pl.col("path").map_elements(lambda p: fnmatch.fnmatchcase(p, cfg.videos),
                                                           return_dtype=pl.Boolean))
    video_dir = cfg.video_dir or manifest["config"]["video_dir"]
    frame_stride = int(manifest["config"].get("frame_stride", 1))
    try:
        located = {video.video_id: video.path for video in discover_videos(video_dir)}
        not_found = f"not in video_dir={video_dir} any more (moved or deleted; pass video_dir= where it is now)"
    except JobError as exc:
        located, not_found = {}, str(exc)
    entries = []
    for row in tqdm(videos.iter_rows(named=True), total=videos.height, desc="report", unit="video",
                    dynamic_ncols=True):
        entry = page.VideoEntry(row)
        entries.append(entry)
        if not row["detections"]:
            entry.note = "no detections" if row["status"] != "failed" else "failed: see error"
            continue
        rows = _selected(output.video_detections(row["video_id"]), cfg)
        if rows.height == 0:
            entry.note = "no detections at this min_score / these classes"
            continue
        if row["video_id"] not in located:
            entry.note = f"cannot be read again: {not_found}"
            continue
        try:
            _pictures(output, located[row["video_id"]], row, rows, frame_stride, cfg)
        except (VideoError, OSError) as exc:
            entry.note = f"cannot be read again: {exc}"
            continue
        entry.pictures = row["video_id"]
    index = f"{REPORT}/index.html"
    output.store.put(index, page.render(cfg.output_dir, manifest, entries).encode())
    return output.store.path(index)


def _selected(rows: pl.DataFrame, cfg: ReportConfig) -> pl.DataFrame:
    rows = rows.filter(pl.col("score") >= cfg.min_score)
    if cfg.classes:
        rows = rows.filter(pl.col("class_name").is_in([str(name) for name in cfg.classes]))
    return rows


def _pictures(output: OutputDir, video_path: str, row: dict, rows: pl.DataFrame, frame_stride: int,
              cfg: ReportConfig) -> None:
    folder = f"{REPORT}/{row['video_id']}"
    with local_copy(video_path) as path, tempfile.TemporaryDirectory(prefix="job-report-") as scratch:
        info = probe(path)
        detected = timestamps_for(range(0, row["frame_count"] or 0, frame_stride), info)
        figure = timeline.plot(timeline.timeline_data(rows, detected), row["path"])
        output.store.put(f"{folder}/timeline.png", timeline.png(figure))
        preview = os.path.join(scratch, "preview.mp4")
        frames = pictures.render(path, info, rows, frame_stride, cfg.preview_seconds,
                                 pictures.sheet_frames(rows, cfg.sheet_frames), preview)
        with open(preview, "rb") as handle:
            output.store.put(f"{folder}/preview.mp4", handle.read())
        output.store.put(f"{folder}/sheet.jpg", pictures.contact_sheet(frames))
