"""Typed settings: the Hydra schemas, checked once, then passed as these dataclasses down to the actors.

Registering the schemas in Hydra's ConfigStore makes a misspelt key or a wrong type fail when the
config is composed, before Ray starts or a model loads. `load` turns the composed config into a
`JobConfig` and checks what types cannot express; `for_device` resolves the `null` defaults once,
where the device is known (in the actor). Nothing past this module reads string keys.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import tempfile
import typing
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from job.errors import ConfigError
from job.storage import is_uri


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Precision(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


class Decoder(str, Enum):
    decord = "decord"
    nvdec = "nvdec"  # NVIDIA's hardware decoder (the `nvdec` extra); frames stay on the GPU
    pyav = "pyav"


@dataclass
class ModelConfig:
    # A torchvision detection builder; configs/model/ has a preset for each one that returns boxes.
    name: str = "ssdlite320_mobilenet_v3_large"
    # DEFAULT (torchvision's pretrained weights, downloaded once), a weights enum member name such
    # as COCO_V1, or the path of a checkpoint: a state_dict, torchvision's reference-script
    # checkpoint ({"model": ..., "args": ...}), or either with a "classes" list of names.
    weights: str = "DEFAULT"
    # Names of labels 1..N: a list, or the path of a text file with one name per line (a list of
    # N+1 starting with the background is accepted too). null: the checkpoint's own "classes",
    # COCO's for a 91-class head, else class_<id>.
    classes: Any = None
    # The head's class count as torchvision counts it (background included). null: read from the
    # checkpoint's head.
    num_classes: Optional[int] = None  # noqa: UP045 (Hydra's schemas need typing.Optional on 3.10)
    # Keyword arguments for the builder a fine-tuned model was trained with, e.g.
    # {min_size: 640, box_detections_per_img: 300}.
    builder_args: dict[str, Any] = field(default_factory=dict)
    # A plug-in detector instead of a torchvision builder: the dotted path of a callable
    # `build(weights, **builder_args) -> (module, class_names)` (README: "Your own detector").
    _target_: Optional[str] = None  # noqa: UP045
    precision: Precision = Precision.fp32
    # torch.compile the backbone and head (what runs on fixed-size batches) when the actor starts.
    # For GPU boxes; on this 2-core CPU it costs ~40 s of start-up and runs no faster.
    compile: bool = False


@dataclass
class RayConfig:
    # null: RAY_ADDRESS if set (as under `ray job submit`), else an embedded local Ray.
    # "auto": join the cluster this machine belongs to.
    address: str | None = None
    # null: one actor per GPU share when the cluster has GPUs, else one per cpus_per_actor CPUs.
    num_actors: int | None = None
    # null: a GPU node's CPUs shared among its GPU actors (they decode); on CPUs only, one actor per
    # CPU (fewer, sharing every CPU, when there are fewer videos and segments than CPUs).
    cpus_per_actor: Optional[float] = None  # noqa: UP045
    gpus_per_actor: float = 1.0
    # Videos or segments an actor decodes at once, each in a thread of its own, all feeding its one
    # model. null: one per CPU of a GPU actor (benchmarks/gpu.md); 1 on CPUs only, where each CPU
    # has an actor of its own already.
    decode_streams: Optional[int] = None  # noqa: UP045
    # CPUs for an embedded local Ray (null: all of this machine's).
    num_cpus: int | None = None
    # How many actor deaths one video may cause before it is recorded as failed.
    max_video_attempts: int = 3
    # A video longer than this many frames is cut into segments of about this many (fewer when the
    # videos are few for the actors), which any actor can take (results identical to one actor's).
    # About a minute at 30 fps; null: never split.
    segment_frames: Optional[int] = 1800  # noqa: UP045
    # A worker that reports no progress on a video for this long (per frame batch; fetching a remote
    # video counts too) is killed and the video retried like a crash. null: never.
    stall_timeout_s: Optional[float] = 300.0  # noqa: UP045


@dataclass
class OutputConfig:
    # Frames decoded per committed Parquet part; a crash loses at most this much work.
    commit_every_frames: int = 512
    compression: str = "zstd"


TRACKERS = ("bytetrack", "sort", "ocsort")


@dataclass
class TrackerConfig:
    # null: no tracking. bytetrack | sort | ocsort: the `trackers` library's tracker of that name,
    # run over each finished video's detections (the `track` extra: pip install -e ".[track]").
    name: Optional[str] = None  # noqa: UP045
    # The tracker's own keyword arguments (e.g. {lost_track_buffer: 60}); unset ones keep the
    # library's defaults. frame_rate is always the video's.
    params: dict[str, Any] = field(default_factory=dict)


class Anchor(str, Enum):
    """The point of a box that must cross a line or be inside a zone."""

    center = "center"
    bottom_center = "bottom_center"
    top_center = "top_center"
    center_left = "center_left"
    center_right = "center_right"
    top_left = "top_left"
    top_right = "top_right"
    bottom_left = "bottom_left"
    bottom_right = "bottom_right"


@dataclass
class LineConfig:
    """A counting line from `start` to `end`, in fractions of the displayed frame's width and height.

    Crossing it from its left to its right, walking from start to end in image coordinates (y down), is `in`.
    """

    name: str = MISSING
    start: list[float] = MISSING  # [x, y]
    end: list[float] = MISSING  # [x, y]
    classes: Optional[list[str]] = None  # noqa: UP045  (null: every class)
    anchor: Anchor = Anchor.bottom_center
    # Observations on the other side, in a row, before a crossing counts (against flicker on the line).
    min_frames: int = 1
    videos: Optional[str] = None  # noqa: UP045  (a glob on the video's path, e.g. "cam1/*"; null: all)


@dataclass
class ZoneConfig:
    """A zone: a polygon in fractions of the displayed frame's width and height."""

    name: str = MISSING
    polygon: list[list[float]] = MISSING  # [[x, y], ...], at least 3 points
    classes: Optional[list[str]] = None  # noqa: UP045
    anchor: Anchor = Anchor.bottom_center
    # Observations inside (to enter) or outside (to leave), in a row, before a visit starts or ends.
    min_frames: int = 1
    videos: Optional[str] = None  # noqa: UP045


