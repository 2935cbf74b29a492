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

`decoder=nvdec` decodes on the GPU's NVDEC engines with NVIDIA's PyNvVideoCodec (the `nvdec` extra), frames
left on the device. Chosen over torchcodec's CUDA decoder because its wheel carries its own demuxer and
needs only the driver, while torchcodec needs FFmpeg's shared libraries installed on every node (neither
was measured against the other: no GPU was at hand). Frames are numbered by their PTS exactly as PyAV's
are, with PyAV's probe for timestamps and rotation; a video NVDEC will not take (no CUDA device, a codec
or profile it lacks, a segment that starts midway) or that fails midway goes on with PyAV, the reason logged.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import importlib.util
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import av
import numpy as np
import torch
from av.video.reformatter import VideoReformatter

from job.colour import Yuv420, planar_format
from job.errors import first_line

log = logging.getLogger(__name__)

# Tags in a container's header (title, encoder, rotation...) that are not valid UTF-8 (damage, or an old
# tool's own encoding) are read with replacement characters instead of making the video unreadable.
METADATA_ERRORS = "replace"


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
    container_frames: int | None  # frames the container lists and shows (edit-list lead-in excluded)
    pts_s: np.ndarray | None  # presentation time of each shown frame in display order, first frame at 0
    frame_pts: np.ndarray | None = None  # the same in the stream's time base, as the decoder stamps frames
    hidden_frames: int = 0  # frames an edit list hides (the lead-in of a cut made without re-encoding)
    keyframe_pts: np.ndarray | None = None  # stream time base, ascending: where decoding can start
    planar: Yuv420 | None = None  # how the model's device converts its frames' planes, where it can


@dataclass
class FrameBatch:
    frame_indices: np.ndarray  # int64, index among all decoded frames
    timestamps_s: np.ndarray  # float64
    frames: torch.Tensor  # uint8 (B, H, W, 3), RGB, displayed orientation; or planes, as `planar` says
    buffer: torch.Tensor | None = None  # the batch-sized buffer `frames` lies in, for `BatchBuffers.give_back`
    planar: Yuv420 | None = None  # `frames` are I420 planes (B, H * 3 / 2, W), for the model's device to convert


class BatchBuffers:
    """Batch buffers written into again once their batch is done with (handed back), instead of new ones.

    A new batch-sized allocation (tens of MB at 720p) is fresh memory the OS maps in page by page as
    the frames are copied in, which made that copy the decoder's costliest step after decoding itself
    (benchmarks/gpu.md). Batches bound for a GPU are pinned, so they cross without another copy. A
    batch not handed back is simply not reused: only the caller knows when its frames are no longer read.
    """

    def __init__(self, keep: int = 4):
        self.keep = keep  # at most this many wait to be reused
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()  # taken by the decode thread, handed back by the model's

    def take(self, shape: tuple[int, ...], device: torch.device, pinned: bool) -> torch.Tensor:
        with self._lock:
            for i, buffer in enumerate(self._free):
                if buffer.shape == shape and buffer.device == device and buffer.is_pinned() == pinned:
                    return self._free.pop(i)
        return torch.empty(shape, dtype=torch.uint8, device=device, pin_memory=pinned)

    def give_back(self, batch: FrameBatch) -> None:
        """`batch`'s frames will not be read again (by anyone: its detections are made and copied off)."""
        buffer, batch.buffer = batch.buffer, None
        with self._lock:
            if buffer is not None and len(self._free) < self.keep:
                self._free.append(buffer)


def probe_file(path: str, identity: str | None) -> VideoInfo:
    """`probe(path)`, read once for the file as it is now (`identity`: `storage.file_identity`, which any
    change to the file changes; None: not known, read it again): each segment of a long video probes it,
    and a probe scans every packet of the whole video."""
    return probe(path) if identity is None else _probe_unchanged(path, identity)


@functools.lru_cache(maxsize=16)  # a few videos' segments at once per process; a failed probe is not kept
def _probe_unchanged(path: str, identity: str) -> VideoInfo:
    return probe(path)


