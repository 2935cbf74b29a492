"""Batched inference: a detector built once (`models.build`), run on uint8 frame batches."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision.models.detection.ssd import SSD

from job.colour import Yuv420, planes_to_rgb
from job.config import ModelConfig
from job.detect_fast import (
    batches_the_transform,
    enable_batched_transform,
    enable_fast_ssd,
    prepare_batch,
    prepare_rcnn_batch,
)
from job.errors import ConfigError
from job.models import build, resolve

log = logging.getLogger(__name__)

# Inference on CPU runs on one intra-op thread, whatever CPUs the actor has: torch splits a convolution's
# sums among its threads, so another thread count adds in another order and moves boxes (a box near the
# threshold can appear or vanish). With it fixed, a video's detections are the same bytes under any
# layout, batch size, split or resume; parallelism comes from actors and segments (benchmarks/determinism.md).
CPU_INFERENCE_THREADS = 1


def make_inference_repeatable(device: torch.device, cpus: int) -> None:
    """Settings that make this process's detections repeatable, for its device (`cpus`: what it was given).

    CPU: a fixed intra-op thread count. CUDA: cuDNN's deterministic kernels and no autotuning (which
    picks kernels by timing, so differently from run to run); the host threads then only feed the GPU.
    """
    if device.type == "cpu":
        torch.set_num_threads(CPU_INFERENCE_THREADS)
    else:
        torch.set_num_threads(max(1, cpus))
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


@dataclass
class Detections:
    """One frame's detections, on the CPU, in displayed-frame pixels clipped to the frame."""

    boxes: torch.Tensor  # float32 (N, 4) x1 y1 x2 y2
    scores: torch.Tensor  # float32 (N,)
    labels: torch.Tensor  # int64 (N,)


@dataclass
class _BatchOutputs:
    """A batch's detections on the CPU, all frames' in one tensor each, before thresholding."""

    counts: list[int]  # each frame's candidates, in order
    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor


def _gather(outputs: list[dict[str, torch.Tensor]], width: int, height: int,
            scale: torch.Tensor | None) -> _BatchOutputs:
    """A batch's outputs scaled and clipped over the whole batch at once and copied to the CPU in three
    transfers (on a GPU one wait each; per frame it was three a frame)."""
    counts = [len(out["scores"]) for out in outputs]
    boxes = torch.cat([out["boxes"].reshape(-1, 4) for out in outputs]).float()
    scores = torch.cat([out["scores"] for out in outputs])
    labels = torch.cat([out["labels"] for out in outputs])
    if scale is not None:  # boxes came back in the resized frame; scaled as torchvision would
        boxes = boxes * scale
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    return _BatchOutputs(counts, boxes.cpu(), scores.cpu(), labels.cpu())


@dataclass
class BatchDetections:
    """A batch's kept detections, on the CPU, all frames' in one tensor each (frame by frame: `frames()`).

    What the job commits: a batch's rows are a few array operations, where a `Detections` object and three
    conversions a frame cost the model's process more host time than a fast model's call (benchmarks/gpu.md)."""

    counts: list[int]  # each frame's kept detections, in order
    boxes: torch.Tensor  # float32 (N, 4) x1 y1 x2 y2
    scores: torch.Tensor  # float32 (N,)
    labels: torch.Tensor  # int64 (N,)

    def frames(self) -> list[Detections]:
        return [Detections(*frame) for frame in zip(self.boxes.split_with_sizes(self.counts),
                                                    self.scores.split_with_sizes(self.counts),
                                                    self.labels.split_with_sizes(self.counts), strict=True)]


def _kept(batch: _BatchOutputs, score_threshold: float) -> BatchDetections:
    """A batch's kept detections, on the host: thresholded over the whole batch at once. The same
    elementwise operations as frame by frame, so the same bits."""
    # In the scores' own precision (fp16 compares with the threshold rounded to fp16). Label 0 is the
    # background by torchvision's convention; sigmoid heads (RetinaNet, FCOS) still score it, but it
    # names no object.
    keep = (batch.scores >= score_threshold) & (batch.labels > 0)
    frame_of = torch.repeat_interleave(torch.arange(len(batch.counts)), torch.tensor(batch.counts, dtype=torch.int64))
    kept = torch.bincount(frame_of[keep], minlength=len(batch.counts)).tolist()
    return BatchDetections(kept, batch.boxes[keep], batch.scores[keep].float(), batch.labels[keep])


def _to_cpu(outputs: list[dict[str, torch.Tensor]], score_threshold: float, width: int, height: int,
            scale: torch.Tensor | None) -> list[Detections]:
    """The kept detections of a batch, each frame's (what `Detector` does, in two steps around its lock)."""
    return _kept(_gather(outputs, width, height, scale), score_threshold).frames()


