"""YUV 4:2:0 -> RGB on the model's device, so that a GPU box's decoders hand over the stream's own planes.

Converting to RGB costs PyAV more CPU than decoding itself on small frames and about 40% of a 720p frame's
(benchmarks/gpu.md); on a GPU it is a few elementwise kernels over planes that are half RGB's bytes to copy.
DeepStream and NVDEC hand over NV12 for the same reason. Where the model runs on the CPU, swscale stays
faster than any tensor code, so the decoder converts there (`colour_on_device`).

The conversion is swscale's (the CPU path's converter, which follows the stream's tags): BT.601 or BT.709
coefficients, limited or full range, each chroma sample reused for its 2x2 pixels; swscale's fixed-point
tables come out about half a level low, and so does this, so the frames are the CPU path's within
`LEVELS_FROM_SWSCALE` (tests/test_colour.py). Streams in other formats (4:2:2, 4:4:4, 10-bit, odd sizes,
BT.2020) are converted on the CPU as before (`planar_format` says which).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LEVELS_FROM_SWSCALE = 2  # the most any channel of any pixel differs from swscale's rgb24 (tested)

# Kr, Kb of each matrix swscale applies; an untagged stream is BT.601's, as swscale takes it.
_MATRICES = {"bt601": (0.299, 0.114), "bt709": (0.2126, 0.0722)}
# FFmpeg's AVColorSpace numbers: 1 BT.709; 2 unspecified, 5 BT.470BG, 6 SMPTE 170M are BT.601.
_MATRIX_OF_TAG = {1: "bt709", 2: "bt601", 5: "bt601", 6: "bt601"}
_PLANAR_420 = {"yuv420p": False, "yuvj420p": True}  # the pixel format -> full range whatever the tags say
_FULL_RANGE_TAG = 2  # AVCOL_RANGE_JPEG


@dataclass(frozen=True)
class Yuv420:
    """A video's frames as I420 planes: each (H * 3 / 2, W) uint8, the Y plane's H rows, then U's and V's
    (H / 2 x W / 2 each, packed in rows of W); in the coded orientation, turned when converted."""

    pixel_format: str  # FFmpeg's: yuv420p, or yuvj420p (full range)
    width: int  # coded
    height: int
    matrix: str  # a key of _MATRICES
    full_range: bool
    quarter_turns: int = 0  # counterclockwise, as np.rot90: the coded frame -> the displayed one

    @property
    def plane_shape(self) -> tuple[int, int]:
        return self.height * 3 // 2, self.width

    @property
    def displayed_size(self) -> tuple[int, int]:
        """(height, width) of the converted frames."""
        return (self.width, self.height) if self.quarter_turns % 2 else (self.height, self.width)


def planar_format(pixel_format: str, colorspace: int, color_range: int, width: int, height: int,
                  quarter_turns: int) -> Yuv420 | None:
    """How a stream's frames convert on the device, or None where only swscale converts them right."""
    if pixel_format not in _PLANAR_420 or colorspace not in _MATRIX_OF_TAG or width % 2 or height % 2:
        return None
    full_range = _PLANAR_420[pixel_format] or color_range == _FULL_RANGE_TAG
    return Yuv420(pixel_format, width, height, _MATRIX_OF_TAG[colorspace], full_range, quarter_turns % 4)


def planes_to_rgb(planes: torch.Tensor, layout: Yuv420) -> torch.Tensor:
    """uint8 I420 planes (B, H * 3 / 2, W), on any device -> uint8 RGB (B, H, W, 3), displayed orientation."""
    luma, chroma = split_planes(planes, layout)
    chroma = chroma.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    return yuv_to_rgb(luma, chroma[:, 0], chroma[:, 1], layout)


def split_planes(planes: torch.Tensor, layout: Yuv420) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of a batch's Y planes (B, H, W) and U and V planes (B, 2, H / 2, W / 2)."""
    batch, height, width = planes.shape[0], layout.height, layout.width
    flat = planes.reshape(batch, -1)
    return (flat[:, : height * width].reshape(batch, height, width),
            flat[:, height * width:].reshape(batch, 2, height // 2, width // 2))


def yuv_to_rgb(y: torch.Tensor, u: torch.Tensor, v: torch.Tensor, layout: Yuv420) -> torch.Tensor:
    """Pixels whose three samples are given (uint8, one shape (B, H, W)) -> uint8 RGB (B, H, W, 3), turned
    by `layout.quarter_turns`. A plug-in may pass a sample of the pixels (every 16th row and column of Y
    with every 8th of U and V are the same pixels' samples: `samples.StandInAccelerator`)."""
    kr, kb = _MATRICES[layout.matrix]
    kg = 1.0 - kr - kb
    luma, cb, cr = y.float(), u.float() - 128.0, v.float() - 128.0
    if not layout.full_range:
        luma = (luma - 16.0) * (255.0 / 219.0)
        cb, cr = cb * (255.0 / 224.0), cr * (255.0 / 224.0)
    rgb = torch.stack([luma + (2.0 - 2.0 * kr) * cr,
                       luma - (2.0 * kb * (1.0 - kb) / kg) * cb - (2.0 * kr * (1.0 - kr) / kg) * cr,
                       luma + (2.0 - 2.0 * kb) * cb], dim=-1)
    rgb = rgb.sub_(0.5).floor_().clamp_(0, 255).to(torch.uint8)  # swscale's half a level low
    return torch.rot90(rgb, layout.quarter_turns, dims=(1, 2)).contiguous() if layout.quarter_turns else rgb
