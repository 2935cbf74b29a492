"""What a run has to do: the videos, which of them earlier runs finished, how many actors. No Ray here."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import threading
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Any

from job import track
from job.balance import MIN_SEGMENT_FRAMES
from job.config import Device, JobConfig, ModelConfig, RayConfig, given_classes, is_weights_path
from job.discover import Video, discover_videos
from job.errors import ConfigError, OutputNotOursError, WeightsError
from job.layout import partition
from job.lease import Lease
from job.output import OutputDir
from job.status import VideoStatus
from job.storage import file_identity, fingerprint, is_uri

log = logging.getLogger(__name__)


@dataclass
class Plan:
    settings: JobConfig  # the run's settings, the model's classes resolved once the actors load it
    videos: list[Video]  # every discovered file, in discovery order
    todo: list[Video]  # those without a final status from an earlier run
    finished: dict[str, VideoStatus]  # video_id -> an earlier run's final status
    missing: list[VideoStatus]  # videos this output_dir holds whose files are gone (none with prune=true)
    detection_settings: dict[str, Any]  # what _state/settings.json holds for this output_dir
    lease: Lease  # held from planning to the end of the run: release() it
    to_prune: list[str] = field(default_factory=list)  # with prune=true: gone videos whose results to remove

    def record_settings(self, output: OutputDir, model: ModelConfig | None = None) -> None:
        """Record the settings once the actors have loaded the model (`model`: its classes resolved), or
        at once when there is nothing to detect: a start that fails on a bad checkpoint or class list
        leaves output_dir as it was. The driver never imports torch."""
        if model is not None:
            self.settings = dataclasses.replace(self.settings, model=model)
        output.ensure_settings(self.detection_settings)


def make_plan(cfg: JobConfig, output: OutputDir) -> Plan:
    """Discover the videos, check output_dir, take its lease, check the settings against it, split done
    from to-do. Settings are recorded later (`Plan.record_settings`)."""
    track.check(cfg.tracker)
    videos = discover_videos(cfg.video_dir)
    foreign = output.foreign_entries()
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OutputNotOursError(
            f"output_dir={cfg.output_dir} already holds files this job did not write ({shown}); pass a new or "
            f"empty directory (or one this job wrote, to resume it)"
        )
    output.store.check_writable()
    lease = Lease(output.store).acquire()
    try:
        return _plan_under_lease(cfg, output, videos, lease)
    except BaseException:
        lease.release()
        raise


def _plan_under_lease(cfg: JobConfig, output: OutputDir, videos: list[Video], lease: Lease) -> Plan:
    output.clear_staging()  # temp files of killed writes: no other run can be writing now
    log.info("found %d videos under %s", len(videos), cfg.video_dir)
    finished: dict[str, VideoStatus] = {}
    todo: list[Video] = []
    recorded = output.statuses.read_many([video.video_id for video in videos])
    for video in videos:
        previous = recorded.get(video.video_id)
        if previous is not None and not previous.retryable and not _changed(video, previous):
            finished[video.video_id] = previous
        else:
            todo.append(video)
    gone = sorted(output.recorded_video_ids() - {v.video_id for v in videos})
    missing = [] if cfg.prune else [output.missing_status(video_id) for video_id in gone]
    if missing:
        log.warning("%d videos with results here are no longer in video_dir: kept as status=missing "
                    "(prune=true removes them)", len(missing))
    todo.sort(key=_size, reverse=True)  # longest first (by size), so a batch does not end on one long video
    settings = detection_settings(cfg)
    output.check_settings(settings)  # a mismatch stops the run before Ray starts
    return Plan(cfg, videos, todo, finished, missing, settings, lease, gone if cfg.prune else [])


@dataclass
class WorkEstimate:
    """What the containers' headers say of the work ahead, before any worker opens a video."""

    frames: int  # frames to detect, for the progress bar's total up front
    units: int  # videos plus the extra segments long ones will be cut into: how many actors can be busy
    frames_by_video: dict[str, int] = field(default_factory=dict)  # video_id -> the container's frame count
    pixels_by_video: dict[str, int] = field(default_factory=dict)  # video_id -> width x height of its frames