def probe(path: str) -> VideoInfo:
    """Reads metadata with PyAV; raises VideoError with a plain reason when there is no video."""
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise VideoError(f"cannot read file: {exc.strerror or exc}") from exc
    if size == 0:
        raise VideoError("empty file (0 bytes)")
    try:
        container = av.open(path, metadata_errors=METADATA_ERRORS)
    except (av.error.FFmpegError, UnicodeDecodeError) as exc:
        raise VideoError(f"not a readable video file: {_reason(exc)}") from exc
    with container:
        if container.format.name.endswith("_pipe") or container.format.name in ("image2", "image2pipe"):
            raise VideoError(f"an image, not a video ({container.format.name.removesuffix('_pipe')})")
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            raise VideoError(f"no video stream in the file (streams found: {', '.join(kinds)})")
        stream = container.streams.video[0]
        if stream.codec_context is None:  # FFmpeg has no decoder for the codec the header names
            raise VideoError("the video stream's codec has no decoder in this FFmpeg (unknown or damaged header)")
        time_base = stream.time_base or Fraction(1, 1)
        codec = stream.codec_context.name
        coded_w, coded_h = stream.codec_context.width, stream.codec_context.height
        fps = _fps(stream)
        duration_s = _duration_s(stream, container)
        listed_frames = stream.frames or None
        first, frame_pts, hidden, keyframe_pts = _scan(container, stream, codec)
        rotation = _quarter_turns(first.rotation) * 90
        coded_w, coded_h = first.width, first.height
        planar = planar_format(first.format.name, first.colorspace, first.color_range, coded_w, coded_h,
                               _quarter_turns(first.rotation))
    width, height = (coded_h, coded_w) if rotation % 180 else (coded_w, coded_h)
    pts_s = None if frame_pts is None else (frame_pts - frame_pts[0]).astype(np.float64) * float(time_base)
    container_frames = listed_frames - hidden if listed_frames else None
    return VideoInfo(width, height, fps, duration_s, codec, rotation, container_frames, pts_s, frame_pts, hidden,
                     keyframe_pts, planar)


def keyframe_indices(info: VideoInfo) -> np.ndarray | None:
    """Display-order indices of the frames decoding can start at; None where frames cannot be told
    apart by their PTS (then a video is only ever decoded from its start)."""
    if info.frame_pts is None or info.keyframe_pts is None or not _stamps_unique(info.frame_pts):
        return None
    return np.searchsorted(info.frame_pts, info.keyframe_pts)


