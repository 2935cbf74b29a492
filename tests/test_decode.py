"""decode: frame counts, timestamps, rotation and failures, checked against what the tests wrote."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from media import VFR_PTS_MS, cut_without_reencoding, make_awkward_set, overwrite_middle

from job.decode import BatchBuffers, DecodeProgress, VideoError, iter_batches, probe, timestamps_for
from job.samples import scene, write_video


@pytest.fixture(scope="module")
def awkward(tmp_path_factory):
    directory = tmp_path_factory.mktemp("awkward")
    return directory, make_awkward_set(directory)


# Both decoders are held to the same behaviour: PyAV (the default) and decord (decoder=decord).
DECODERS = pytest.mark.parametrize("decoder", ["pyav", "decord"])


def decode_all(path, batch_size=4, stride=1, start=0, decoder="pyav"):
    info = probe(str(path))
    progress = DecodeProgress()
    batches = list(iter_batches(str(path), info, batch_size=batch_size, frame_stride=stride, start_frame=start,
                              decoder=decoder, progress=progress))
    return info, progress, batches


@DECODERS
def test_every_readable_case_decodes_all_its_frames(decoder, awkward):
    directory, cases = awkward
    for rel, expect in cases.items():
        if expect["status"] != "ok":
            continue
        info, progress, batches = decode_all(directory / rel, decoder=decoder)
        assert progress.damage is None, rel
        assert progress.frames_decoded == expect["frame_count"], rel
        indices = np.concatenate([b.frame_indices for b in batches])
        assert indices.tolist() == list(range(expect["frame_count"])), rel
        for batch in batches:
            assert batch.frames.shape[1:] == (info.height, info.width, 3), rel
        for key in ("width", "height", "codec", "rotation"):
            if key in expect:
                assert getattr(info, key) == expect[key], (rel, key)


@DECODERS
def test_variable_frame_rate_timestamps_match_written_pts(decoder, awkward):
    directory, _ = awkward
    _, _, batches = decode_all(directory / "vfr.mkv", decoder=decoder)
    stamps = np.concatenate([b.timestamps_s for b in batches])
    np.testing.assert_allclose(stamps, np.asarray(VFR_PTS_MS) / 1000.0, atol=1e-6)


@DECODERS
def test_vfr_mp4_timestamps_match_written_pts(decoder, tmp_path):
    path = write_video(tmp_path / "vfr.mp4", len(VFR_PTS_MS), size=(64, 48), pts_ms=VFR_PTS_MS)
    _, _, batches = decode_all(path, batch_size=3, stride=2, decoder=decoder)
    stamps = np.concatenate([b.timestamps_s for b in batches])
    np.testing.assert_allclose(stamps, np.asarray(VFR_PTS_MS[::2]) / 1000.0, atol=1e-3)


def test_rotation_is_applied_so_frames_are_as_displayed(tmp_path):
    source = [scene(i, 160, 96, seed=3) for i in range(4)]
    path = write_video(tmp_path / "portrait.mp4", source, rotation=90, pix_fmt="yuv444p")
    info, _, batches = decode_all(path)
    assert (info.width, info.height, info.rotation) == (96, 160, 90)
    frame = batches[0].frames[0].numpy().astype(int)
    displayed = np.rot90(source[0], 1).astype(int)  # display matrix 90 = a quarter turn counterclockwise
    wrong_way = np.rot90(source[0], -1).astype(int)
    assert np.abs(frame - displayed).mean() < 4
    assert np.abs(frame - wrong_way).mean() > 20


@DECODERS
def test_frame_stride_and_start_frame(decoder, awkward):
    directory, _ = awkward
    _, progress, batches = decode_all(directory / "plain.mp4", batch_size=4, stride=7, start=8, decoder=decoder)
    indices = np.concatenate([b.frame_indices for b in batches]).tolist()
    assert indices == [14, 21, 28]
    assert progress.frames_decoded == 30  # counting continues through skipped frames


def test_decord_and_pyav_backends_agree(awkward):
    directory, _ = awkward
    _, decord_progress, by_decord = decode_all(directory / "plain.mp4", decoder="decord")
    _, pyav_progress, by_pyav = decode_all(directory / "plain.mp4", decoder="pyav")
    a = np.concatenate([b.frames.numpy() for b in by_decord]).astype(int)
    b = np.concatenate([b.frames.numpy() for b in by_pyav]).astype(int)
    # Each decoder really decoded every frame: decord hands over to PyAV silently where it is not trusted.
    assert decord_progress.frames_by_decoder == {"decord": len(a)}
    assert pyav_progress.frames_by_decoder == {"pyav": len(b)}
    assert a.shape == b.shape
    assert np.abs(a - b).mean() < 3


@DECODERS
def test_truncated_file_decodes_frames_before_the_damage(decoder, awkward):
    directory, _ = awkward
    info, progress, batches = decode_all(directory / "truncated.mkv", decoder=decoder)
    assert 0 < progress.frames_decoded < 120
    assert info.duration_s > 4.0  # the container still promises the whole video
    assert sum(len(b.frame_indices) for b in batches) == progress.frames_decoded


@pytest.mark.parametrize(
    "rel, message",
    [
        ("zero.mp4", "empty file"),
        ("notes.mov", "not a readable video"),
        ("audio only.m4v", "no video stream"),
        ("truncated.mp4", "not a readable video"),
    ],
)
def test_unreadable_files_raise_a_plain_reason(awkward, rel, message):
    directory, _ = awkward
    with pytest.raises(VideoError, match=message):
        probe(str(directory / rel))


@DECODERS
def test_batches_never_exceed_batch_size(decoder, awkward):
    directory, _ = awkward
    _, _, batches = decode_all(directory / "plain.mp4", batch_size=8, decoder=decoder)
    assert [len(b.frame_indices) for b in batches] == [8, 8, 8, 6]


def test_timestamps_extrapolate_past_known_pts():
    from job.decode import VideoInfo

    info = VideoInfo(10, 10, 10.0, 1.0, "h264", 0, None, np.array([0.0, 0.1, 0.25]))
    np.testing.assert_allclose(timestamps_for(np.array([0, 2, 3, 5]), info), [0.0, 0.25, 0.35, 0.55])


@pytest.mark.parametrize("name, kwargs", [
    ("gops.mp4", {"options": {"g": "12", "bf": "2"}}),
    ("vfr gops.mkv", {"options": {"g": "5"}, "pts_ms": None}),
])
def test_windowed_decord_decode_equals_sequential_pyav(tmp_path, name, kwargs):
    """Readers are reopened every few frames (a bound on decord's read-ahead); frames must not shift."""
    pts = [int(i * 33 + (i % 4) * 7) for i in range(60)]
    rng = np.random.default_rng(7)  # every frame distinct, so a shift by one frame cannot pass
    frames = [np.kron(rng.integers(0, 255, (8, 12, 3)), np.ones((8, 8, 1))).astype(np.uint8) for _ in range(60)]
    path = write_video(tmp_path / name, frames, fps=30,
                       **{**kwargs, "pts_ms": pts if "pts_ms" in kwargs else None})
    info = probe(str(path))
    for start, stride, window in [(0, 1, 7), (10, 3, 5), (13, 1, 16), (59, 1, 4)]:
        progress = DecodeProgress()
        ours = list(iter_batches(str(path), info, batch_size=4, frame_stride=stride, start_frame=start,
                                 decoder="decord", progress=progress, window_frames=window))
        reference = list(iter_batches(str(path), info, batch_size=4, frame_stride=stride, start_frame=start,
                                      decoder="pyav"))
        assert progress.frames_decoded == 60
        got = np.concatenate([b.frame_indices for b in ours]).tolist()
        assert got == [i for i in range(start, 60) if i % stride == 0], (start, stride, window)
        a = np.concatenate([b.frames.numpy() for b in ours]).astype(int)
        b = np.concatenate([b.frames.numpy() for b in reference]).astype(int)
        assert a.shape == b.shape
        per_frame = np.abs(a - b).reshape(len(a), -1).mean(axis=1)
        assert per_frame.max() < 3, (start, stride, window, per_frame.round(1))


@pytest.mark.parametrize("decoder", ["decord", "pyav"])
def test_decoder_threads_do_not_change_the_frames(tmp_path, decoder):
    """Inline decoding uses all the actor's cores; frame threading must be bit-exact, in order."""
    rng = np.random.default_rng(3)
    frames = [np.kron(rng.integers(0, 255, (6, 8, 3)), np.ones((8, 8, 1))).astype(np.uint8) for _ in range(40)]
    path = str(write_video(tmp_path / "threads.mp4", frames, fps=25, options={"g": "10", "bf": "2"}))
    info = probe(path)
    one, two = ([b for b in iter_batches(path, info, batch_size=8, decoder=decoder, threads=n, window_frames=16)]
                for n in (1, 2))
    assert np.concatenate([b.frame_indices for b in two]).tolist() == list(range(40))
    assert torch.equal(torch.cat([b.frames for b in one]), torch.cat([b.frames for b in two]))


def test_batches_handed_back_are_written_into_again_and_the_others_never(tmp_path):
    """The job decodes into batch buffers it hands back once detected; one still held must not change."""
    rng = np.random.default_rng(4)
    frames = [np.kron(rng.integers(0, 255, (6, 8, 3)), np.ones((8, 8, 1))).astype(np.uint8) for _ in range(40)]
    path = str(write_video(tmp_path / "reuse.mp4", frames, fps=25, options={"g": "10"}))
    info = probe(path)
    fresh = [b.frames.clone() for b in iter_batches(path, info, batch_size=8)]
    buffers = BatchBuffers(keep=2)
    held, pointers, copies = None, [], []
    for i, batch in enumerate(iter_batches(path, info, batch_size=8, buffers=buffers)):
        pointers.append(batch.frames.data_ptr())
        copies.append(batch.frames.clone())
        if i == 1:
            held = batch  # kept, as a consumer still reading it would
        else:
            buffers.give_back(batch)
    assert all(torch.equal(a, b) for a, b in zip(copies, fresh, strict=True))
    assert torch.equal(held.frames, fresh[1])  # never written into by the batches after it
    assert pointers[1] not in pointers[2:] and len(set(pointers)) == 2  # reused, except the one held


def joined_streams(tmp_path):
    """Two MPEG-TS streams of different sizes, concatenated byte for byte (as a camera that switches does)."""
    first = write_video(tmp_path / "a.ts", [scene(i, 160, 120) for i in range(20)], size=(160, 120))
    second = write_video(tmp_path / "b.ts", [scene(i, 320, 240) for i in range(20, 40)], size=(320, 240))
    joined = tmp_path / "switch.ts"
    joined.write_bytes(first.read_bytes() + second.read_bytes())
    return joined


def test_a_resolution_change_is_scaled_to_the_first_size_not_the_end(tmp_path):
    joined = joined_streams(tmp_path)
    info, progress, batches = decode_all(joined)
    frames = torch.cat([b.frames for b in batches])
    assert progress.damage is None and progress.frames_decoded == 40
    assert frames.shape == (40, 120, 160, 3)
    # The second half is the bigger scene, scaled down: close to it, not garbage.
    expected = torch.from_numpy(scene(30, 320, 240)).permute(2, 0, 1)[None].float()
    scaled = torch.nn.functional.interpolate(expected, size=(120, 160), mode="area")[0].permute(1, 2, 0)
    assert (frames[30].float() - scaled).abs().mean() < 12


def test_a_still_image_named_like_a_video_is_not_a_video(tmp_path):
    import av

    image = tmp_path / "photo.mp4"
    with av.open(str(image), "w", format="image2") as container:
        stream = container.add_stream("mjpeg", rate=1)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuvj420p"
        container.mux(stream.encode(av.VideoFrame.from_ndarray(scene(0, 64, 48), format="rgb24")))
        container.mux(stream.encode())
    with pytest.raises(VideoError, match="an image, not a video"):
        probe(str(image))


@DECODERS
def test_an_edit_list_lead_in_is_not_frames(tmp_path, decoder):
    """A clip cut at frame 23 without re-encoding starts at keyframe 20; frames 20-22 are never shown."""
    source = write_video(tmp_path / "source.mp4", 60, options={"g": "10", "bf": "0"})
    clip = cut_without_reencoding(source, tmp_path / "clip.mp4", keyframe=20, cut=23)
    info, progress, batches = decode_all(clip, decoder=decoder)
    _, _, original = decode_all(source)
    assert info.hidden_frames == 3 and info.container_frames == 37
    assert progress.damage is None and progress.frames_decoded == 37
    assert np.concatenate([b.frame_indices for b in batches]).tolist() == list(range(37))
    assert np.allclose(np.concatenate([b.timestamps_s for b in batches]), np.arange(37) / 25)
    shown = torch.cat([b.frames for b in batches])
    assert torch.equal(shown, torch.cat([b.frames for b in original])[23:])


@DECODERS
def test_damaged_packets_cost_their_own_frames_not_the_rest_of_the_video(tmp_path, decoder):
    source = write_video(tmp_path / "source.mp4", 200, size=(320, 240), options={"g": "25"})
    damaged = overwrite_middle(source, tmp_path / "damaged.mp4")
    _, _, clean_batches = decode_all(source)
    info, progress, batches = decode_all(damaged, decoder=decoder)
    indices = np.concatenate([b.frame_indices for b in batches])
    assert "could not be decoded (damaged data)" in progress.damage
    assert 150 < progress.frames_decoded < 200 == info.container_frames
    assert len(indices) == progress.frames_decoded and indices[-1] == 199
    assert np.all(np.diff(indices) > 0)
    # Frames keep their true index across the gap: from the last keyframe on they equal the clean decode.
    clean = torch.cat([b.frames for b in clean_batches])
    frames = torch.cat([b.frames for b in batches])
    tail = indices >= 175
    assert tail.sum() == 25 and torch.equal(frames[torch.from_numpy(tail)], clean[175:])
    assert np.allclose(np.concatenate([b.timestamps_s for b in batches]), indices / 25)


def test_decord_is_not_trusted_with_a_stream_whose_clock_restarts(tmp_path):
    """decord 0.6.0 reorders two streams joined byte for byte (it shows the second one's frames first)."""
    joined = joined_streams(tmp_path)
    _, _, by_pyav = decode_all(joined)
    _, progress, by_decord = decode_all(joined, decoder="decord")
    assert progress.damage is None and progress.frames_decoded == 40
    assert np.concatenate([b.frame_indices for b in by_decord]).tolist() == list(range(40))
    assert torch.equal(torch.cat([b.frames for b in by_pyav]), torch.cat([b.frames for b in by_decord]))


def test_frames_a_decoder_makes_up_for_damaged_data_never_shift_the_indices(tmp_path):
    """Damage in a dozen places: every decoded frame keeps an index of its own, within the video's frames.

    (Stand-in frames whose PTS fit nowhere were once numbered in sequence, shifting every later index by one.)
    """
    source = write_video(tmp_path / "source.mp4", 200, size=(320, 240), options={"g": "25"})
    for seed in range(12):
        damaged = overwrite_middle(source, tmp_path / f"damaged-{seed}.mp4", seed=seed,
                                   offset_fraction=0.25 + 0.04 * seed)
        info, progress, batches = decode_all(damaged)
        indices = np.concatenate([b.frame_indices for b in batches])
        assert np.all(np.diff(indices) > 0) and indices[-1] < 200, (seed, indices[-3:])
        assert len(indices) == progress.frames_decoded


def test_a_video_is_probed_once_until_it_changes(tmp_path, monkeypatch):
    """A long video's segments share one probe (a probe scans every packet); a rewritten file is probed anew."""
    from job import decode
    from job.storage import file_identity

    path = str(tmp_path / "clip.mp4")
    write_video(path, 10, size=(64, 48))
    probed = []
    monkeypatch.setattr(decode, "probe", lambda p, real=decode.probe: probed.append(p) or real(p))
    first = decode.probe_file(path, file_identity(path))
    assert decode.probe_file(path, file_identity(path)) is first and len(probed) == 1
    write_video(path, 20, size=(64, 48))
    assert decode.probe_file(path, file_identity(path)).container_frames == 20 and len(probed) == 2
    decode.probe_file(path, None)  # nothing says the file is unchanged
    assert len(probed) == 3
