"""colour: the device's YUV -> RGB gives swscale's frames (the CPU path's) within LEVELS_FROM_SWSCALE."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from media import make_awkward_set

from job.colour import LEVELS_FROM_SWSCALE, Yuv420, planes_to_rgb, yuv_to_rgb
from job.decode import iter_batches, probe
from job.samples import scene, write_video

# (pixel format, colour tags, the matrix and range swscale applies to such a stream)
STREAMS = {
    "untagged": ("yuv420p", None, "bt601", False),
    "bt709": ("yuv420p", (1, 1), "bt709", False),
    "bt601 full range": ("yuv420p", (6, 2), "bt601", True),
    "yuvj420p": ("yuvj420p", None, "bt601", True),
}


def noisy_scenes(count, width, height):
    """Scenes with sensor-like noise: every level of every channel is met, not a few flat colours."""
    rng = np.random.default_rng(1)
    return [np.clip(scene(i, width, height) + rng.integers(-40, 41, (height, width, 3)), 0, 255).astype(np.uint8)
            for i in range(count)]


def both_ways(path, **options):
    info = probe(str(path))
    rgb = torch.cat([b.frames for b in iter_batches(str(path), info, batch_size=4, **options)])
    batches = list(iter_batches(str(path), info, batch_size=4, planar=True, **options))
    return info, rgb, batches


@pytest.mark.parametrize("name", list(STREAMS))
def test_converted_planes_are_swscales_frames(tmp_path, name):
    pix_fmt, tags, matrix, full_range = STREAMS[name]
    path = write_video(tmp_path / "v.mp4", noisy_scenes(6, 96, 64), pix_fmt=pix_fmt, colour_tags=tags)
    info, rgb, batches = both_ways(path)
    assert info.planar is not None and (info.planar.matrix, info.planar.full_range) == (matrix, full_range)
    assert all(b.planar == info.planar and b.frames.shape[1:] == (96, 96) for b in batches)  # (64 * 3 / 2, 96)
    converted = torch.cat([planes_to_rgb(b.frames, b.planar) for b in batches])
    difference = (converted.int() - rgb.int()).abs()
    assert difference.max() <= LEVELS_FROM_SWSCALE
    assert difference.float().mean() < 0.5
    # Not a loose check passing anything: the other matrix is far off.
    other = Yuv420(info.planar.pixel_format, 96, 64, "bt709" if matrix == "bt601" else "bt601", full_range)
    assert (torch.cat([planes_to_rgb(b.frames, other) for b in batches]).int() - rgb.int()).abs().max() > 10


def test_a_rotated_stream_is_turned_as_displayed(tmp_path):
    path = write_video(tmp_path / "phone.mp4", noisy_scenes(5, 96, 64), rotation=90)
    info, rgb, batches = both_ways(path, frame_stride=2)
    assert info.planar.quarter_turns == 1 and batches[0].frames.shape[1:] == (96, 96)
    converted = torch.cat([planes_to_rgb(b.frames, b.planar) for b in batches])
    assert converted.shape == rgb.shape == (3, 96, 64, 3)
    assert (converted.int() - rgb.int()).abs().max() <= LEVELS_FROM_SWSCALE


def test_a_segment_of_planes_has_the_frames_of_the_whole_video(tmp_path):
    path = write_video(tmp_path / "v.mp4", noisy_scenes(30, 64, 48), options={"g": "10"})
    info = probe(str(path))
    whole = torch.cat([b.frames for b in iter_batches(str(path), info, batch_size=8, planar=True)])
    segment = list(iter_batches(str(path), info, batch_size=8, planar=True, start_frame=12, end_frame=25))
    assert np.concatenate([b.frame_indices for b in segment]).tolist() == list(range(12, 25))
    assert torch.equal(torch.cat([b.frames for b in segment]), whole[12:25])


@pytest.mark.parametrize("case", ["yuv444p", "odd size"])
def test_streams_the_device_cannot_convert_come_as_rgb(tmp_path, case):
    if case == "yuv444p":
        path = write_video(tmp_path / "v.mp4", 4, size=(64, 48), pix_fmt="yuv444p")
    else:
        path = write_video(tmp_path / "v.mkv", [np.zeros((48, 63, 3), np.uint8)] * 4, codec="ffv1", pix_fmt="yuv420p")
    info = probe(str(path))
    assert info.planar is None
    batches = list(iter_batches(str(path), info, batch_size=4, planar=True))
    assert [b.planar for b in batches] == [None] and batches[0].frames.shape == (4, info.height, info.width, 3)


def test_sampled_pixels_convert_as_the_whole_frame_does():
    """What `samples.StandInAccelerator` relies on: every 16th pixel of Y with every 8th of U and V."""
    layout = Yuv420("yuv420p", 64, 32, "bt601", False)
    planes = torch.randint(0, 256, (2, 48, 64), dtype=torch.uint8)
    whole = planes_to_rgb(planes, layout)
    y = planes[:, :32].reshape(2, 32, 64)
    u = planes[:, 32:40].reshape(2, 16, 32)
    v = planes[:, 40:].reshape(2, 16, 32)
    assert torch.equal(yuv_to_rgb(y[:, ::16, ::16], u[:, ::8, ::8], v[:, ::8, ::8], layout), whole[:, ::16, ::16])


def test_every_awkward_video_converts_as_swscale_or_comes_as_rgb(tmp_path):
    """Codecs, MJPEG's full range, rotation, variable frame rate, damage: the same frames either way."""
    cases = make_awkward_set(tmp_path)
    converted = 0
    for name, expect in cases.items():
        if expect["status"] == "failed":
            continue
        info, rgb, batches = both_ways(tmp_path / name)
        frames = torch.cat([planes_to_rgb(b.frames, b.planar) if b.planar else b.frames for b in batches])
        assert frames.shape == rgb.shape, name
        assert (frames.int() - rgb.int()).abs().max() <= LEVELS_FROM_SWSCALE, name
        converted += info.planar is not None
    assert converted >= 8


@pytest.mark.cuda
def test_a_gpu_converts_as_the_cpu_does():
    layout = Yuv420("yuv420p", 64, 32, "bt709", False, quarter_turns=1)
    planes = torch.randint(0, 256, (3, 48, 64), dtype=torch.uint8)
    on_gpu = planes_to_rgb(planes.cuda(), layout).cpu()
    assert (on_gpu.int() - planes_to_rgb(planes, layout).int()).abs().max() <= 1  # fused multiply-adds may round
