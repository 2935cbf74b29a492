"""One run, start to end: plan (what to do) -> prune (with prune=true) -> execute (the actor pool) -> track (if asked) -> finish (tables, manifest, summary)."""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone

from job.config import JobConfig
from job.finish import RunSummary, summarize, write_tables
from job.output import OutputDir
from job.plan import HeaderRead, Plan, make_plan
from job.status import VideoStatus

log = logging.getLogger(__name__)


def run(cfg: JobConfig, keep_ray: bool = False) -> RunSummary:
    """Process every video under cfg.video_dir into cfg.output_dir; returns the totals.

    `keep_ray` leaves a Ray runtime this call started running, for the next job of a sweep.
    """
    started_at, started = datetime.now(timezone.utc), time.monotonic()
    output = OutputDir(cfg.output_dir)
    plan = make_plan(cfg, output)
    for video_id in plan.to_prune:
        log.info("prune=true: removing %s, whose file is gone", video_id)
        output.remove_video(video_id)
    try:
        return _execute_and_finish(plan, output, started_at, started, keep_ray)
    finally:
        plan.lease.release()


def _execute_and_finish(plan: Plan, output: OutputDir, started_at: datetime, started: float,
                        keep_ray: bool) -> RunSummary:
    statuses: dict[str, VideoStatus] = dict(plan.finished)
    processing_seconds, ray_job_id = 0.0, None
    if plan.todo:
        from job.execute import ActorRun, RayRuntime  # the only way into Ray

        log.info("%d to process, %d already done", len(plan.todo), len(plan.finished))
        cfg = plan.settings
        headers = HeaderRead(plan.todo, cfg.frame_stride, cfg.ray.segment_frames, output)  # while Ray starts
        with RayRuntime(cfg.ray, keep=keep_ray) as runtime:
            actor_run = ActorRun(plan.todo, cfg, runtime, output, headers,
                                 on_model_loaded=lambda model: plan.record_settings(output, model))
            ray_job_id = runtime.job_id()
            for status in actor_run:
                statuses[status.video_id] = status
                if status.error:
                    log.warning("%s: %s: %s", status.path, status.status, status.error)
            processing_seconds = actor_run.processing_seconds
    else:
        plan.record_settings(output)
    cfg = plan.settings
    if cfg.tracker.name or output.has_tracks():
        _track(plan, output, statuses)
    if cfg.analytics.lines or cfg.analytics.zones:
        from job.analytics import update_analytics

        update_analytics(output, cfg.analytics, [*statuses.values(), *plan.missing])
    summary = summarize(str(cfg.output_dir), plan.videos, statuses, len(plan.finished),
                        [v.video_id for v in plan.todo], time.monotonic() - started, processing_seconds,
                        missing=len(plan.missing))
    write_tables(output, plan, statuses, summary, started_at, ray_job_id)
    log.info("summary: %s", summary.describe())
    if cfg.evaluate.ground_truth:
        from job.evaluate import evaluate_run, headline

        log.info("evaluation: %s", headline(evaluate_run(output, cfg.evaluate)))
    if cfg.report:
        from job.config import ReportConfig
        from job.report import make_report

        log.info("report: %s", make_report(ReportConfig(output_dir=cfg.output_dir)))
    else:
        log.info("pictures of the results: python -m job.report output_dir=%s", cfg.output_dir)
    return summary


def _track(plan: Plan, output: OutputDir, statuses: dict[str, VideoStatus]) -> None:
    """Tracks for every finished video (missing ones too: their detections are kept), counted in the table."""
    from job.track import TrackedVideo, update_tracks

    videos = [TrackedVideo(v.video_id, v.path, statuses[v.video_id]) for v in plan.videos]
    videos += [TrackedVideo(status.video_id, None, status) for status in plan.missing]
    counts = update_tracks(output, plan.settings.tracker, videos, plan.settings.frame_stride)
    for video in videos:
        video.status.tracks = counts.get(video.video_id)
