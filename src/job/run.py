"""Ray: the actor pool, sharding videos across it, retries after actor deaths, progress, summary.

The only module that imports Ray. Each actor loads the model once and processes whole videos;
the driver hands a video to whichever actor is free, so long and short videos balance out.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import platform
import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError
from tqdm import tqdm

from job import __version__, write
from job.config import is_weights_path
from job.discover import Video, discover_videos
from job.errors import OutputWriteError, WeightsError, first_line

log = logging.getLogger(__name__)



# Frame buffers are allocated by decoder threads and freed by the model's thread; with glibc's
# per-thread arenas that fragments and a worker's memory creeps up with video length. One arena
# stops it at no measured cost in speed (a fixed mmap threshold also did, but cost a third of
# the throughput in page faults; see benchmarks/).
WORKER_ENV = {"env_vars": {"MALLOC_ARENA_MAX": "1"}}
# Whether the Ray runtime in use is one this module started with WORKER_ENV in every worker's
# environment. Then actors need no runtime_env and reuse the workers Ray prestarts (a runtime_env
# makes Ray start a fresh process for each actor: ~0.6 s more start-up here).
_ray_has_worker_env = False


@ray.remote
class ProgressCounter:
    """Frames detected and frames expected, summed over actors, polled by the driver's bar."""

    def __init__(self) -> None:
        self.done = 0
        self.expected = 0

    def add(self, done: int, expected: int) -> None:
        self.done += done
        self.expected += expected

    def read(self) -> tuple[int, int]:
        return self.done, self.expected


@ray.remote(max_restarts=-1, max_task_retries=0)
class VideoWorker:
    """Holds one loaded model; processes one video per call."""

    def __init__(self, cfg: dict[str, Any], progress_actor: str, threads: int) -> None:
        import torch

        from job.detect import Detector
        from job.process import batch_size

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        torch.set_num_threads(threads)  # torch's pool sized to the CPUs Ray gave this actor
        self.cfg = cfg
        # Looked up by name: a handle argument would live in the object store, which restarts need intact.
        self.progress = ray.get_actor(progress_actor)
        model = cfg["model"]
        self.detector = Detector(model["name"], model["weights"], cfg["score_threshold"], cfg["device"],
                                 model["precision"], model["compile"])
        self.detector.warm_up(batch_size(cfg, self.detector))

    def device(self) -> str:
        return str(self.detector.device)

    def process(self, video: Video, attempts: int) -> dict[str, Any]:
        from job.process import process_video

        report = _BatchedProgress(self.progress)
        try:
            return process_video(video, self.cfg, self.detector, report, attempts)
        finally:
            report.flush()


class _BatchedProgress:
    """Sends progress to the counter actor at most every `interval` s instead of once per batch:
    the bar refreshes once a second anyway, and each remote call costs the actor CPU time."""

    def __init__(self, counter: Any, interval: float = 0.5) -> None:
        self.counter, self.interval = counter, interval
        self.done = self.expected = 0
        self.sent_at = time.monotonic()

    def __call__(self, done: int, expected: int) -> None:
        self.done += done
        self.expected += expected
        if time.monotonic() - self.sent_at >= self.interval:
            self.flush()

    def flush(self) -> None:
        if self.done or self.expected:
            self.counter.add.remote(self.done, self.expected)
        self.done = self.expected = 0
        self.sent_at = time.monotonic()


@dataclass
class RunSummary:
    output_dir: str
    videos: int = 0
    ok: int = 0
    partial: int = 0
    failed: int = 0
    skipped: int = 0
    frames: int = 0
    detections: int = 0
    seconds: float = 0.0
    # From the actors being ready (Ray started, model loaded and warm) to the last video done.
    processing_seconds: float = 0.0
    rows: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def describe(self) -> str:
        rate = self.frames / self.seconds if self.seconds else 0.0
        steady = self.frames / self.processing_seconds if self.processing_seconds else 0.0
        return (
            f"{self.videos} videos: {self.ok} ok, {self.partial} partial, {self.failed} failed "
            f"({self.skipped} already done); {self.frames} frames detected, {self.detections} detections, "
            f"{self.seconds:.1f} s ({rate:.1f} frames/s; {steady:.1f} frames/s after start-up); "
            f"output in {self.output_dir}"
        )


def detection_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """Everything the detections depend on; a rerun must match it to add to the same output."""
    model = cfg["model"]
    return {
        "model": model["name"],
        "weights": _weights_identity(model["name"], model["weights"]),
        "precision": model["precision"],
        "score_threshold": float(cfg["score_threshold"]),
        "frame_stride": int(cfg["frame_stride"]),
    }


