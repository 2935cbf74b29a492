"""One video -> a stream of fixed-size frame batches, with each frame's index and timestamp.

PyAV decodes by default, and always supplies what decord gets wrong or does not report: the
stream's real presentation timestamps (decord's are wrong in some containers), the rotation
from the display matrix, the codec name and the container's own frame count.

Why PyAV rather than decord for the frames (decord stays available as `decoder=decord`): a
decord 0.6.0 reader left idle while the model runs keeps decoding ahead without limit
(dmlc/decord#157: a whole 720p video in memory), so our decord path must close its reader after
every ~128 MB of frames and seek back, re-decoding from the previous keyframe each time. PyAV
decodes only what it is asked for, so it streams a video once: 2-3x less decode time than the
decord path on 720p (benchmarks/throughput.md). decord 0.6.0 also returns corrupt 4-channel
buffers for rotated streams, which therefore always go through PyAV.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np
import torch
from av.video.reformatter import VideoReformatter

from job.errors import first_line


class VideoError(Exception):
    """A video we cannot read at all; the message is meant for a person."""


@dataclass
class VideoInfo:
    width: int  # as displayed, i.e. after rotation
    height: int
    fps: float | None
    duration_s: float | None
    codec: str
    rotation: int  # degrees counterclockwise that turn the coded frame into the displayed one
    container_frames: int | None  # the container's frame count, when it records one
    pts_s: np.ndarray | None  # presentation time of each frame in display order, first frame at 0


@dataclass
class FrameBatch:
    frame_indices: np.ndarray  # int64, index among all decoded frames
    timestamps_s: np.ndarray  # float64
    frames: torch.Tensor  # uint8 (B, H, W, 3), RGB, displayed orientation


def probe(path: str) -> VideoInfo:
    """Reads metadata with PyAV; raises VideoError with a plain reason when there is no video."""
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise VideoError(f"cannot read file: {exc.strerror or exc}") from exc
    if size == 0:
        raise VideoError("empty file (0 bytes)")
    try:
        container = av.open(path)
    except (av.error.FFmpegError, UnicodeDecodeError) as exc:
        raise VideoError(f"not a readable video file: {_reason(exc)}") from exc
    with container:
        if container.format.name.endswith("_pipe") or container.format.name in ("image2", "image2pipe"):
            raise VideoError(f"an image, not a video ({container.format.name.removesuffix('_pipe')})")
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            raise VideoError(f"no video stream in the file (streams found: {', '.join(kinds)})")
        stream = container.streams.video[0]
        codec = stream.codec_context.name
        coded_w, coded_h = stream.codec_context.width, stream.codec_context.height
        fps = _fps(stream)
        duration_s = _duration_s(stream, container)
        container_frames = stream.frames or None
        try:
            first = next(container.decode(stream), None)
        except av.error.FFmpegError as exc:
            raise VideoError(f"no decodable video frame ({codec}): {_reason(exc)}") from exc
        if first is None:
            raise VideoError(f"the video stream ({codec}) has no decodable frames")
        rotation = _quarter_turns(first.rotation) * 90
        coded_w, coded_h = first.width, first.height
    width, height = (coded_h, coded_w) if rotation % 180 else (coded_w, coded_h)
    return VideoInfo(width, height, fps, duration_s, codec, rotation, container_frames, _presentation_times(path))


def iter_batches(
    path: str,
    info: VideoInfo,
    batch_size: int,
    frame_stride: int = 1,
    start_frame: int = 0,
    decoder: str = "pyav",
    progress: DecodeProgress | None = None,
    window_frames: int | None = None,
    threads: int = 1,
) -> Iterator[FrameBatch]:
    """Yields batches of the frames to detect on (index % frame_stride == 0, index >= start_frame).

    `progress` (if given) ends up with the number of decodable frames and, if decoding stopped
    early on damaged data, the reason. `window_frames` overrides how many frames decord decodes
    per reader (see `_decord_frames`); `threads` is how many the decoder may use.
    """
    progress = progress if progress is not None else DecodeProgress()

    def wanted(index: int) -> bool:
        return index >= start_frame and index % frame_stride == 0

    if decoder == "pyav" or info.rotation != 0:
        coded = (info.height, info.width) if info.rotation % 180 else (info.width, info.height)
        frames = _pyav_frames(path, info.rotation, wanted, progress, threads, coded)
    else:
        window = window_frames or max(16, min(256, DECORD_WINDOW_BYTES // (info.width * info.height * 3)))
        frames = _decord_frames(path, wanted, start_frame, window, progress, threads)
    batch = torch.empty((batch_size, info.height, info.width, 3), dtype=torch.uint8)
    indices: list[int] = []
    for index, frame in frames:
        if frame.shape != batch.shape[1:]:
            progress.damage = (
                f"frame {index} is {tuple(frame.shape[:2])} (height, width), the stream started at "
                f"{info.height}x{info.width}; resolution changes are not supported"
            )
            break
        batch[len(indices)].copy_(frame)
        indices.append(index)
        if len(indices) == batch_size:
            yield _make_batch(batch, indices, info)
            batch = torch.empty_like(batch)
            indices = []
    if indices:
        yield _make_batch(batch[: len(indices)], indices, info)


@dataclass
class DecodeProgress:
    frames_decoded: int = 0
    damage: str | None = None  # why decoding stopped before the end of the stream


def timestamps_for(indices: np.ndarray, info: VideoInfo) -> np.ndarray:
    """Seconds since the first frame; beyond the known PTS, extrapolated at the stream's rate."""
    indices = np.asarray(indices, dtype=np.int64)
    fps = info.fps or 0.0
    pts = info.pts_s
    if pts is None or len(pts) == 0:
        return indices / fps if fps else np.full(len(indices), np.nan)
    known = indices < len(pts)
    out = np.empty(len(indices), dtype=np.float64)
    out[known] = pts[indices[known]]
    step = 1.0 / fps if fps else 0.0
    out[~known] = pts[-1] + (indices[~known] - (len(pts) - 1)) * step
    return out