@dataclass
class AnalyticsConfig:
    """Lines and zones counted from each video's tracks (a tracker is required)."""

    lines: list[LineConfig] = field(default_factory=list)
    zones: list[ZoneConfig] = field(default_factory=list)


@dataclass
class EvaluationConfig:
    """Ground truth to evaluate a run's detections and tracks against (job.evaluate)."""

    # A MOTChallenge directory (<video>/gt/gt.txt) or a COCO JSON file with videos and images; null: none.
    ground_truth: Optional[str] = None  # noqa: UP045
    # The ground truth's class names as the run's: {pedestrian: person} (null: as they are). Typed Any:
    # Hydra cannot override an empty typed dict, nor a null Optional one, with a dict from the command line.
    classes: Any = None
    # Ground-truth classes whose boxes neither count as misses nor make detections false positives.
    ignore_classes: list[str] = field(default_factory=list)
    # A detection matches a true box with at least this IoU (precision, recall, F1, CLEAR, IDF1).
    iou: float = 0.5


@dataclass
class EvaluateConfig(EvaluationConfig):
    """`python -m job.evaluate output_dir=OUT ground_truth=PATH`."""

    output_dir: str = MISSING


@dataclass
class JobConfig:
    video_dir: str = MISSING
    output_dir: str = MISSING
    device: Device = Device.auto
    # Frames per model call. null: 4 on CPU, where larger batches buy no speed and push ssdlite's
    # largest activation past glibc's 32 MB mmap ceiling (page-faulted in afresh on every call:
    # benchmarks/micro.md); 16 on a GPU, to keep it busy.
    batch_size: int | None = None
    score_threshold: float = 0.5
    frame_stride: int = 1
    decoder: Decoder = Decoder.pyav
    # Batches a background thread decodes ahead of the model (bounds memory per actor). 0 decodes
    # inline, between model calls. null: 2 on a GPU, whose waits the decoder fills; 0 on CPU, where
    # torch's threads already use every core the actor has and a decode thread would stall them.
    prefetch_batches: int | None = None
    # Decode ahead (prefetch_batches > 0) in a child process per decode stream instead of a thread, so the
    # model loop's Python and the decoders do not take turns on one GIL (two decode threads of small videos
    # ran no faster than one). On by default: ahead of threads on the 2-core stand-in node (benchmarks/gpu.md);
    # not yet measured on a GPU box. false: a thread of the actor per stream, as before.
    # decoder=nvdec always decodes in the model's process (its frames are on the GPU).
    decode_processes: bool = True
    # Decoders hand over the stream's YUV planes and the model's device converts them to RGB (`colour`):
    # converting is most of PyAV's CPU per frame beyond decoding, and the planes are half the bytes to copy.
    # Frames are swscale's within 2 levels. null: on a GPU; on the CPU, swscale converts faster than torch.
    colour_on_device: Optional[bool] = None  # noqa: UP045
    # Remove the detections and rows of videos whose files are gone from video_dir (else kept as `missing`).
    prune: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    analytics: AnalyticsConfig = field(default_factory=AnalyticsConfig)
    # evaluate.ground_truth=PATH: evaluate against it at the end of the run (evaluation/).
    evaluate: EvaluationConfig = field(default_factory=EvaluationConfig)
    # Make the results report (python -m job.report) at the end of the run: it decodes and encodes again.
    report: bool = False