def run(cfg: dict[str, Any], keep_ray: bool = False) -> RunSummary:
    """Process every video under cfg['video_dir'] into cfg['output_dir']; returns the totals.

    `keep_ray` leaves a Ray runtime this call started running, for the next job of a sweep.
    """
    started_at = datetime.now(timezone.utc)
    started = time.monotonic()
    output_dir = cfg["output_dir"]
    videos = discover_videos(cfg["video_dir"])
    write.check_writable(output_dir)
    write.ensure_settings(output_dir, detection_settings(cfg))
    log.info("found %d videos under %s", len(videos), cfg["video_dir"])

    rows: dict[str, dict[str, Any]] = {}
    todo: list[Video] = []
    for video in videos:
        previous = write.read_status(output_dir, video.video_id)
        if previous and not previous.get("retryable", True):
            rows[video.video_id] = previous
        else:
            todo.append(video)
    summary = RunSummary(str(output_dir), videos=len(videos), skipped=len(rows))
    if todo:
        log.info("%d to process, %d already done", len(todo), len(rows))
        started_ray = _init_ray(cfg["ray"])
        try:
            timing: dict[str, float] = {}
            for row in _process_on_actors(todo, cfg, timing):
                rows[row["video_id"]] = row
                if row["error"]:
                    log.warning("%s: %s: %s", row["path"], row["status"], row["error"])
        finally:
            if started_ray and not keep_ray:
                _shutdown_ray()
        if "ready" in timing:
            summary.processing_seconds = timing["done"] - timing["ready"]

    ordered = [rows[v.video_id] for v in videos]
    try:
        write.write_videos_table(output_dir, ordered)
    except OSError as exc:
        raise OutputWriteError.from_os_error(output_dir, exc) from exc
    for row in ordered:
        setattr(summary, row["status"], getattr(summary, row["status"]) + 1)
        summary.detections += row.get("detections") or 0
    summary.frames = sum(rows[v.video_id]["frames_processed"] or 0 for v in todo)
    summary.seconds = time.monotonic() - started
    summary.rows = ordered
    write.write_manifest(output_dir, _manifest(cfg, started_at, summary))
    log.info("summary: %s", summary.describe())
    return summary