def resolve_device(requested: str) -> torch.device:
    """`auto` takes CUDA when this process can see a GPU (Ray sets CUDA_VISIBLE_DEVICES per actor)."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but this worker sees no CUDA device; use device=auto or device=cpu")
    return torch.device(requested)


def set_score_threshold(model: torch.nn.Module, threshold: float) -> None:
    """Push the score threshold into the model's postprocessing.

    Exact: every box the model would keep above `threshold` it still keeps (per-class top-k and
    NMS rank by score, so boxes below the threshold never displace or suppress ones above it),
    while the decoding and NMS of thousands of low-score candidates is skipped. The models keep
    `score > thresh` and we keep `score >= threshold`, hence the margin below it.
    """
    threshold = max(0.0, threshold - 1e-6)
    if hasattr(model, "roi_heads"):  # Faster R-CNN family
        model.roi_heads.score_thresh = max(model.roi_heads.score_thresh, threshold)
    elif hasattr(model, "score_thresh"):  # SSD, RetinaNet, FCOS
        model.score_thresh = max(model.score_thresh, threshold)


def fold_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """Fold every eval-mode BatchNorm that follows a convolution into the convolution's weights.

    The same affine map computed once at load time instead of once per frame: about a quarter
    of SSDlite's CPU time. Results change only by float rounding (tested against torchvision).
    """
    for child in module.children():
        fold_batchnorm(child)
    if isinstance(module, torch.nn.Sequential):
        for i in range(len(module) - 1):
            conv, norm = module[i], module[i + 1]
            if isinstance(conv, torch.nn.Conv2d) and isinstance(norm, torch.nn.BatchNorm2d) and not norm.training:
                module[i] = fuse_conv_bn_eval(conv, norm)
                module[i + 1] = torch.nn.Identity()
    return module


class Detector:
    """A model loaded once, run on uint8 frame batches; results filtered to score >= threshold.

    Configured for throughput with results unchanged: the score threshold is pushed into the
    model's postprocessing, BatchNorm is folded into the convolutions, activations are
    channels_last, and frames are resized and normalised on the model's device into one batch tensor
    before the model (`detect_fast`: SSD's at its fixed size, with a vectorised postprocessing and
    boxes scaled back the way torchvision does; the other presets' by torchvision's transform's own
    steps over the whole batch, their postprocessing torchvision's).

    Shared by an actor's decode streams: one model call runs at a time (the device runs them one after
    another anyway), and a batch holds the frames of one stream only, so its frames, and with them the
    kernels the device picks for its shape, never depend on which streams happened to be ready together.
    A plug-in module with `takes_uint8 = True` gets the frames as uint8 (3, H, W) and converts them itself
    (on its accelerator). Batches of YUV planes (`colour_on_device`) are converted to RGB on the model's
    device first, or handed as they are to a plug-in's `detect_planes(planes, layout)`.
    """

    def __init__(self, model_cfg: ModelConfig, score_threshold: float, device: str = "auto") -> None:
        self.device = resolve_device(device)
        self.score_threshold = score_threshold
        self.precision = precision = model_cfg.precision.value
        # The settings with the classes this model detects, for the run's manifest (the driver imports no torch).
        self.model_cfg = resolve(model_cfg)
        model, self.class_names = build(self.model_cfg)  # class_names[i] names label i + 1
        set_score_threshold(model, score_threshold)
        fold_batchnorm(model)
        self.model = model.to(self.device).to(memory_format=torch.channels_last)
        self._fast_ssd = isinstance(model, SSD) and getattr(model.transform, "fixed_size", None) is not None
        if self._fast_ssd:
            enable_fast_ssd(model)
        self._takes_uint8 = bool(getattr(model, "takes_uint8", False))
        self._takes_planes = callable(getattr(model, "detect_planes", None))
        self._batched_transform = not self._takes_uint8 and batches_the_transform(model)
        if self._batched_transform:
            enable_batched_transform(model)
        if model_cfg.compile:  # postprocessing has data-dependent shapes: compiling it would only break graphs
            model.backbone = torch.compile(model.backbone, dynamic=False)
            if hasattr(model, "head"):  # SSD, RetinaNet, FCOS; Faster R-CNN's heads stay eager
                model.head = torch.compile(model.head, dynamic=False)
        self._autocast = _autocast(self.device, precision)
        self._one_call_at_a_time = threading.Lock()
        self._model_loop: ThreadPoolExecutor | None = None  # `submit`'s: started on its first call
        # Host-to-device copies run on a stream of their own, beside the model's kernels on the default one.
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def warm_up(self, batch_size: int) -> None:
        """One throw-away batch: oneDNN/cuDNN pick their kernels on the first call, not on a real video."""
        height, width = (320, 320) if self._fast_ssd else (480, 640)
        self(torch.zeros((batch_size, height, width, 3), dtype=torch.uint8))

    @torch.inference_mode()
    def __call__(self, frames: torch.Tensor) -> list[Detections]:
        """frames: uint8 (B, H, W, 3) RGB, on the CPU or (decoded by NVDEC) on the model's device.

        Only the model call and the copy of its outputs hold the lock: the host's work before (pinning a
        batch that is not yet) and after (thresholding, splitting by frame) overlaps another stream's call.
        """
        return self.detect_batch(frames).frames()

    @torch.inference_mode()
    def detect_batch(self, frames: torch.Tensor, planar: Yuv420 | None = None) -> BatchDetections:
        """`__call__`'s detections, all frames' together: what the job commits. `planar`: `frames` are
        YUV planes of that layout (`decode.FrameBatch.planar`), converted on the model's device."""
        return _kept(self._detect_locked(*self._to_device(frames), planar), self.score_threshold)

    def submit(self, frames: torch.Tensor, planar: Yuv420 | None = None) -> PendingDetections:
        """Starts detecting `frames` (as `__call__` does) on the model's own thread and returns at once, so
        that the caller prepares its next batch, and keeps what it did with the last, while the model runs.

        Calls run one at a time in the order submitted, from any number of decode streams (the fan-in to
        one model loop); a batch's frames are read until its detections are `result()`ed.
        """
        if self._model_loop is None:
            with self._one_call_at_a_time:
                if self._model_loop is None:
                    self._model_loop = ThreadPoolExecutor(1, thread_name_prefix="model")
        frames, copied = self._to_device(frames)
        return PendingDetections(self._model_loop.submit(self._detect_locked, frames, copied, planar),
                                 self.score_threshold)

    def close(self) -> None:
        """Stops the model's thread once the calls submitted have run."""
        if self._model_loop is not None:
            self._model_loop.shutdown(wait=True)

    @torch.inference_mode()
    def _detect_locked(self, frames: torch.Tensor, copied: torch.cuda.Event | None,
                       planar: Yuv420 | None = None) -> _BatchOutputs:
        with self._one_call_at_a_time:
            return self._detect(frames, copied, planar)

    def _to_device(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """A CPU batch bound for a GPU crosses on the copy stream (pinned: `BatchBuffers` pins what it hands
        a GPU worker; a child process's buffer is pinned here), overlapping the model's call on another
        batch; the event says when it has landed. NVDEC's frames are on the device already."""
        if self.device.type != "cuda" or frames.device.type != "cpu":
            return frames, None
        host = frames if frames.is_pinned() else frames.pin_memory()
        with torch.cuda.stream(self._copy_stream):
            on_device = host.to(self.device, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self._copy_stream)
        return on_device, copied

    def _detect(self, frames: torch.Tensor, copied: torch.cuda.Event | None = None,
                planar: Yuv420 | None = None) -> _BatchOutputs:
        if copied is not None:  # the model's stream waits for the copy; the copy's memory is the model's now
            torch.cuda.current_stream(self.device).wait_event(copied)
            frames.record_stream(torch.cuda.current_stream(self.device))
        if planar is not None and self._takes_planes:  # a plug-in converting on its own accelerator
            with self._autocast:
                outputs = self.model.detect_planes(frames, planar)
            return _gather(outputs, *planar.displayed_size[::-1], None)
        if planar is not None:
            frames = planes_to_rgb(frames, planar)
        height, width = frames.shape[1:3]
        # uint8 -> float on the device, then resized and normalised into one batch tensor: SSD's
        # (prepare_batch) or torchvision's transform of the other presets (prepare_rcnn_batch).
        if self._fast_ssd:
            images = list(prepare_batch(self.model, frames))
        elif self._takes_uint8 or self._batched_transform:
            images = list(frames.permute(0, 3, 1, 2).unbind(0))  # one call, not a Python step a frame
        else:
            images = [f.float().div_(255.0) for f in frames.permute(0, 3, 1, 2).unbind(0)]
        with self._autocast:
            if self._batched_transform:  # the model reads only the frames' sizes from `images`
                self.model.transform.prepared = prepare_rcnn_batch(self.model.transform, frames)
            outputs = self.model(images)
        scale = None
        if self._fast_ssd:  # boxes come back in the resized frame; scale them as torchvision would
            resized_h, resized_w = images[0].shape[-2:]
            scale = torch.tensor([width / resized_w, height / resized_h] * 2, device=frames.device)
        return _gather(outputs, width, height, scale)


class PendingDetections:
    """A submitted batch's detections, still being found (`Detector.submit`)."""

    def __init__(self, outputs: Future, score_threshold: float) -> None:
        self._outputs, self._score_threshold = outputs, score_threshold

    def result(self) -> BatchDetections:
        """Waits for the model; raises what it raised. Thresholding runs here, on the caller's thread,
        beside the model's next call."""
        return _kept(self._outputs.result(), self._score_threshold)

    def wait(self) -> None:
        """Waits for the model without looking at its answer (a task stopping early)."""
        self._outputs.exception()


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    # fp16 on CPU is slow; it is allowed so that fp16 results can be checked on a machine without a GPU.
    return torch.autocast(device_type=device.type, dtype=dtype)


__all__ = ["BatchDetections", "Detections", "Detector", "PendingDetections", "fold_batchnorm", "resolve_device", "set_score_threshold"]