def estimate_work(videos: list[Video], frame_stride: int, segment_frames: int | None,
                  output: OutputDir) -> WorkEstimate:
    """Frames and units of work, from container headers (no decoding, no torch).

    Only local videos not started before count their frames (a resumed one's remainder is reported by
    its worker) and only those whose container records a frame count; the rest join the bar's total as
    workers open them, and count as one unit each.
    """
    estimate = WorkEstimate(0, len(videos))
    for video in videos:
        _count_header(estimate, video, frame_stride, segment_frames, output)
    return estimate


class HeaderRead:
    """`estimate_work` in a thread, so that it runs while Ray and the actors start rather than before
    (serial, about 0.5 ms a local video: seconds at tens of thousands). Its `estimate` grows meanwhile:
    the progress bar's total follows it, and the tail sizer leaves a video it has no count for whole."""

    def __init__(self, videos: list[Video], frame_stride: int, segment_frames: int | None,
                 output: OutputDir) -> None:
        self.estimate = WorkEstimate(0, len(videos))
        self._thread = threading.Thread(target=self._read, args=(videos, frame_stride, segment_frames, output),
                                        name="job-header-read", daemon=True)
        self._thread.start()

    def _read(self, videos: list[Video], frame_stride: int, segment_frames: int | None, output: OutputDir) -> None:
        for video in videos:  # in hand-out order: the sizer has the next videos' counts first
            _count_header(self.estimate, video, frame_stride, segment_frames, output)

    def units(self, enough: int) -> int:
        """Units of work, waiting for every header only while fewer than `enough` (the most actors the
        cluster could run) are known: each video is one at least, so a long list never waits."""
        if self.estimate.units < enough:
            self._thread.join()
        return self.estimate.units