@dataclass
class ReportConfig:
    """`python -m job.report output_dir=OUT`: pictures of a run's results, under OUT/report/."""

    output_dir: str = MISSING
    # Where the videos are: null takes the run's video_dir from its manifest.json.
    video_dir: Optional[str] = None  # noqa: UP045
    # How much of each video preview.mp4 covers, from its first frame; null: all of it.
    preview_seconds: Optional[float] = 10.0  # noqa: UP045
    # Draw (and count in the timeline and sheet) only boxes scoring at least this.
    min_score: float = 0.0
    # Only videos whose path (relative to video_dir) matches this glob, e.g. "cam1/*.mp4".
    videos: Optional[str] = None  # noqa: UP045
    # Only these class names, e.g. [person,car].
    classes: Optional[list[str]] = None  # noqa: UP045
    # Annotated frames on each video's contact sheet (those with the most detections).
    sheet_frames: int = 6


def given_classes(model: ModelConfig) -> list[str] | None:
    """model.classes as a list: inline, or read from the text file it names (one name per line)."""
    if model.classes is None:
        return None
    if isinstance(model.classes, str):
        try:
            with open(model.classes, encoding="utf-8") as handle:
                return [line.strip() for line in handle if line.strip()]
        except OSError as exc:
            raise ConfigError(
                f"model.classes={model.classes}: cannot read it ({exc.strerror or exc}); pass a text file "
                f"with one class name per line, or a list such as model.classes=[forklift,pallet]"
            ) from None
    return [str(name) for name in model.classes]


def is_weights_path(weights: str) -> bool:
    """model.weights names a local state_dict file (else a torchvision weights enum member)."""
    return os.sep in weights or weights.endswith((".pth", ".pt")) or os.path.exists(weights)


def log_dir(output_dir: str | None) -> str:
    """Where Hydra keeps a run's log: inside output_dir, or under ./outputs when that is a URI.

    Without an output_dir (the run stops at once) the log goes to the temp dir, not into the user's cwd.
    """
    if not output_dir:
        return os.path.join(tempfile.gettempdir(), "job-logs")
    output_dir = os.path.expanduser(output_dir)
    if is_uri(output_dir):
        return "outputs/" + output_dir.replace("://", "/").strip("/")
    return f"{output_dir.removeprefix('file://')}/.hydra_logs"


def register_configs() -> None:
    if not OmegaConf.has_resolver("job_log_dir"):
        OmegaConf.register_new_resolver("job_log_dir", log_dir)
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=JobConfig)
    cs.store(group="model", name="base_model", node=ModelConfig)
    cs.store(group="ray", name="base_ray", node=RayConfig)
    cs.store(group="output", name="base_output", node=OutputConfig)
    cs.store(group="tracker", name="base_tracker", node=TrackerConfig)
    cs.store(group="analytics", name="base_analytics", node=AnalyticsConfig)
    cs.store(name="base_report", node=ReportConfig)
    cs.store(name="base_evaluate", node=EvaluateConfig)


def load(cfg: DictConfig) -> JobConfig:
    """The composed config as typed settings, checked; raises ConfigError naming the key to fix."""
    unknown = unknown_keys(cfg, JobConfig)
    if unknown:  # Hydra's `+key=value` adds keys the schema does not have; they would be ignored
        raise ConfigError(f"unknown setting {', '.join(unknown)}: check its spelling (python -m job --help lists "
                          f"the settings)")
    missing = [key for key in ("video_dir", "output_dir") if OmegaConf.is_missing(cfg, key)]
    if missing:
        raise ConfigError(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} required: "
                          f"python -m job video_dir=/path/to/videos output_dir=/path/to/output")
    settings = OmegaConf.to_object(cfg)
    assert isinstance(settings, JobConfig), type(settings)
    settings.video_dir = _local_path(settings.video_dir)
    settings.output_dir = _local_path(settings.output_dir)
    validate(settings)
    return settings


