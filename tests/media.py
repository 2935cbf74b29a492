"""Awkward and bad input files, generated with PyAV (no ffmpeg binary needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from job.samples import scene, write_video

VFR_PTS_MS = [0, 40, 80, 200, 210, 220, 500, 540, 560, 600, 700, 710, 720, 730, 740, 800, 900, 1000, 1010, 1020]


def make_awkward_set(directory: Path) -> dict[str, dict]:
    """Every awkward/bad case, keyed by relative path, with what the job should report for it."""
    d = Path(directory)
    cases: dict[str, dict] = {}

    def add(rel: str, **expect):
        cases[rel] = expect

    write_video(d / "plain.mp4", 30, size=(160, 120))
    add("plain.mp4", status="ok", frame_count=30, width=160, height=120, codec="h264")

    write_video(d / "odd size.mp4", 6, size=(641, 479), pix_fmt="yuv444p")
    add("odd size.mp4", status="ok", frame_count=6, width=641, height=479, codec="h264")

    write_video(d / "rotated.mp4", 8, size=(160, 96), rotation=90)
    add("rotated.mp4", status="ok", frame_count=8, width=96, height=160, rotation=90)

    write_video(d / "vfr.mkv", len(VFR_PTS_MS), size=(128, 96), pts_ms=VFR_PTS_MS)
    add("vfr.mkv", status="ok", frame_count=len(VFR_PTS_MS), pts_ms=VFR_PTS_MS)

    write_video(d / "hevc10.mp4", 10, codec="libx265", pix_fmt="yuv420p10le", size=(128, 96),
                options={"x265-params": "log-level=none"})
    add("hevc10.mp4", status="ok", frame_count=10, codec="hevc")

    write_video(d / "vp9.webm", 10, codec="libvpx-vp9", size=(128, 96))
    add("vp9.webm", status="ok", frame_count=10, codec="vp9")

    write_video(d / "mjpeg.AVI", 10, codec="mjpeg", pix_fmt="yuvj420p", size=(128, 96))
    add("mjpeg.AVI", status="ok", frame_count=10, codec="mjpeg")

    write_video(d / "streams.mkv", 12, size=(128, 96), audio=True, subtitles=True)
    add("streams.mkv", status="ok", frame_count=12)

    write_video(d / "one frame.mp4", 1, size=(128, 96))
    add("one frame.mp4", status="ok", frame_count=1)

    long_mkv = write_video(d / "tmp-long.mkv", 120, size=(128, 96))
    data = long_mkv.read_bytes()
    long_mkv.unlink()
    (d / "truncated.mkv").write_bytes(data[: len(data) // 2])
    add("truncated.mkv", status="partial", error_contains="truncated")

    long_mp4 = write_video(d / "tmp-long.mp4", 60, size=(128, 96))
    data = long_mp4.read_bytes()
    long_mp4.unlink()
    (d / "truncated.mp4").write_bytes(data[: len(data) // 2])  # index (moov) at the end: unreadable
    add("truncated.mp4", status="failed", error_contains="not a readable video")

    (d / "zero.mp4").write_bytes(b"")
    add("zero.mp4", status="failed", error_contains="empty file")

    (d / "notes.mov").write_bytes(b"these bytes are not a video " * 50)
    add("notes.mov", status="failed", error_contains="not a readable video")

    _audio_only(d / "audio only.m4v")
    add("audio only.m4v", status="failed", error_contains="no video stream")

    (d / "ünïcode dir").mkdir(exist_ok=True)
    write_video(d / "ünïcode dir" / "café clip.mov", 5, size=(128, 96))
    add("ünïcode dir/café clip.mov", status="ok", frame_count=5)

    (d / "readme.txt").write_text("not a video extension; must be ignored")
    return cases


def _audio_only(path: Path) -> None:
    import av

    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=44100)
        samples = np.zeros((1, 1024), dtype=np.float32)
        for k in range(20):
            frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 44100, k * 1024
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


__all__ = ["VFR_PTS_MS", "make_awkward_set", "scene", "write_video"]


def cut_without_reencoding(source: Path, target: Path, keyframe: int, cut: int, fps: int = 25) -> Path:
    """What `ffmpeg -ss <cut> -c copy` makes: packets from the keyframe before the cut, shifted so
    the cut is at 0; the lead-in gets negative stamps, which the MP4 muxer hides with an edit list."""
    import av

    with av.open(str(source)) as src, av.open(str(target), "w") as dst:
        stream_in = src.streams.video[0]
        stream_out = dst.add_stream_from_template(stream_in)
        ticks_per_frame = int(1 / (stream_in.time_base * fps))
        for packet in src.demux(stream_in):
            if packet.size == 0 or packet.pts < keyframe * ticks_per_frame:
                continue
            packet.pts -= cut * ticks_per_frame
            packet.dts -= cut * ticks_per_frame
            packet.stream = stream_out
            dst.mux(packet)
    return target


def overwrite_middle(source: Path, target: Path, nbytes: int = 4096, seed: int = 0,
                     offset_fraction: float = 0.5) -> Path:
    """A copy of `source` with `nbytes` of random garbage at `offset_fraction` of it (a bad sector, a torn write)."""
    data = bytearray(source.read_bytes())
    middle = int(len(data) * offset_fraction)
    data[middle:middle + nbytes] = np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8).tobytes()
    target.write_bytes(bytes(data))
    return target