def _weights_identity(name: str, weights: str) -> str:
    """A local file by its sha256; torchvision's weights by name and torchvision release.

    Computed without importing torch, so the driver stays small (it never runs a model).
    """
    if is_weights_path(weights):
        if not os.path.isfile(weights):
            raise WeightsError(f"model.weights={weights}: no such file")
        digest = hashlib.sha256()
        with open(weights, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        return f"sha256:{digest.hexdigest()}"
    return f"torchvision {version('torchvision')}: {name} {weights}"


def _init_ray(ray_cfg: dict[str, Any]) -> bool:
    """Connect to or start Ray; returns whether this call started it (and so must stop it)."""
    global _ray_has_worker_env
    if ray.is_initialized():
        return False
    address = ray_cfg["address"]
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
    embedded = address is None and not os.environ.get("RAY_ADDRESS")
    if embedded:
        kwargs.update(num_cpus=ray_cfg["num_cpus"], include_dashboard=False)
    # Ray's processes inherit the driver's environment when ray.init starts them.
    saved = {name: os.environ.get(name) for name in WORKER_ENV["env_vars"]}
    if embedded:
        os.environ.update(WORKER_ENV["env_vars"])
    try:
        ray.init(address=address, **kwargs)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    _ray_has_worker_env = embedded
    return True


def _shutdown_ray() -> None:
    global _ray_has_worker_env
    ray.shutdown()
    _ray_has_worker_env = False


def _actor_plan(cfg: dict[str, Any]) -> tuple[int, float, float]:
    """How many actors, and the CPUs and GPUs each asks Ray for."""
    ray_cfg = cfg["ray"]
    resources = ray.cluster_resources()
    gpus = resources.get("GPU", 0.0) if cfg["device"] != "cpu" else 0.0
    cpus = resources.get("CPU", 1.0)
    if cfg["device"] == "cuda" and not gpus:
        raise RuntimeError("device=cuda but the Ray cluster has no GPUs; use device=auto or device=cpu")
    gpus_each = min(ray_cfg["gpus_per_actor"], gpus) if gpus else 0.0
    cpus_each = min(ray_cfg["cpus_per_actor"], cpus)
    if ray_cfg["num_actors"] is not None:
        count = ray_cfg["num_actors"]
    elif gpus:
        count = max(1, math.floor(gpus / gpus_each + 1e-9))
    else:
        count = max(1, math.floor(cpus / cpus_each + 1e-9))
    if count * cpus_each > cpus:  # never ask for actors the cluster cannot place: they would wait forever
        cpus_each = cpus / count
    if gpus_each and count * gpus_each > gpus + 1e-9:
        raise RuntimeError(
            f"ray.num_actors={count} x ray.gpus_per_actor={gpus_each} needs more than the cluster's {gpus:g} GPUs"
        )
    return count, cpus_each, gpus_each


class WorkersCannotStartError(RuntimeError):
    pass


def _process_on_actors(todo: list[Video], cfg: dict[str, Any], timing: dict[str, float]):
    """Yields each video's final row as it completes; retries videos whose actor died."""
    count, cpus_each, gpus_each = _actor_plan(cfg)
    count = min(count, len(todo))
    log.info("starting %d actors (%.2g CPU, %.2g GPU each)", count, cpus_each, gpus_each)
    progress_name = f"job-progress-{uuid.uuid4().hex}"
    progress = ProgressCounter.options(num_cpus=0, name=progress_name).remote()
    runtime_env = None if _ray_has_worker_env else WORKER_ENV
    actors = [
        VideoWorker.options(num_cpus=cpus_each, num_gpus=gpus_each, runtime_env=runtime_env)
        .remote(cfg, progress_name, max(1, int(cpus_each)))
        for _ in range(count)
    ]
    bar = tqdm(total=0, unit="frame", desc="detecting", dynamic_ncols=True, mininterval=1.0)
    try:
        devices = _wait_until_ready(actors)
        log.info("actors ready on %s", ", ".join(sorted(set(devices))))
        timing["ready"] = time.monotonic()
        yield from _schedule(todo, actors, cfg, progress, bar)
        timing["done"] = time.monotonic()
    finally:
        bar.close()
        for actor in actors:
            ray.kill(actor)
        ray.kill(progress)


def _wait_until_ready(actors: list[Any]) -> list[str]:
    """Surface a model that cannot load (bad weights, no internet) once, not as a failure per video."""
    try:
        return ray.get([actor.device.remote() for actor in actors])
    except RayActorError as exc:
        raise WorkersCannotStartError(f"the Ray workers could not load the model: {_root_cause(exc)}") from None


def _schedule(todo: list[Video], actors: list[Any], cfg: dict[str, Any], progress: Any, bar: tqdm):
    queue = list(reversed(todo))
    attempts: dict[str, int] = {}
    running: dict[Any, tuple[Video, Any]] = {}
    recovering: dict[Any, Any] = {}  # health-check ref -> an actor Ray is restarting after a crash
    idle = list(actors)
    while queue or running:
        while queue and idle:
            video, actor = queue.pop(), idle.pop()
            attempts[video.video_id] = attempts.get(video.video_id, 0) + 1
            running[actor.process.remote(video, attempts[video.video_id])] = (video, actor)
        ready, _ = ray.wait([*running, *recovering], num_returns=1, timeout=1.0)
        for ref in ready:
            if ref in recovering:
                actor = recovering.pop(ref)
                try:
                    ray.get(ref)
                    idle.append(actor)
                except RayActorError:
                    time.sleep(0.2)
                    recovering[actor.device.remote()] = actor
                continue
            video, actor = running.pop(ref)
            try:
                row = ray.get(ref)
            except RayTaskError as exc:
                if isinstance(exc.cause, OutputWriteError):
                    raise OutputWriteError(str(exc.cause)) from None
                idle.append(actor)  # a bug outside process_video's own handling: record it, go on
                yield _failed_row(video, attempts[video.video_id], f"internal error: {_root_cause(exc)}",
                                  cfg["output_dir"])
                continue
            except RayActorError as exc:
                recovering[actor.device.remote()] = actor  # Ray restarts it (max_restarts=-1)
                tries = attempts[video.video_id]
                if tries < cfg["ray"]["max_video_attempts"]:
                    log.warning("worker died on %s (attempt %d), retrying: %s", video.relative_path, tries,
                                first_line(exc))
                    queue.append(video)
                else:
                    reason = (f"the worker process died on this video {tries} times (killed, out of memory or "
                              f"crashed in the decoder); last: {first_line(exc)}")
                    yield _failed_row(video, tries, reason, cfg["output_dir"])
                continue
            idle.append(actor)
            yield row
        if not running and not idle and queue and not recovering:
            raise WorkersCannotStartError("every Ray worker died and none could be restarted")
        done, expected = ray.get(progress.read.remote())
        bar.total = max(expected, done)
        bar.update(done - bar.n)


def _root_cause(exc: BaseException) -> str:
    """The line of a Ray error that names the real exception, e.g. `WeightsError: ...`."""
    causes = [line.strip() for line in str(exc).splitlines()
              if re.match(r"^\s*[\w.]*(Error|Exception): ", line) and "ray.exceptions" not in line]
    return causes[-1] if causes else first_line(exc)


def _failed_row(video: Video, tries: int, reason: str, output_dir: Path) -> dict[str, Any]:
    row = {
        "video_id": video.video_id, "path": video.relative_path, "status": "failed", "error": reason,
        "frame_count": None, "frames_processed": 0, "detections": 0, "attempts": tries, "seconds": None,
        "retryable": True,
    }
    write.write_status(output_dir, row)
    return row


def _manifest(cfg: dict[str, Any], started_at: datetime, summary: RunSummary) -> dict[str, Any]:
    return {
        "job_version": __version__,
        "config": cfg,
        "settings": detection_settings(cfg),
        "started_at": started_at.isoformat(),
        "finished_at": datetime.now(timezone.utc).isoformat(),
        "versions": {"python": platform.python_version(),
                     **{lib: version(lib) for lib in ("torch", "torchvision", "decord", "av", "ray", "polars")}},
        "totals": {k: v for k, v in summary.__dict__.items() if k != "rows"},
        # Jobs of one sweep share a Ray runtime: the same job id here.
        "ray_job_id": ray.get_runtime_context().get_job_id() if ray.is_initialized() else None,
    }