def load_report(cfg: DictConfig) -> ReportConfig:
    """`python -m job.report`'s composed config as typed settings, checked."""
    unknown = unknown_keys(cfg, ReportConfig)
    if unknown:
        raise ConfigError(f"unknown setting {', '.join(unknown)}: python -m job.report --help lists the settings")
    if OmegaConf.is_missing(cfg, "output_dir"):
        raise ConfigError("output_dir is required: python -m job.report output_dir=/path/to/a/run/output")
    settings = OmegaConf.to_object(cfg)
    assert isinstance(settings, ReportConfig), type(settings)
    settings.output_dir = _local_path(settings.output_dir)
    settings.video_dir = _local_path(settings.video_dir) if settings.video_dir else None
    if settings.preview_seconds is not None and settings.preview_seconds <= 0:
        raise ConfigError(f"preview_seconds must be > 0 or null (the whole video), got {settings.preview_seconds}")
    if settings.sheet_frames < 1:
        raise ConfigError(f"sheet_frames must be >= 1, got {settings.sheet_frames}")
    return settings


def load_evaluate(cfg: DictConfig) -> EvaluateConfig:
    """`python -m job.evaluate`'s composed config as typed settings, checked."""
    unknown = unknown_keys(cfg, EvaluateConfig)
    if unknown:
        raise ConfigError(f"unknown setting {', '.join(unknown)}: python -m job.evaluate --help lists the settings")
    missing = [key for key in ("output_dir",) if OmegaConf.is_missing(cfg, key)]
    if missing or not cfg.get("ground_truth"):
        raise ConfigError("output_dir and ground_truth are required: python -m job.evaluate "
                          "output_dir=/path/to/a/run/output ground_truth=/path/to/annotations")
    settings = OmegaConf.to_object(cfg)
    assert isinstance(settings, EvaluateConfig), type(settings)
    settings.output_dir = _local_path(settings.output_dir)
    settings.ground_truth = _local_path(settings.ground_truth)
    if not 0.0 < settings.iou <= 1.0:
        raise ConfigError(f"iou must be within (0, 1], got {settings.iou}")
    problems = _class_map_problems(settings)
    if problems:
        raise ConfigError(problems[0])
    return settings


def _local_path(location: str) -> str:
    """`~` expanded and made absolute (the manifest records where things were); URIs as given."""
    if is_uri(location):
        return location
    return os.path.abspath(os.path.expanduser(location.removeprefix("file://")))


def unknown_keys(node: DictConfig, schema: type, prefix: str = "") -> list[str]:
    """Keys in `node` that the dataclass `schema` does not define (free-form dicts such as builder_args excepted)."""
    hints = typing.get_type_hints(schema)
    unknown = []
    for key in node.keys():
        if key not in hints:
            unknown.append(f"{prefix}{key}")
        elif dataclasses.is_dataclass(hints[key]):
            unknown += unknown_keys(node[key], hints[key], f"{prefix}{key}.")
    return unknown


