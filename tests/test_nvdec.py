"""decoder=nvdec: what it refuses, how it hands over to PyAV, the missing extra; on a GPU, NVDEC itself.

Without a GPU, NVDEC's part is played by `nvdec_stand_in/PyNvVideoCodec` (PyAV behind PyNvVideoCodec's
calls), so the handover is checked for the frames it keeps: every index exactly once, in order.
"""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cli import run_cli
from media import make_awkward_set

from job.decode import DecodeProgress, iter_batches, nvdec_installed, nvdec_refusal, probe
from job.samples import write_video

STAND_IN = Path(__file__).parent / "nvdec_stand_in"
CUDA = torch.device("cuda")


def decode(path, decoder, device, batch_size=4, start=0, end=None, stride=1):
    info = probe(str(path))
    progress = DecodeProgress()
    batches = list(iter_batches(str(path), info, batch_size=batch_size, decoder=decoder, progress=progress,
                                device=device, start_frame=start, end_frame=end, frame_stride=stride))
    indices = np.concatenate([b.frame_indices for b in batches]) if batches else np.array([], dtype=np.int64)
    stamps = np.concatenate([b.timestamps_s for b in batches]) if batches else np.array([])
    return indices, stamps, batches, progress


@pytest.fixture
def stand_in(monkeypatch):
    """The stand-in importable as PyNvVideoCodec, its failure switch off."""
    monkeypatch.syspath_prepend(str(STAND_IN))
    module = importlib.import_module("PyNvVideoCodec")
    assert module.__file__.startswith(str(STAND_IN))
    monkeypatch.setattr(module, "FAIL_AFTER_FRAMES", None)
    monkeypatch.setattr(module, "frames_handed_out", 0)
    yield module
    sys.modules.pop("PyNvVideoCodec", None)


def test_what_nvdec_is_not_given(tmp_path):
    info = probe(str(write_video(tmp_path / "a.mp4", 4, size=(64, 48))))
    assert "CUDA device" in nvdec_refusal(info, torch.device("cpu"), 0)
    assert "CUDA device" in nvdec_refusal(info, None, 0)
    assert "midway" in nvdec_refusal(info, CUDA, 12)
    ffv1 = probe(str(write_video(tmp_path / "b.mkv", 4, size=(64, 48), codec="ffv1", pix_fmt="yuv420p")))
    assert nvdec_refusal(ffv1, CUDA, 0) == "NVDEC does not decode ffv1"


@pytest.mark.skipif(nvdec_installed(), reason="PyNvVideoCodec is installed here")
def test_without_the_extra_a_video_is_decoded_by_pyav_and_says_what_to_install(tmp_path):
    info = probe(str(write_video(tmp_path / "a.mp4", 4, size=(64, 48))))
    assert nvdec_refusal(info, CUDA, 0) == "PyNvVideoCodec is not installed (pip install 'job[nvdec]')"


def test_a_worker_without_a_gpu_decodes_with_pyav_and_logs_why(tmp_path, stand_in, caplog):
    path = write_video(tmp_path / "a.mp4", 10, size=(64, 48))
    expected, stamps, reference, _ = decode(path, "pyav", None)
    with caplog.at_level(logging.WARNING, logger="job.decode"):
        indices, got_stamps, batches, progress = decode(path, "nvdec", torch.device("cpu"))
    assert indices.tolist() == expected.tolist() == list(range(10))
    np.testing.assert_array_equal(got_stamps, stamps)
    assert progress.frames_by_decoder == {"pyav": 10}
    assert all(torch.equal(a.frames, b.frames) for a, b in zip(batches, reference, strict=True))
    assert "a.mp4: decoding with PyAV from frame 0: NVDEC decodes on a CUDA device" in caplog.text


def test_nvdec_frames_are_numbered_as_pyav_numbers_them(tmp_path, stand_in):
    directory = tmp_path / "awkward"
    directory.mkdir()
    cases = make_awkward_set(directory)
    for rel in ("plain.mp4", "rotated.mp4", "vfr.mkv", "streams.mkv", "one frame.mp4"):
        assert cases[rel]["status"] == "ok"
        expected, stamps, reference, want = decode(directory / rel, "pyav", None)
        indices, got_stamps, batches, progress = decode(directory / rel, "nvdec", CUDA)
        assert indices.tolist() == expected.tolist(), rel
        np.testing.assert_array_equal(got_stamps, stamps)
        assert progress.frames_by_decoder == {"nvdec": len(expected)}, rel
        assert progress.frames_decoded == want.frames_decoded and progress.damage is None, rel
        for got, ref in zip(batches, reference, strict=True):  # the stand-in converts colour as swscale does
            assert got.frames.shape == ref.frames.shape, rel
            assert (got.frames.int() - ref.frames.int()).abs().float().mean() < 2, rel


