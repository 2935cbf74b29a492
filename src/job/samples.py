"""Tiny generated videos and offline detector weights, for the demo and the tests.

Pretrained weights need internet; these weights come from a seeded model whose BatchNorm
statistics are recalibrated on real frames, so its detections depend on the pixels (move a
shape and the boxes move) without any download.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

from job.colour import Yuv420, split_planes, yuv_to_rgb

STAND_IN_STEP = 16  # the stand-in accelerator looks at every 16th row and column


def scene(index: int, width: int, height: int, seed: int = 0) -> np.ndarray:
    """An RGB frame: a gradient background with two coloured boxes that move with `index`."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    frame = np.stack([(x * 255 // max(width - 1, 1)), (y * 255 // max(height - 1, 1)),
                      np.full_like(x, 96)], axis=-1).astype(np.uint8)
    for colour, speed in ((rng.integers(0, 255, 3), 3), (rng.integers(0, 255, 3), -2)):
        bw, bh = max(width // 4, 2), max(height // 3, 2)
        left = (index * speed * max(width // 64, 1)) % max(width - bw, 1)
        top = (height - bh) // 2 + (speed * 5) % max(height // 4, 1)
        frame[top : top + bh, left : left + bw] = colour
    return frame


def write_video(
    path: str | Path,
    frames: Sequence[np.ndarray] | int,
    *,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    fps: int = 25,
    size: tuple[int, int] = (160, 120),
    pts_ms: Sequence[int] | None = None,
    rotation: int | None = None,
    audio: bool = False,
    subtitles: bool = False,
    options: dict[str, str] | None = None,
    colour_tags: tuple[int, int] | None = None,
) -> Path:
    """Encode frames (or `frames` generated scenes of `size`=(width, height)) with PyAV.

    `pts_ms` gives each frame's presentation time in milliseconds (variable frame rate);
    `rotation` sets the display matrix (degrees counterclockwise), as phones do; `colour_tags`, the
    stream's (colorspace, color_range) as FFmpeg numbers them (e.g. (1, 1): BT.709, limited range).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(frames, int):
        frames = [scene(i, *size) for i in range(frames)]
    height, width = frames[0].shape[:2]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps, options=options or {})
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if colour_tags is not None:
            stream.codec_context.colorspace, stream.codec_context.color_range = colour_tags
        if pts_ms is not None:
            stream.time_base = Fraction(1, 1000)
            stream.codec_context.time_base = Fraction(1, 1000)
        if rotation is not None:
            stream.set_display_rotation(rotation)
        audio_stream = container.add_stream("aac", rate=44100) if audio else None
        subtitle_stream = None
        if subtitles:
            subtitle_stream = container.add_stream("mov_text" if path.suffix in (".mp4", ".mov", ".m4v") else "subrip")
            subtitle_stream.codec_context.subtitle_header = b"[Script Info]\nScriptType: v4.00+\n"
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = int(pts_ms[i]), Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
        if subtitle_stream is not None:
            cue = av.Packet(b"a subtitle cue")
            cue.stream = subtitle_stream
            cue.time_base = Fraction(1, 1000)
            cue.pts = cue.dts = 0
            cue.duration = 500
            container.mux(cue)
        if audio_stream is not None:
            samples = np.zeros((1, 1024), dtype=np.float32)
            for k in range(max(1, len(frames) * 44100 // (fps * 1024))):
                chunk = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
                chunk.sample_rate, chunk.pts = 44100, k * 1024
                container.mux(audio_stream.encode(chunk))
            container.mux(audio_stream.encode())
    return path


def calibrated_state_dict(model_name: str, frames: Sequence[np.ndarray], seed: int = 0, num_classes: int = 91,
                          **builder_args) -> dict[str, torch.Tensor]:
    """A seeded detector whose BatchNorm running statistics are measured on `frames`.

    `num_classes` counts the background, as torchvision's builders do (91 for COCO).
    """
    from torchvision.models import get_model

    torch.manual_seed(seed)
    model = get_model(model_name, weights=None, weights_backbone=None, num_classes=num_classes,
                      **builder_args).eval()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the calibration batches
        norm.train()
    images = [torch.from_numpy(np.ascontiguousarray(f)).permute(2, 0, 1).float() / 255 for f in frames]
    with torch.no_grad():
        for start in range(0, len(images), 8):
            model(images[start : start + 8])
    return model.eval().state_dict()


def make_demo(directory: str | Path, model_name: str = "ssdlite320_mobilenet_v3_large") -> tuple[Path, Path]:
    """A few short videos (one awkward) and matching offline weights; returns (video_dir, weights)."""
    directory = Path(directory)
    videos = directory / "videos"
    write_video(videos / "street.mp4", 48, size=(320, 240))
    write_video(videos / "park walk.mkv", 36, size=(256, 144), fps=30)
    write_video(videos / "phone" / "portrait.mp4", 24, size=(240, 160), rotation=90)
    (videos / "broken.mp4").write_bytes(b"this is not a video")
    weights = directory / f"{model_name}-calibrated.pth"
    torch.save(calibrated_state_dict(model_name, [scene(i, 320, 240) for i in range(0, 48, 3)]), weights)
    return videos, weights


class StandInAccelerator(torch.nn.Module):
    """Plays a GPU on a machine without one (a plug-in: `model._target_=job.samples.stand_in_accelerator`):
    each call takes `ms_per_frame` per frame, as a kernel queue would, finding the box around the bright
    pixels of every 16th row and column (so its answers follow the frames) and waiting out the rest of that
    time without using the CPU: what it computes is the device's work, not more host time on top. With
    `calls_log`, each call appends "pid WxH frames end kind" to that file (which streams fed the model, in
    order; `end`: the Unix time the call returned; `kind`: rgb, or planes for YUV planes)."""

    takes_uint8 = True  # conversion is the device's work (`detect.Detector`)

    def __init__(self, ms_per_frame: float, level: int, calls_log: str | None = None) -> None:
        super().__init__()
        self.ms_per_frame, self.level, self.calls_log = ms_per_frame, level, calls_log

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        done_at = time.monotonic() + self.ms_per_frame * len(images) / 1000
        if not images:
            time.sleep(max(0.0, done_at - time.monotonic()))
            return []
        # One pass over the batch, as a device would run it, in a handful of numpy operations on every 16th
        # row and column: the host time this emulation spends (which a GPU would not take from the
        # decoders) stays a small part of a call (tests/test_gpu_node.py; benchmarks/gpu.md).
        over = torch.stack([image[:, ::STAND_IN_STEP, ::STAND_IN_STEP] for image in images]) > self.level
        height, width = images[0].shape[1:]
        return self._answers(over[:, 0] & over[:, 1] & over[:, 2], done_at, f"{width}x{height} rgb")

    def detect_planes(self, planes: torch.Tensor, layout: Yuv420) -> list[dict[str, torch.Tensor]]:
        """The same answers from a batch of YUV planes (`colour_on_device`): only the sampled pixels are
        converted, the device's work being free. Rotated streams are sampled on the coded frame's grid."""
        done_at = time.monotonic() + self.ms_per_frame * len(planes) / 1000
        luma, chroma = split_planes(planes, layout)
        luma = luma[:, ::STAND_IN_STEP, ::STAND_IN_STEP]
        chroma = chroma[:, :, :: STAND_IN_STEP // 2, :: STAND_IN_STEP // 2]
        over = yuv_to_rgb(luma, chroma[:, 0], chroma[:, 1], layout) > self.level  # (B, h, w, 3)
        shown_height, shown_width = layout.displayed_size
        return self._answers(over[..., 0] & over[..., 1] & over[..., 2], done_at,
                             f"{shown_width}x{shown_height} planes")

    def _answers(self, bright: torch.Tensor, done_at: float, call: str) -> list[dict[str, torch.Tensor]]:
        """The box around each frame's sampled pixels over the level in every channel (`bright`: (B, h, w)),
        once the call's time is up."""
        bright = bright.numpy()
        rows, cols = bright.any(axis=2), bright.any(axis=1)
        found = rows.any(axis=1).tolist()
        first_row, first_col = rows.argmax(axis=1), cols.argmax(axis=1)
        last_row = rows.shape[1] - 1 - rows[:, ::-1].argmax(axis=1)
        last_col = cols.shape[1] - 1 - cols[:, ::-1].argmax(axis=1)
        boxes = torch.from_numpy((np.stack([first_col, first_row, last_col + 1, last_row + 1], axis=1)
                                  * STAND_IN_STEP).astype(np.float32))
        none = {"boxes": torch.zeros((0, 4)), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
        score, label = torch.tensor([0.99]), torch.tensor([1])
        time.sleep(max(0.0, done_at - time.monotonic()))
        if self.calls_log:
            with open(self.calls_log, "a") as log:
                log.write(f"{os.getpid()} {call.split()[0]} {len(found)} {time.time():.3f} {call.split()[1]}\n")
        return [{"boxes": boxes[i:i + 1], "scores": score, "labels": label} if hit else none
                for i, hit in enumerate(found)]


def stand_in_accelerator(weights: str, ms_per_frame: float = 0.2, level: int = 200, calls_log: str | None = None):
    """The plug-in contract for `StandInAccelerator`: (module, class names)."""
    return StandInAccelerator(ms_per_frame, level, calls_log), ["bright"]