def validate(cfg: JobConfig) -> None:
    """Checks that types alone cannot express; raises ConfigError naming the key to fix."""
    problems = []
    if cfg.batch_size is not None and cfg.batch_size < 1:
        problems.append(f"batch_size must be >= 1, got {cfg.batch_size}")
    if cfg.frame_stride < 1:
        problems.append(f"frame_stride must be >= 1, got {cfg.frame_stride}")
    if not 0.0 <= cfg.score_threshold <= 1.0:
        problems.append(f"score_threshold must be within [0, 1], got {cfg.score_threshold}")
    if cfg.prefetch_batches is not None and cfg.prefetch_batches < 0:
        problems.append(f"prefetch_batches must be >= 0 or null, got {cfg.prefetch_batches}")
    if cfg.output.commit_every_frames < 1:
        problems.append("output.commit_every_frames must be >= 1")
    if cfg.ray.num_actors is not None and cfg.ray.num_actors < 1:
        problems.append(f"ray.num_actors must be >= 1 or null, got {cfg.ray.num_actors}")
    if cfg.ray.cpus_per_actor is not None and cfg.ray.cpus_per_actor <= 0:
        problems.append("ray.cpus_per_actor must be > 0")
    if cfg.ray.decode_streams is not None and cfg.ray.decode_streams < 1:
        problems.append("ray.decode_streams must be >= 1")
    if not 0 < cfg.ray.gpus_per_actor:
        problems.append("ray.gpus_per_actor must be > 0 (fractions such as 0.5 share a GPU)")
    if cfg.ray.stall_timeout_s is not None and cfg.ray.stall_timeout_s <= 0:
        problems.append("ray.stall_timeout_s must be > 0 or null")
    if cfg.ray.segment_frames is not None and cfg.ray.segment_frames < 1:
        problems.append(f"ray.segment_frames must be >= 1 or null, got {cfg.ray.segment_frames}")
    if cfg.ray.max_video_attempts < 1:
        problems.append("ray.max_video_attempts must be >= 1")
    if cfg.tracker.name is not None and cfg.tracker.name not in TRACKERS:
        problems.append(f"tracker must be one of {', '.join(TRACKERS)} or null, got {cfg.tracker.name}")
    if cfg.decoder is Decoder.nvdec and cfg.device is Device.cpu:
        problems.append("decoder=nvdec decodes on an NVIDIA GPU; use device=auto or device=cuda (or decoder=pyav)")
    elif cfg.decoder is Decoder.nvdec and importlib.util.find_spec("PyNvVideoCodec") is None:
        problems.append("decoder=nvdec needs NVIDIA's PyNvVideoCodec: pip install 'job[nvdec]' (or use decoder=pyav)")
    problems += _analytics_problems(cfg)
    problems += _class_map_problems(cfg.evaluate, "evaluate.")
    truth = cfg.evaluate.ground_truth
    if truth is not None and not is_uri(truth) and not os.path.exists(os.path.expanduser(truth)):
        problems.append(f"evaluate.ground_truth={truth} does not exist; pass a MOTChallenge directory or a COCO "
                        f"JSON file")
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))


def _class_map_problems(settings: EvaluationConfig, prefix: str = "") -> list[str]:
    classes = settings.classes
    if classes is None or (isinstance(classes, dict) and all(isinstance(k, str) and isinstance(v, str)
                                                              for k, v in classes.items())):
        return []
    return [f"{prefix}classes must map ground-truth class names to the run's, e.g. '{{pedestrian: person}}', "
            f"got {classes!r}"]


def _analytics_problems(cfg: JobConfig) -> list[str]:
    lines, zones = cfg.analytics.lines, cfg.analytics.zones
    if not lines and not zones:
        return []
    if cfg.tracker.name is None:
        return ["analytics counts tracks: add tracker=bytetrack (or sort, ocsort)"]
    problems = []
    names = [item.name for item in [*lines, *zones]]
    if len(set(names)) != len(names):
        problems.append(f"analytics: every line and zone needs its own name, got {', '.join(names)}")

    def fractions(points: list[list[float]]) -> bool:
        return all(len(p) == 2 and all(0.0 <= v <= 1.0 for v in p) for p in points)

    for line in lines:
        if not fractions([line.start, line.end]) or line.start == line.end:
            problems.append(f"analytics line {line.name}: start and end must be two different [x, y] points in "
                            f"fractions of the frame (0..1), got {line.start} and {line.end}")
    for zone in zones:
        if len(zone.polygon) < 3 or not fractions(zone.polygon):
            problems.append(f"analytics zone {zone.name}: polygon must be at least 3 [x, y] points in fractions "
                            f"of the frame (0..1), got {zone.polygon}")
    for item in [*lines, *zones]:
        if item.min_frames < 1:
            problems.append(f"analytics {item.name}: min_frames must be >= 1, got {item.min_frames}")
    return problems


def decodes_in_child_processes(cfg: JobConfig) -> bool:
    """Whether decoding ahead runs in child processes (`decode_processes`): only when decoding ahead,
    and never for NVDEC, whose frames are on the model's GPU."""
    return cfg.decode_processes and cfg.prefetch_batches > 0 and cfg.decoder is not Decoder.nvdec


def for_device(cfg: JobConfig, device_type: str) -> JobConfig:
    """A copy with the `null` defaults resolved for the device ("cpu" or "cuda") that will run the model."""
    gpu = device_type == "cuda"
    return dataclasses.replace(
        cfg,
        batch_size=cfg.batch_size if cfg.batch_size is not None else (16 if gpu else 4),
        prefetch_batches=cfg.prefetch_batches if cfg.prefetch_batches is not None else (2 if gpu else 0),
        colour_on_device=cfg.colour_on_device if cfg.colour_on_device is not None else gpu,
    )


def to_plain(cfg: JobConfig) -> dict[str, Any]:
    """JSON-ready nested dicts (enums as their names), for the manifest."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)