def _count_header(estimate: WorkEstimate, video: Video, frame_stride: int, segment_frames: int | None,
                  output: OutputDir) -> None:
    import av

    if is_uri(video.path) or output.store.names(partition(video.video_id)):
        return
    try:
        with av.open(video.path, metadata_errors="replace") as container:  # as decode.METADATA_ERRORS
            stream = container.streams.video[0] if container.streams.video else None
            count = stream.frames if stream else 0
            pixels = stream.codec_context.width * stream.codec_context.height if stream else 0
    except Exception:  # noqa: BLE001 - a bad file is the worker's to report
        return
    if pixels:
        estimate.pixels_by_video[video.video_id] = pixels
    if count:
        estimate.frames_by_video[video.video_id] = count
    if segment_frames:  # the pieces the pool may cut it into (`TailSizer`): the last videos are cut short
        estimate.units += max(0, count // min(segment_frames, MIN_SEGMENT_FRAMES) - 1)
    estimate.frames += math.ceil(count / frame_stride)


def _size(video: Video) -> int:
    """Bytes of a local video (0 for URIs and unreadable files: they go last)."""
    if is_uri(video.path):
        return 0
    try:
        return os.path.getsize(video.path)
    except OSError:
        return 0


def _changed(video: Video, previous: VideoStatus) -> bool:
    """Whether the file's content differs from what its final status was made from: no bytes read while
    `stat` says the local file is the one it was (or the listing gave the object's fingerprint). Where
    only `stat` changed (a `cp -p`, a touch), `previous` takes the new identity for the status index."""
    identity = file_identity(video.path)
    if previous.file_identity is not None and identity == previous.file_identity:
        return False
    try:
        now = video.fingerprint or fingerprint(video.path)
    except OSError:
        now = None
    if now != previous.fingerprint:
        log.info("%s changed since it was processed: processing it again", video.relative_path)
        return True
    previous.file_identity = identity
    return False


def detection_settings(cfg: JobConfig) -> dict[str, Any]:
    """Everything the detections depend on; a rerun must match it to add to the same output."""
    model = cfg.model
    return {
        "model": model._target_ or model.name,
        "weights": weights_identity(model.name, model.weights, model._target_),
        "classes": given_classes(model),  # the checkpoint's own names are covered by its sha256
        "num_classes": model.num_classes,
        "builder_args": dict(sorted(model.builder_args.items())),
        "precision": model.precision.value,
        "score_threshold": float(cfg.score_threshold),
        "frame_stride": int(cfg.frame_stride),
    }


def weights_identity(name: str, weights: str, plugin: str | None = None) -> str:
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
    if plugin:
        return f"plug-in {plugin}: {weights}"
    return f"torchvision {version('torchvision')}: {name} {weights}"


@dataclass(frozen=True)
class ActorLayout:
    count: int
    cpus_each: float
    gpus_each: float
    streams: int = 1  # tasks each actor decodes at once, all feeding its one model

    @property
    def decode_threads(self) -> int:
        """PyAV threads per stream: the actor's CPUs shared among its streams."""
        return max(1, int(self.cpus_each + 1e-9) // self.streams)


def actor_layout(ray_cfg: RayConfig, device: Device, resources: dict[str, float], units: int,
                 nodes: list[dict[str, float]] | None = None) -> ActorLayout:
    """How many actors, the CPUs and GPUs each asks Ray for, and the streams each decodes at once, given
    the cluster's declared resources (`nodes`: each node's, where known) and the units of work ahead (no
    idle actors for a short list).

    On GPUs: one actor per `gpus_per_actor` share; by default each takes an equal share of its node's CPUs
    (those of the node with the fewest per GPU actor, so that every actor fits wherever it lands) and
    decodes one stream per CPU, because a GPU actor's model costs the CPU next to nothing and decoding is
    what it waits on (benchmarks/gpu.md). On CPUs only, by default one actor per CPU (faster than fewer
    actors with more threads: benchmarks/long_video.md; and the model runs on one thread whatever the
    layout, so that results do not depend on it: `detect.CPU_INFERENCE_THREADS`), or fewer actors sharing
    every CPU (for decoding) when there are fewer units of work.
    """
    gpus = resources.get("GPU", 0.0) if device != Device.cpu else 0.0
    cpus = resources.get("CPU", 1.0)
    if device == Device.cuda and not gpus:
        raise ConfigError("device=cuda but the Ray cluster has no GPUs; use device=auto or device=cpu")
    gpus_each = min(ray_cfg.gpus_per_actor, gpus) if gpus else 0.0
    if gpus:
        cpus_each = ray_cfg.cpus_per_actor or _gpu_node_cpu_share(nodes or [resources], gpus_each)
        cpus_each = min(cpus_each, cpus)
        count = ray_cfg.num_actors or max(1, math.floor(gpus / gpus_each + 1e-9))
    elif ray_cfg.cpus_per_actor is None:
        count = ray_cfg.num_actors or max(1, min(math.floor(cpus + 1e-9), units))
        cpus_each = cpus / count
    else:
        cpus_each = min(ray_cfg.cpus_per_actor, cpus)
        count = ray_cfg.num_actors or max(1, math.floor(cpus / cpus_each + 1e-9))
    if count * cpus_each > cpus:  # never ask for actors the cluster cannot place: they would wait forever
        cpus_each = cpus / count
    if gpus_each and count * gpus_each > gpus + 1e-9:
        raise ConfigError(
            f"ray.num_actors={count} x ray.gpus_per_actor={gpus_each} needs more than the cluster's {gpus:g} GPUs"
        )
    streams = ray_cfg.decode_streams or (max(1, int(cpus_each + 1e-9)) if gpus else 1)
    return ActorLayout(min(count, max(units, 1)), cpus_each, gpus_each, streams)


def _gpu_node_cpu_share(nodes: list[dict[str, float]], gpus_each: float) -> float:
    """The CPUs each GPU actor may take so that the actors of the node with the fewest CPUs per actor fit,
    rounded down to Ray's resource precision."""
    shares = [node.get("CPU", 0.0) / math.floor(node["GPU"] / gpus_each + 1e-9)
              for node in nodes if node.get("GPU", 0.0) + 1e-9 >= gpus_each]
    share = min(shares, default=1.0)
    return max(1.0, math.floor(share * 100) / 100) if share >= 1 else share