def iter_batches(
    path: str,
    info: VideoInfo,
    *,
    batch_size: int,
    frame_stride: int = 1,
    start_frame: int = 0,
    decoder: str = "pyav",
    progress: DecodeProgress | None = None,
    window_frames: int | None = None,
    threads: int = 1,
    end_frame: int | None = None,
    device: torch.device | None = None,
    buffers: BatchBuffers | None = None,
    planar: bool = False,
) -> Iterator[FrameBatch]:
    """Yields batches of the frames to detect on (index % frame_stride == 0, start_frame <= index < end_frame).

    `progress` (if given) ends up with the number of decodable frames (those before start_frame
    counted as decodable when decoding seeks past them) and what damage was met on the way.
    `window_frames` overrides how many frames decord decodes per reader (see `_decord_frames`);
    `threads` is how many the decoder may use. A range that ends before the video does (a segment)
    is decoded with PyAV, unless `decoder="nvdec"`. `device`: the model's, where NVDEC leaves its frames
    (the batches are then on it too; decoded on the CPU for a GPU, they are pinned). `buffers`: where the
    batches' memory comes from, to be handed back there once detected. `planar`: PyAV hands over the
    stream's YUV planes where the model's device can convert them (`info.planar`; `colour`), not RGB.
    """
    progress = progress if progress is not None else DecodeProgress()
    buffers = buffers or BatchBuffers(keep=0)
    pinned = device is not None and device.type == "cuda" and torch.cuda.is_available()

    def wanted(index: int) -> bool:
        return index >= start_frame and index % frame_stride == 0

    layout = None  # RGB, unless PyAV alone decodes a stream the device can convert
    if decoder == "nvdec":
        frames = _nvdec_then_pyav(path, info, wanted, start_frame, end_frame, progress, threads, device)
    elif decoder == "pyav" or not _decord_reads_right(info) or end_frame is not None:
        layout = info.planar if planar else None
        frames = _counted(_pyav_frames(path, info, wanted, progress, threads, start_frame, end_frame, layout),
                          progress, "pyav")
    else:
        window = window_frames or max(16, min(256, DECORD_WINDOW_BYTES // (info.width * info.height * 3)))
        frames = _decord_then_pyav(path, info, wanted, start_frame, window, progress, threads)
    shape = (batch_size, *layout.plane_shape) if layout else (batch_size, info.height, info.width, 3)
    batch: torch.Tensor | None = None
    indices: list[int] = []
    for index, frame in frames:
        if indices and batch.device != frame.device:  # NVDEC handed over to PyAV midway: a batch is on one device
            yield _make_batch(batch, indices, info, layout)
            batch, indices = None, []
        if batch is None:
            batch = buffers.take(shape, frame.device, pinned and frame.device.type == "cpu")
        batch[len(indices)].copy_(frame)
        indices.append(index)
        if len(indices) == batch_size:
            yield _make_batch(batch, indices, info, layout)
            batch, indices = None, []
    if indices:
        yield _make_batch(batch, indices, info, layout)


@dataclass
class DecodeProgress:
    frames_decoded: int = 0
    stopped: bool = False  # decord met data it could not decode
    problems: list[str] = field(default_factory=list)  # damage met, in the order it was met
    frames_by_decoder: dict[str, int] = field(default_factory=dict)  # frames handed on, by who decoded them

    @property
    def damage(self) -> str | None:
        """Why some frames are missing from the results, if any are."""
        return "; ".join(self.problems) or None


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


def detected_frames(info: VideoInfo, frame_count: int, frame_stride: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, timestamps) of the frames the detector looked at: every frame_stride-th decodable one."""
    indices = np.arange(0, frame_count, frame_stride, dtype=np.int64)
    return indices, timestamps_for(indices, info)


def _make_batch(buffer: torch.Tensor, indices: list[int], info: VideoInfo, planar: Yuv420 | None) -> FrameBatch:
    idx = np.asarray(indices, dtype=np.int64)
    return FrameBatch(idx, timestamps_for(idx, info), buffer[: len(indices)], buffer, planar)


# decord decodes ahead in a background thread with no bound (dmlc/decord#157): a reader held
# while the model runs fills memory with the rest of the video. So each reader lives only for
# one window of about this many bytes of frames, decoded in a tight loop, then is closed.
DECORD_WINDOW_BYTES = 128 * 2**20


def _decord_reads_right(info: VideoInfo) -> bool:
    """decord 0.6.0 returns corrupt buffers for rotated streams, shows an edit list's hidden lead-in
    frames, and reorders a stream whose clock restarts (streams joined byte for byte): those go to PyAV."""
    return info.rotation == 0 and not info.hidden_frames and _stamps_unique(info.frame_pts)


def _stamps_unique(frame_pts: np.ndarray | None) -> bool:
    return frame_pts is None or bool(np.all(np.diff(frame_pts) > 0))


def _decord_then_pyav(
    path: str, info: VideoInfo, wanted: Callable[[int], bool], start: int, window: int, progress: DecodeProgress,
    threads: int,
) -> Iterator[tuple[int, torch.Tensor]]:
    """decord's frames until it meets what it cannot handle (damaged packets, which stop it, or a
    resolution change), then PyAV's from that frame on, so `decoder=decord` loses no more frames
    than the default does."""
    shape = (info.height, info.width, 3)
    handover = None
    for index, frame in _counted(_decord_frames(path, wanted, start, window, progress, threads), progress, "decord"):
        if frame.shape != shape:
            handover = index
            break
        yield index, frame
    if handover is None and not progress.stopped:
        return
    handover = progress.frames_decoded if handover is None else handover
    progress.stopped = False
    rest = DecodeProgress()
    yield from _counted(_pyav_frames(path, info, lambda i: i >= handover and wanted(i), rest, threads, 0, None),
                        progress, "pyav")
    progress.frames_decoded, progress.problems = rest.frames_decoded, rest.problems


# What NVDEC decodes on some NVIDIA GPU, by FFmpeg's codec names; whether this GPU takes a stream's profile,
# bit depth and chroma format (AV1 before Ampere, 4:4:4 H.264) is found out by trying.
NVDEC_CODECS = frozenset({"h264", "hevc", "av1", "vp8", "vp9", "mpeg1video", "mpeg2video", "mpeg4", "vc1", "mjpeg"})


def nvdec_installed() -> bool:
    return importlib.util.find_spec("PyNvVideoCodec") is not None


def nvdec_refusal(info: VideoInfo, device: torch.device | None, start: int) -> str | None:
    """Why this video will not go to NVDEC at all (None: it will be tried)."""
    if device is None or device.type != "cuda":
        return f"NVDEC decodes on a CUDA device; this worker's model runs on {device.type if device else 'cpu'}"
    if info.codec not in NVDEC_CODECS:
        return f"NVDEC does not decode {info.codec}"
    if start > 0:
        return "a segment or resume that starts midway (NVDEC decodes from the start of the file here)"
    if not nvdec_installed():
        return "PyNvVideoCodec is not installed (pip install 'job[nvdec]')"
    return None


def _nvdec_then_pyav(
    path: str, info: VideoInfo, wanted: Callable[[int], bool], start: int, end: int | None,
    progress: DecodeProgress, threads: int, device: torch.device | None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """NVDEC's frames while it decodes, then PyAV's from the first frame it did not hand out, so a video
    NVDEC refuses or fails on midway loses no more frames than the default decoder would."""
    reason = nvdec_refusal(info, device, start)
    handover = start
    if reason is None:
        frames = _counted(_nvdec_frames(path, info, wanted, progress, device, end), progress, "nvdec")
        while True:
            try:
                index, frame = next(frames)
            except StopIteration:
                return
            except Exception as exc:  # PyNvVideoCodec raises its own exception types and RuntimeError
                reason = f"NVDEC stopped after {progress.frames_decoded} frames: {first_line(exc)}"
                break
            handover = index + 1
            yield index, frame
    log.warning("%s: decoding with PyAV from frame %d: %s", os.path.basename(path), handover, reason)
    yield from _counted(_pyav_frames(path, info, lambda i: i >= handover and wanted(i), progress, threads,
                                     handover, end), progress, "pyav")


def _nvdec_frames(
    path: str, info: VideoInfo, wanted: Callable[[int], bool], progress: DecodeProgress, device: torch.device,
    end: int | None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Frames in display order as RGB uint8 (H, W, 3) on `device`, numbered by their PTS as `_pyav_frames`
    numbers them (the NVDEC demuxer is FFmpeg's too, so the stamps are the same), rotated for display."""
    import PyNvVideoCodec as nvc

    turns = _quarter_turns(info.rotation)
    coded = (info.width, info.height) if info.rotation % 180 else (info.height, info.width)
    number = _FrameNumbering(info.frame_pts)
    progress.frames_decoded = 0
    demuxer = nvc.CreateDemuxer(filename=path)
    decoder = nvc.CreateDecoder(gpuid=device.index or 0, codec=demuxer.GetNvCodecId(), usedevicememory=True,
                                outputColorType=nvc.OutputColorType.RGB)
    for packet in demuxer:
        for decoded in decoder.Decode(packet):
            index = number(decoded.getPTS())
            if index is None:
                continue
            if end is not None and index >= end:
                return
            progress.frames_decoded += 1
            if not wanted(index):
                continue
            frame = torch.from_dlpack(decoded)  # the decoder's own surface, reused: copied below
            if tuple(frame.shape) != (*coded, 3):
                raise VideoError(f"the resolution changes at frame {index} ({frame.shape[1]}x{frame.shape[0]})")
            yield index, (torch.rot90(frame, turns, dims=(0, 1)) if turns else frame).clone()
    if number.skipped:
        frames = "1 frame" if number.skipped == 1 else f"{number.skipped} frames"
        progress.problems.insert(0, f"{frames} could not be decoded (damaged data), the other "
                                    f"{progress.frames_decoded} were")


def _counted(frames: Iterator[tuple[int, torch.Tensor]], progress: DecodeProgress,
             decoder: str) -> Iterator[tuple[int, torch.Tensor]]:
    """`frames`, counted in `progress.frames_by_decoder` (which decoder really decoded: decord hands over)."""
    for item in frames:
        progress.frames_by_decoder[decoder] = progress.frames_by_decoder.get(decoder, 0) + 1
        yield item


def _decord_frames(
    path: str, wanted: Callable[[int], bool], start: int, window: int, progress: DecodeProgress, threads: int
) -> Iterator[tuple[int, torch.Tensor]]:
    """(index, frame) for the wanted frames, read sequentially with next() in bounded windows.

    next() rather than get_batch(): it counts the frames really decodable instead of trusting the
    container's count, and stops cleanly at damage instead of failing a whole batch (setting
    `progress.stopped`). A rerun resumes at `start` with an accurate seek instead of decoding from
    frame 0.
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
        except decord.DECORDError:
            progress.stopped = finished = True
        finally:
            del reader
        yield from held
        if finished:
            return
        position = progress.frames_decoded


def _pyav_frames(
    path: str, info: VideoInfo, wanted: Callable[[int], bool], progress: DecodeProgress, threads: int,
    start: int = 0, end: int | None = None, planar: Yuv420 | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Frames in display order, each with its index among the shown frames, at the displayed size
    (with `planar`, as that layout's planes: the stream's own pixels, no conversion).

    Packets are decoded one by one so that a damaged one costs its own frames, not the rest of the
    video (as with ffmpeg); frames are numbered by their PTS among the stream's packets, so the
    frames after a gap keep their true index. A stream whose resolution changes midway is scaled
    to its first size. Where frames can be numbered by PTS, decoding seeks to the keyframe before
    `start`; it stops at the first frame from `end` on.
    """
    turns = _quarter_turns(info.rotation)
    width, height = (info.height, info.width) if info.rotation % 180 else (info.width, info.height)
    number = _FrameNumbering(info.frame_pts)
    keyframes = keyframe_indices(info)
    seek_to = None
    if start > 0 and keyframes is not None and keyframes.size and keyframes.min() <= start:
        seek_to = int(info.frame_pts[keyframes[keyframes <= start].max()])
    # One reformatter for the whole stream keeps its swscale context; frame.to_ndarray() builds a
    # new one per frame (slower: benchmarks/micro.md). One conversion thread: PyAV 17+ otherwise
    # starts one per CPU, also slower here; the decoder has its own threads.
    to_rgb = VideoReformatter()
    progress.frames_decoded = start if seek_to is not None else 0
    with av.open(path, metadata_errors=METADATA_ERRORS) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        stream.thread_count = threads
        first_after_seek = seek_to is not None
        if seek_to is not None:
            container.seek(seek_to, stream=stream, backward=True, any_frame=False)
            number.resync()
        for frames in _decoded_per_packet(container, stream, progress):
            for frame in frames:
                index = number(frame.pts)
                if index is None:
                    continue
                if first_after_seek and index > start:  # the container seeked past `start` (inexact seeking)
                    container.close()
                    yield from _pyav_frames(path, _without_keyframes(info), wanted, progress, threads, start, end,
                                            planar)
                    return
                first_after_seek = False
                if end is not None and index >= end:
                    return  # the decoder hands frames out in display order: every frame before `end` is out
                if seek_to is not None and index < start:
                    continue  # decoded from the keyframe only to reach `start`
                progress.frames_decoded += 1
                if not wanted(index):
                    continue
                if planar is not None:  # the first frame's format and coded size (a no-op but for a size change)
                    planes = to_rgb.reformat(frame, format=planar.pixel_format, width=planar.width, height=planar.height,
                                             threads=1).to_ndarray()
                    yield index, torch.from_numpy(planes)
                    continue
                rgb = to_rgb.reformat(frame, format="rgb24", width=width, height=height, threads=1).to_ndarray()
                yield index, torch.from_numpy(np.ascontiguousarray(np.rot90(rgb, turns)) if turns else rgb)
    if number.skipped:
        frames = "1 frame" if number.skipped == 1 else f"{number.skipped} frames"
        progress.problems.insert(0, f"{frames} could not be decoded (damaged data), the other "
                                    f"{progress.frames_decoded} were")


def _without_keyframes(info: VideoInfo) -> VideoInfo:
    return dataclasses.replace(info, keyframe_pts=None)


def _decoded_per_packet(container, stream, progress: DecodeProgress) -> Iterator[list]:
    """Each packet's decoded frames, then the decoder's held-back ones; damaged packets are skipped."""
    packets = container.demux(stream)
    while True:
        try:
            packet = next(packets)
        except StopIteration:
            break
        except av.error.FFmpegError as exc:  # the container itself is unreadable from here on
            progress.problems.append(f"reading stopped after frame {progress.frames_decoded}: {_reason(exc)}")
            break
        if packet.size == 0:
            continue
        try:
            yield stream.decode(packet)
        except av.error.FFmpegError:
            continue  # its frames are missing: counted as gaps by the numbering
    try:
        yield stream.decode(None)
    except av.error.FFmpegError:
        return


class _FrameNumbering:
    """A decoded frame's index among the shown frames, from its PTS; counts the frames skipped."""

    def __init__(self, frame_pts: np.ndarray | None):
        # Repeated stamps (streams joined byte for byte restart their clock) say nothing about order:
        # then frames are numbered as they come.
        self.frame_pts = frame_pts if _stamps_unique(frame_pts) else None
        self.next = 0
        self.skipped = 0
        self.placed = 0  # frames numbered by their PTS so far
        self.resynced = False

    def resync(self) -> None:
        """After a seek: the next frame is numbered by its PTS alone, and the frames before it are not gaps."""
        self.next, self.resynced = 0, True

    def __call__(self, pts: int | None) -> int | None:
        """The frame's index, or None for a frame to leave out: once frames are being placed by their PTS,
        one whose PTS places it nowhere new (a decoder's stand-in for damaged data, a repeat) would
        otherwise shift every later index."""
        index = self.next
        if pts is not None and self.frame_pts is not None:
            found = int(np.searchsorted(self.frame_pts, pts))
            if found < len(self.frame_pts) and self.frame_pts[found] == pts and found >= self.next:
                index = found
                self.placed += 1
            elif self.placed:
                return None
        if not self.resynced:
            self.skipped += index - self.next
        self.resynced = False
        self.next = index + 1
        return index


def _scan(container, stream, codec: str) -> tuple[Any, np.ndarray | None, int, np.ndarray | None]:
    """One pass over the packets, so a probe opens the file once: the first decoded frame (its size and
    rotation), the shown video packets' PTS in display order, how many packets an edit list hides, and
    the keyframes' PTS.

    Only the packets up to the first frame are decoded. Packets flagged discard (the lead-in before an
    edit list's start, which `ffmpeg -ss ... -c copy` leaves in the file) are never shown, so they are
    not frames. A damaged tail ends the scan with the stamps read so far (the decoder reports the
    damage); no decodable frame at all is a VideoError.
    """
    stamps: list[int] | None = []  # None once a packet has no timestamp at all
    keyframes: list[int] = []
    hidden = 0
    first = None
    packets = container.demux(stream)
    while True:
        try:
            packet = next(packets, None)
        except av.error.FFmpegError as exc:
            if first is None:
                raise VideoError(f"no decodable video frame ({codec}): {_reason(exc)}") from exc
            break  # damaged tail: keep the stamps read so far
        if first is None:
            try:  # demux ends with an empty packet, which flushes the decoder
                decoded = stream.decode(packet) if packet is not None else []
            except av.error.FFmpegError as exc:
                raise VideoError(f"no decodable video frame ({codec}): {_reason(exc)}") from exc
            first = decoded[0] if decoded else None
        if packet is None:
            break
        if packet.size == 0 or stamps is None:
            continue
        if packet.is_discard:
            hidden += 1
            continue
        stamp = packet.pts if packet.pts is not None else packet.dts
        if stamp is None:
            stamps = None  # no display order to go by; only the first frame is still looked for
            continue
        stamps.append(stamp)
        if packet.is_keyframe:
            keyframes.append(stamp)
    if first is None:
        raise VideoError(f"the video stream ({codec}) has no decodable frames")
    if not stamps:
        return first, None, hidden, None
    return first, np.sort(np.asarray(stamps, dtype=np.int64)), hidden, np.sort(np.asarray(keyframes, dtype=np.int64))


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


# What FFmpeg's demuxers and decoders answer for data they cannot parse, though no system call failed:
# said as what it means for a video file, with FFmpeg's own words after it.
_DAMAGE_ERRNOS = {errno.EIO, errno.EPERM, errno.EINVAL, errno.ENOMEM}


def _reason(exc: BaseException) -> str:
    said = getattr(exc, "strerror", None) or first_line(exc)
    if isinstance(exc, av.error.FFmpegError) and exc.errno in _DAMAGE_ERRNOS:
        return f"damaged or unsupported data ({said})"
    return said


__all__ = [
    "detected_frames", "keyframe_indices", "DecodeProgress", "FrameBatch", "NVDEC_CODECS", "VideoError", "VideoInfo",
    "iter_batches", "nvdec_installed", "nvdec_refusal", "probe", "timestamps_for",
]