@pytest.mark.parametrize("fail_after", [0, 5, 8])
def test_nvdec_failing_midway_hands_over_to_pyav_losing_and_repeating_no_frame(tmp_path, stand_in, fail_after,
                                                                                 caplog):
    path = write_video(tmp_path / "a.mp4", 23, size=(64, 48))
    expected, stamps, _, _ = decode(path, "pyav", None)
    stand_in.FAIL_AFTER_FRAMES = fail_after
    with caplog.at_level(logging.WARNING, logger="job.decode"):
        indices, got_stamps, batches, progress = decode(path, "nvdec", CUDA, batch_size=4)
    assert indices.tolist() == expected.tolist() == list(range(23))
    np.testing.assert_array_equal(got_stamps, stamps)
    assert progress.frames_decoded == 23 and progress.damage is None
    handed_out = {"nvdec": fail_after} if fail_after else {}
    assert progress.frames_by_decoder == {**handed_out, "pyav": 23 - fail_after}
    assert all(len(b.frame_indices) <= 4 for b in batches)
    assert f"decoding with PyAV from frame {fail_after}: NVDEC stopped after {fail_after} frames" in caplog.text
    assert "unsupported profile" in caplog.text


def test_nvdec_keeps_the_stride_and_stops_at_the_end_of_a_segment(tmp_path, stand_in):
    path = write_video(tmp_path / "a.mp4", 30, size=(64, 48))
    indices, _, _, progress = decode(path, "nvdec", CUDA, end=17, stride=3)
    assert indices.tolist() == list(range(0, 17, 3))
    assert progress.frames_by_decoder == {"nvdec": 6}


def test_decoder_nvdec_without_its_extra_is_one_line_and_exit_2(tmp_path):
    if nvdec_installed():
        pytest.skip("PyNvVideoCodec is installed here")
    write_video(tmp_path / "videos" / "a.mp4", 4, size=(64, 48))
    result = run_cli(f"video_dir={tmp_path / 'videos'}", f"output_dir={tmp_path / 'out'}", "decoder=nvdec")
    assert result.returncode == 2, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert result.output.strip().endswith("decoder=nvdec needs NVIDIA's PyNvVideoCodec: pip install 'job[nvdec]' "
                                          "(or use decoder=pyav)")
    assert not (tmp_path / "out" / "predictions").exists()


def test_decoder_nvdec_on_device_cpu_is_one_line_and_exit_2(tmp_path):
    write_video(tmp_path / "videos" / "a.mp4", 4, size=(64, 48))
    result = run_cli(f"video_dir={tmp_path / 'videos'}", f"output_dir={tmp_path / 'out'}", "decoder=nvdec",
                     "device=cpu")
    assert result.returncode == 2, result.output
    assert "decoder=nvdec decodes on an NVIDIA GPU; use device=auto or device=cuda" in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


@pytest.mark.cuda
def test_nvdec_gives_pyavs_frame_indices_and_timestamps(tmp_path):
    """On a GPU with the extra: NVDEC itself, on the awkward set; a video it cannot take falls back."""
    if not nvdec_installed():
        pytest.skip("needs PyNvVideoCodec (pip install 'job[nvdec]')")
    directory = tmp_path / "awkward"
    directory.mkdir()
    cases = make_awkward_set(directory)
    decoded_by_nvdec = 0
    for rel, expect in cases.items():
        if expect["status"] != "ok":
            continue
        expected, stamps, reference, want = decode(directory / rel, "pyav", None)
        indices, got_stamps, batches, progress = decode(directory / rel, "nvdec", CUDA)
        assert indices.tolist() == expected.tolist(), rel
        np.testing.assert_array_equal(got_stamps, stamps)
        assert progress.frames_decoded == want.frames_decoded, rel
        decoded_by_nvdec += progress.frames_by_decoder.get("nvdec", 0)
        for got, ref in zip(batches, reference, strict=True):
            assert got.frames.shape == ref.frames.shape, rel
            if progress.frames_by_decoder.get("nvdec"):
                assert got.frames.device.type == "cuda", rel
            # NVDEC's colour conversion is its own: close to swscale's, not equal
            assert (got.frames.cpu().int() - ref.frames.int()).abs().float().mean() < 6, rel
    assert decoded_by_nvdec > 0
