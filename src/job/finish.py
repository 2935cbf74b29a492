"""The end of a run: the videos table, the manifest and the summary line. No Ray here."""

from __future__ import annotations

import dataclasses
import platform
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import version
from typing import Any

from job import __version__
from job.config import to_plain
from job.discover import Video
from job.output import OutputDir
from job.plan import Plan
from job.status import VideoStatus


@dataclass
class RunSummary:
    output_dir: str
    videos: int = 0
    ok: int = 0
    partial: int = 0
    failed: int = 0
    missing: int = 0  # rows kept for videos whose files are gone
    skipped: int = 0
    frames: int = 0  # detected by this run (not the frames an earlier, interrupted run committed)
    detections: int = 0
    seconds: float = 0.0
    # From the actors being ready (Ray started, model loaded and warm) to the last video done.
    processing_seconds: float = 0.0

    def describe(self) -> str:
        rate = self.frames / self.seconds if self.seconds else 0.0
        steady = self.frames / self.processing_seconds if self.processing_seconds else 0.0
        return (
            f"{self.videos} videos: {self.ok} ok, {self.partial} partial, {self.failed} failed "
            f"({self.skipped} already done{f'; {self.missing} missing' if self.missing else ''}); {self.frames} frames detected, {self.detections} detections, "
            f"{self.seconds:.1f} s ({rate:.1f} frames/s; {steady:.1f} frames/s after start-up); "
            f"output in {self.output_dir}"
        )


def summarize(output_dir: str, videos: list[Video], statuses: dict[str, VideoStatus], skipped: int,
              processed: list[str], seconds: float, processing_seconds: float, missing: int = 0) -> RunSummary:
    ordered = [statuses[v.video_id] for v in videos]
    return RunSummary(
        output_dir=output_dir,
        videos=len(videos),
        ok=sum(s.status == "ok" for s in ordered),
        partial=sum(s.status == "partial" for s in ordered),
        failed=sum(s.status == "failed" for s in ordered),
        missing=missing,
        skipped=skipped,
        frames=sum(statuses[video_id].frames_this_run for video_id in processed),
        detections=sum(s.detections or 0 for s in ordered),
        seconds=seconds,
        processing_seconds=processing_seconds,
    )


def write_tables(output: OutputDir, plan: Plan, statuses: dict[str, VideoStatus], summary: RunSummary,
                 started_at: datetime, ray_job_id: str | None) -> None:
    output.statuses.write_index(statuses)
    output.write_videos_table([statuses[v.video_id] for v in plan.videos] + plan.missing)
    output.write_manifest(manifest(plan, started_at, summary, ray_job_id))


def manifest(plan: Plan, started_at: datetime, summary: RunSummary, ray_job_id: str | None) -> dict[str, Any]:
    return {
        "job_version": __version__,
        "config": to_plain(plan.settings),  # with the class names the run used, when it ran a model
        "settings": plan.detection_settings,
        "started_at": started_at.isoformat(),
        "finished_at": datetime.now(timezone.utc).isoformat(),
        "versions": {"python": platform.python_version(),
                     **{lib: version(lib) for lib in ("torch", "torchvision", "decord", "av", "ray", "polars")}},
        "totals": dataclasses.asdict(summary),
        # Jobs of one sweep share a Ray runtime: the same job id here.
        "ray_job_id": ray_job_id,
    }