def _make_batch(batch: torch.Tensor, indices: list[int], info: VideoInfo) -> FrameBatch:
    idx = np.asarray(indices, dtype=np.int64)
    return FrameBatch(idx, timestamps_for(idx, info), batch)


# decord decodes ahead in a background thread with no bound (dmlc/decord#157): a reader held
# while the model runs fills memory with the rest of the video. So each reader lives only for
# one window of about this many bytes of frames, decoded in a tight loop, then is closed.
DECORD_WINDOW_BYTES = 128 * 2**20


def _decord_frames(
    path: str, wanted: Callable[[int], bool], start: int, window: int, progress: DecodeProgress, threads: int
) -> Iterator[tuple[int, torch.Tensor]]:
    """(index, frame) for the wanted frames, read sequentially with next() in bounded windows.

    next() rather than get_batch(): it counts the frames really decodable instead of trusting the
    container's count, and stops cleanly at damage instead of failing a whole batch. A rerun
    resumes at `start` with an accurate seek instead of decoding from frame 0.
    """
    import decord

    decord.logging.set_level(decord.logging.QUIET)
    position = start
    progress.frames_decoded = start
    while True:
        held: list[tuple[int, torch.Tensor]] = []
        finished = False
        try:
            reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=threads)
        except Exception as exc:  # decord raises bare RuntimeError/DECORDError with C++ context
            raise VideoError(f"decord cannot open the video: {first_line(exc)}") from exc
        try:
            if position:
                if position >= len(reader):
                    return
                reader.seek_accurate(position)
            while True:
                try:
                    frame = reader.next()
                except StopIteration:
                    finished = True
                    break
                index = progress.frames_decoded
                progress.frames_decoded += 1
                if wanted(index):
                    held.append((index, torch.from_numpy(frame.asnumpy())))
                if progress.frames_decoded - position >= window:
                    break
        except decord.DECORDError as exc:
            progress.damage = f"decoding stopped at frame {progress.frames_decoded}: {first_line(exc)}"
            finished = True
        finally:
            del reader
        yield from held
        if finished:
            return
        position = progress.frames_decoded


def _pyav_frames(
    path: str, rotation: int, wanted: Callable[[int], bool], progress: DecodeProgress, threads: int,
    coded_size: tuple[int, int] | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Frames in display order; every one at `coded_size` (width, height before rotation), so a stream
    whose resolution changes midway is scaled to its first size instead of ending there."""
    turns = _quarter_turns(rotation)
    width, height = coded_size or (None, None)
    # One reformatter for the whole stream keeps its swscale context; frame.to_ndarray() builds a
    # new one per frame (measured 3-4x slower at 640x272). One conversion thread: PyAV 17+ otherwise
    # starts one per CPU, which measured slower here; the decoder has its own threads.
    to_rgb = VideoReformatter()
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        stream.thread_count = threads
        frames = container.decode(stream)
        while True:
            try:
                frame = next(frames)
            except StopIteration:
                return
            except av.error.FFmpegError as exc:
                progress.damage = f"decoding stopped at frame {progress.frames_decoded}: {_reason(exc)}"
                return
            index = progress.frames_decoded
            progress.frames_decoded += 1
            if not wanted(index):
                continue
            rgb = to_rgb.reformat(frame, format="rgb24", width=width, height=height, threads=1).to_ndarray()
            yield index, torch.from_numpy(np.ascontiguousarray(np.rot90(rgb, turns)) if turns else rgb)


def _presentation_times(path: str) -> np.ndarray | None:
    """The video packets' PTS in display order, relative to the first; demuxing only, no decoding."""
    stamps: list[int] = []
    with av.open(path) as container:
        stream = container.streams.video[0]
        time_base = stream.time_base or Fraction(1, 1)
        try:
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue
                stamp = packet.pts if packet.pts is not None else packet.dts
                if stamp is None:
                    return None
                stamps.append(stamp)
        except av.error.FFmpegError:
            pass  # damaged tail: the decoder reports it; keep the stamps read so far
    if not stamps:
        return None
    ordered = np.sort(np.asarray(stamps, dtype=np.int64))
    return (ordered - ordered[0]).astype(np.float64) * float(time_base)


def _fps(stream) -> float | None:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else None


def _duration_s(stream, container) -> float | None:
    if stream.duration is not None and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


def _quarter_turns(rotation: float | None) -> int:
    return int(round((rotation or 0) / 90.0)) % 4


def _reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or first_line(exc)


__all__ = [
    "DecodeProgress", "FrameBatch", "VideoError", "VideoInfo", "iter_batches", "probe", "timestamps_for",
]
