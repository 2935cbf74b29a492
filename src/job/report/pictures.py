"""One pass over a video's first frames: the annotated preview (H.264 with PyAV) and the contact sheet's frames."""

from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np
import polars as pl
import torch
from PIL import Image, ImageDraw
from torchvision.utils import make_grid

from job.decode import VideoInfo, iter_batches
from job.report.draw import Overlay, annotate, draw_overlays

SHEET_TILE_WIDTH = 480


def render(path: str, info: VideoInfo, rows: pl.DataFrame, frame_stride: int, preview_seconds: float | None,
           sheet_indices: list[int], preview_file: str,
           overlays: list[Overlay] | None = None) -> list[tuple[int, float, torch.Tensor]]:
    """Writes preview_file; returns the sheet's frames annotated, as (frame_index, timestamp_s, frame).

    A frame the detector did not see (frame_stride) shows the boxes of the last frame it saw, as a
    viewer expects from boxes that stay on screen between detections. `overlays`: counting lines and zones.
    """
    by_frame = {key[0]: group for key, group in rows.group_by("frame_index")}
    empty = rows.clear()
    wanted = set(sheet_indices)
    last_sheet = max(sheet_indices, default=-1)
    sheet: list[tuple[int, float, torch.Tensor]] = []
    shown = empty
    with _Preview(preview_file, info) as preview:
        for batch in iter_batches(path, info, batch_size=8):
            for index, timestamp, frame in zip(batch.frame_indices.tolist(), batch.timestamps_s.tolist(),
                                               batch.frames, strict=True):
                if index % frame_stride == 0:
                    shown = by_frame.get(index, empty)
                in_preview = preview_seconds is None or timestamp < preview_seconds
                if in_preview:
                    preview.add(draw_overlays(annotate(frame, shown), overlays or []), timestamp)
                if index in wanted:
                    sheet.append((index, timestamp, draw_overlays(annotate(frame, by_frame.get(index, empty)),
                                                                  overlays or [])))
                if not in_preview and index >= last_sheet:
                    return sheet
    return sheet


class _Preview:
    """An H.264 MP4 (yuv420p, which browsers play) at the video's displayed size and frame rate,
    each frame at its source timestamp (millisecond precision)."""

    def __init__(self, path: str, info: VideoInfo):
        self.container = av.open(path, "w")
        rate = Fraction(info.fps).limit_denominator(1001) if info.fps else Fraction(25)
        self.stream = self.container.add_stream("libx264", rate=rate, options={"crf": "20", "preset": "veryfast"})
        # 4:2:0 needs even sides: an odd one is padded by a black pixel.
        self.stream.width, self.stream.height = info.width + info.width % 2, info.height + info.height % 2
        self.stream.pix_fmt = "yuv420p"
        self.stream.codec_context.time_base = Fraction(1, 1000)
        self.last_pts = -1

    def add(self, frame: torch.Tensor, timestamp_s: float) -> None:
        pixels = frame.numpy()
        height, width = pixels.shape[:2]
        if (width, height) != (self.stream.width, self.stream.height):
            pixels = np.pad(pixels, ((0, self.stream.height - height), (0, self.stream.width - width), (0, 0)))
        video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb24")
        video_frame.pts = max(round(timestamp_s * 1000), self.last_pts + 1)
        video_frame.time_base = Fraction(1, 1000)
        self.last_pts = video_frame.pts
        for packet in self.stream.encode(video_frame):
            self.container.mux(packet)

    def __enter__(self) -> _Preview:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            for packet in self.stream.encode():
                self.container.mux(packet)
        finally:
            self.container.close()


def contact_sheet(frames: list[tuple[int, float, torch.Tensor]]) -> bytes:
    """The annotated frames in a grid, each with its time, as JPEG bytes."""
    tiles = []
    for _, timestamp, frame in sorted(frames, key=lambda item: item[0]):
        image = Image.fromarray(frame.numpy())
        scale = SHEET_TILE_WIDTH / image.width
        image = image.resize((SHEET_TILE_WIDTH, max(1, round(image.height * scale))))
        draw = ImageDraw.Draw(image)
        label = f"{int(timestamp // 60)}:{timestamp % 60:06.3f}"
        draw.rectangle((0, 0, 8 + 7 * len(label), 16), fill=(0, 0, 0))
        draw.text((4, 2), label, fill=(255, 255, 255))
        tiles.append(torch.from_numpy(np.array(image)).permute(2, 0, 1))
    height = max(tile.shape[1] for tile in tiles)
    tiles = [torch.nn.functional.pad(tile, (0, 0, 0, height - tile.shape[1])) for tile in tiles]
    grid = make_grid(tiles, nrow=min(3, len(tiles)), padding=4, pad_value=255)
    buffer = io.BytesIO()
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def sheet_frames(rows: pl.DataFrame, count: int) -> list[int]:
    """The frames with the most detections (earliest first among equals)."""
    per_frame = rows.group_by("frame_index").len().sort(["len", "frame_index"], descending=[True, False])
    return sorted(per_frame["frame_index"].head(count).to_list())
