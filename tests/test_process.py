"""process: one video end to end without Ray; statuses, stride, resume."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
import torch
from media import cut_without_reencoding, overwrite_middle

from job import layout
from job.config import ModelConfig, for_device
from job.decode_process import DecodeProcess
from job.detect import Detector
from job.discover import discover_videos
from job.output import OutputDir
from job.prefetch import prefetch
from job.process import process_task
from job.samples import write_video
from job.segments import Task


def process(video, cfg, detector, **kwargs):
    """A whole video as an actor processes it: settings resolved for the device, one OutputDir."""
    return process_task(Task(video), for_device(cfg, detector.device.type), OutputDir(cfg.output_dir), detector,
                        **kwargs)


@pytest.fixture(scope="module")
def detector(weights_path):
    from conftest import MODEL, THRESHOLD

    return Detector(ModelConfig(name=MODEL, weights=str(weights_path)), THRESHOLD, device="cpu")


def only_video(directory):
    (video,) = discover_videos(directory)
    return video


def predictions(out):
    return layout.scan_predictions(out).collect().sort("frame_index", "score", "class_id", "x1")


@pytest.mark.parametrize("stride", [1, 3, 7])
def test_stride_processes_every_nth_frame(tmp_path, make_cfg, detector, stride):
    write_video(tmp_path / "in" / "v.mp4", 23, size=(320, 240))
    cfg = make_cfg(tmp_path / "in", f"frame_stride={stride}")
    row = process(only_video(tmp_path / "in"), cfg, detector)
    assert row.status == "ok", row
    assert row.frame_count == 23
    assert row.frames_processed == math.ceil(23 / stride)
    table = predictions(cfg.output_dir)
    assert table.height == row.detections > 0
    assert set(table["frame_index"].unique()) <= set(range(0, 23, stride))
    assert OutputDir(tmp_path / "out").statuses.read(row.video_id) == row


def test_resume_from_committed_parts_equals_a_clean_run(tmp_path, make_cfg, detector):
    write_video(tmp_path / "in" / "v.mp4", 40, size=(320, 240))
    video = only_video(tmp_path / "in")
    clean = make_cfg(tmp_path / "in", "output.commit_every_frames=8", output_dir=tmp_path / "clean")
    process(video, clean, detector)

    resumed = make_cfg(tmp_path / "in", "output.commit_every_frames=8", output_dir=tmp_path / "resumed")
    # Simulate a run killed after its first two parts: keep only those.
    process(video, resumed, detector)
    parts = sorted((tmp_path / "resumed" / layout.partition(video.video_id)).glob("part-*.parquet"))
    assert len(parts) == 5
    for part in parts[2:]:
        part.unlink()
    assert OutputDir(tmp_path / "resumed").parts.committed_end(video.video_id) == 16
    calls = []
    row = process(video, resumed, detector, on_progress=lambda done, expected: calls.append(done))
    assert sum(calls) == 40 - 16  # only the uncommitted frames were detected again
    assert row.status == "ok" and row.frames_processed == 40
    assert row.frames_this_run == 40 - 16  # what the run's summary counts: not the frames resumed from
    assert predictions(tmp_path / "resumed").equals(predictions(tmp_path / "clean"))


def test_truncated_video_is_partial_with_frames_before_the_damage(tmp_path, make_cfg, detector):
    source = write_video(tmp_path / "src.mkv", 100, size=(128, 96))
    data = source.read_bytes()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "cut.mkv").write_bytes(data[: len(data) // 2])
    cfg = make_cfg(tmp_path / "in")
    row = process(only_video(tmp_path / "in"), cfg, detector)
    assert row.status == "partial"
    assert "truncated" in row.error
    assert 0 < row.frame_count < 100
    # Every decodable frame was detected and committed, none past the damage.
    assert OutputDir(tmp_path / "out").parts.committed_end(row.video_id) == row.frame_count
    assert row.frames_processed == row.frame_count


def test_prefetch_is_bounded_and_propagates_errors():
    produced = []

    def source():
        for i in range(10):
            produced.append(i)
            yield i
        raise RuntimeError("decoder exploded")

    stream = prefetch(source(), depth=2)
    assert next(stream) == 0
    import time

    deadline = time.monotonic() + 10
    while len(produced) < 4 and time.monotonic() < deadline:  # it reads ahead without being asked...
        time.sleep(0.01)
    time.sleep(0.3)
    assert len(produced) == 4  # ...up to its bound: one consumed, two queued, one waiting to be put
    with pytest.raises(RuntimeError, match="decoder exploded"):
        list(stream)


def test_prefetch_depth_zero_produces_in_the_callers_thread_on_demand():
    import threading

    produced = []

    def source():
        for i in range(3):
            produced.append((i, threading.get_ident()))
            yield i

    stream = prefetch(source(), depth=0)
    assert produced == []
    assert next(stream) == 0
    assert produced == [(0, threading.get_ident())]
    assert list(stream) == [1, 2]


def test_inline_threaded_and_child_process_decoding_commit_the_same_detections(tmp_path, make_cfg, detector):
    write_video(tmp_path / "in" / "v.mp4", 30, size=(320, 240))
    video = only_video(tmp_path / "in")
    rows, outs = {}, {}
    for ways in (("prefetch_batches=0",), ("prefetch_batches=2", "decode_processes=false"),
                 ("prefetch_batches=2", "decode_processes=true")):
        outs[ways] = tmp_path / f"out{len(outs)}"
        cfg = make_cfg(tmp_path / "in", *ways, "batch_size=4", output_dir=outs[ways])
        with DecodeProcess(keep=3) as stream:
            rows[ways] = process(video, cfg, detector, decode_process=stream)
            assert (stream._child is not None) == ("decode_processes=true" in ways)  # decoded there, or not
        assert rows[ways].status == "ok" and rows[ways].frames_processed == 30
    inline, threaded, child = rows.values()
    assert inline.detections == threaded.detections == child.detections > 0
    first, *others = outs.values()
    assert all(predictions(first).equals(predictions(out)) for out in others)


def test_videos_table_rows_are_typed(tmp_path, make_cfg, detector):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "empty.mp4").write_bytes(b"")
    cfg = make_cfg(tmp_path / "in")
    row = process(only_video(tmp_path / "in"), cfg, detector)
    OutputDir(tmp_path / "out").write_videos_table([row])
    table = pl.read_parquet(tmp_path / "out" / "videos.parquet")
    assert table.row(0, named=True)["status"] == "failed"
    assert table.row(0, named=True)["error"] == "empty file (0 bytes)"


def test_a_video_replaced_after_it_was_done_or_between_a_kill_and_the_rerun_is_detected_again(tmp_path, make_cfg,
                                                                                              detector):
    """Never old content's rows next to new content's: the result equals a clean run of the new file."""
    import shutil

    from job.samples import scene

    old = [scene(i, 320, 240, seed=1) for i in range(24)]
    new = [scene(i, 320, 240, seed=2) for i in range(40)]
    write_video(tmp_path / "new" / "v.mp4", new, size=(320, 240))
    clean = make_cfg(tmp_path / "new", "output.commit_every_frames=8", output_dir=tmp_path / "clean")
    process(only_video(tmp_path / "new"), clean, detector)

    for when in ("finished", "killed"):
        out = tmp_path / when
        write_video(tmp_path / when / "in" / "v.mp4", old, size=(320, 240))
        cfg = make_cfg(tmp_path / when / "in", "output.commit_every_frames=8", output_dir=out / "out")
        video = only_video(tmp_path / when / "in")
        process(video, cfg, detector)
        if when == "killed":  # keep only the first two parts and no final status, as a kill -9 would
            for part in sorted((out / "out" / layout.partition(video.video_id)).glob("part-*.parquet"))[2:]:
                part.unlink()
            (out / "out" / "_state" / "videos" / f"{video.video_id}.json").unlink()
        shutil.copyfile(tmp_path / "new" / "v.mp4", tmp_path / when / "in" / "v.mp4")  # the same bytes as clean's
        row = process(video, cfg, detector)
        assert row.status == "ok" and row.frame_count == 40, (when, row)
        assert predictions(out / "out").equals(predictions(tmp_path / "clean")), when


def test_a_rerun_reads_no_bytes_of_a_file_stat_says_is_unchanged(tmp_path, make_cfg, detector, monkeypatch):
    """Only a changed `stat` (size, mtime, ctime, inode) has the content hashed; the hash decides."""
    import os
    import shutil

    from job import plan as planning
    from job.samples import scene
    from job.storage import file_identity

    for name, seed in (("a.mp4", 1), ("b.mp4", 2)):
        write_video(tmp_path / "in" / name, [scene(i, 64, 48, seed=seed) for i in range(4)], size=(64, 48))
    cfg = make_cfg(tmp_path / "in")
    for video in discover_videos(tmp_path / "in"):
        assert process(video, cfg, detector).file_identity == file_identity(video.path)
    reads, hashed = [], planning.fingerprint
    monkeypatch.setattr(planning, "fingerprint", lambda path: reads.append(os.path.basename(path)) or hashed(path))

    def plan():
        done = planning.make_plan(cfg, OutputDir(cfg.output_dir))
        done.lease.release()
        return done

    assert plan().todo == [] and reads == []
    a, b = tmp_path / "in" / "a.mp4", tmp_path / "in" / "b.mp4"
    shutil.copy2(a, tmp_path / "copy.mp4")  # as cp -p: the same bytes and mtime, another inode and ctime
    os.replace(tmp_path / "copy.mp4", a)
    again = plan()
    assert again.todo == [] and reads == ["a.mp4"]
    (video_a,) = [v for v in again.videos if v.relative_path == "a.mp4"]
    assert again.finished[video_a.video_id].file_identity == file_identity(str(a))  # for the status index
    before = os.stat(b)
    data = bytearray(b.read_bytes())
    data[len(data) // 2] ^= 0xFF  # other bytes, the same size, the mtime set back
    b.write_bytes(bytes(data))
    os.utime(b, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert [v.relative_path for v in plan().todo] == ["b.mp4"]


def test_a_clip_cut_without_reencoding_is_ok_not_partial(tmp_path, make_cfg, detector):
    """The edit list's lead-in is not shown, so not missing: every shown frame is detected, timed from 0."""
    source = write_video(tmp_path / "source.mp4", 60, options={"g": "10", "bf": "0"})
    (tmp_path / "in").mkdir()
    cut_without_reencoding(source, tmp_path / "in" / "clip.mp4", keyframe=20, cut=23)
    row = process(only_video(tmp_path / "in"), make_cfg(tmp_path / "in"), detector)
    assert (row.status, row.error, row.frame_count, row.frames_processed) == ("ok", None, 37, 37)
    assert OutputDir(tmp_path / "out").parts.committed_end(row.video_id) == 37


def test_damaged_data_mid_file_is_partial_with_the_frames_after_it_detected(tmp_path, make_cfg, detector):
    source = write_video(tmp_path / "source.mp4", 200, size=(320, 240), options={"g": "25"})
    (tmp_path / "in").mkdir()
    overwrite_middle(source, tmp_path / "in" / "damaged.mp4")
    row = process(only_video(tmp_path / "in"), make_cfg(tmp_path / "in"), detector)
    assert row.status == "partial" and "could not be decoded (damaged data)" in row.error
    assert 150 < row.frame_count == row.frames_processed < 200
    assert OutputDir(tmp_path / "out").parts.committed_end(row.video_id) == 200  # detected to the last frame


def test_a_whole_video_task_is_cut_as_the_pool_sized_it(tmp_path, make_cfg, detector):
    """The pool's sizer chooses a whole video's cuts when it hands it out; the worker applies them at
    the video's keyframes (GOP 10 here), and `cuts=()` keeps it whole."""
    write_video(tmp_path / "videos" / "v.mp4", 60, size=(64, 48), options={"g": "10", "bf": "0"})
    video = only_video(tmp_path / "videos")

    def answer(task, name):
        cfg = make_cfg(tmp_path / "videos", output_dir=tmp_path / name)
        return process_task(task, for_device(cfg, "cpu"), OutputDir(cfg.output_dir), detector)

    assert answer(Task(video), "default").frame_count == 60  # under 1.5 x ray.segment_frames: whole
    assert answer(Task(video, segment_frames=20), "even").bounds == (0, 20, 40, 60)
    assert answer(Task(video, cuts=(38,)), "uneven").bounds == (0, 40, 60)  # keyframe 40 is 2 frames away
    assert answer(Task(video, segment_frames=20, cuts=()), "whole").frame_count == 60  # cuts win


class RecordingDetector:
    """`Detector`'s calling convention, logging when each batch goes in and when its answer is taken."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.log: list[str] = []
        self.fail_on = fail_on

    def detect_batch(self, frames, planar=None):
        self.log.append(f"call {frames}")
        return [frames]

    def submit(self, frames, planar=None):
        self.log.append(f"submit {frames}")
        detector = self

        class Pending:
            def result(self):
                detector.log.append(f"result {frames}")
                if frames == detector.fail_on:
                    raise RuntimeError("the model failed")
                return [frames]

            def wait(self):
                detector.log.append(f"wait {frames}")

        return Pending()


def test_decoding_ahead_keeps_the_next_batch_in_the_model_while_the_last_is_committed():
    from job.decode import FrameBatch
    from job.process import _detected

    def batches(count):
        for i in range(count):
            yield FrameBatch(np.array([i]), np.array([0.0]), i)

    ahead = RecordingDetector()
    for batch, detections in _detected(batches(3), ahead, ahead=True):
        ahead.log.append(f"commit {batch.frames}")
        assert detections == [batch.frames]
    assert ahead.log == ["submit 0", "submit 1", "result 0", "commit 0", "submit 2", "result 1", "commit 1",
                         "result 2", "commit 2"]
    inline = RecordingDetector()
    assert [d for _, d in _detected(batches(2), inline, ahead=False)] == [[0], [1]]
    assert inline.log == ["call 0", "call 1"]  # on CPU: one at a time, on the caller's thread

    failing = RecordingDetector(fail_on=1)  # the model fails on batch 1 while batch 2 is in it
    with pytest.raises(RuntimeError, match="the model failed"):
        for _ in _detected(batches(4), failing, ahead=True):
            pass
    assert failing.log[-2:] == ["result 1", "wait 2"]  # batch 2's frames are not let go while the model reads them


def test_submitted_batches_from_several_streams_get_their_own_detections(detector, decoded_frames_for_streams):
    import threading

    first, second = decoded_frames_for_streams
    expected = {id(first): detector.detect_batch(first), id(second): detector.detect_batch(second)}
    got, errors = {}, []

    def stream(frames):
        try:
            pending = [detector.submit(frames) for _ in range(3)]  # queued with the other stream's
            got[id(frames)] = [p.result() for p in pending]
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=stream, args=(frames,)) for frames in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(got) == 2
    for key, answers in got.items():
        for answer in answers:
            assert answer.counts == expected[key].counts
            assert torch.equal(answer.boxes, expected[key].boxes) and torch.equal(answer.scores, expected[key].scores)
    assert sum(expected[id(first)].counts) > 0  # the frames have something to find
    # Frame by frame, the same as `detector(frames)`.
    assert [len(d.boxes) for d in detector(first)] == expected[id(first)].counts


@pytest.fixture(scope="module")
def decoded_frames_for_streams(tmp_path_factory):
    """Two batches of real decoded frames, of two sizes."""
    from job.decode import iter_batches, probe

    directory = tmp_path_factory.mktemp("streams")
    batches = []
    for size in ((320, 240), (256, 192)):
        path = directory / f"{size[0]}.mp4"
        write_video(path, 4, size=size)
        batches.append(next(iter(iter_batches(str(path), probe(str(path)), batch_size=4))).frames.clone())
    return batches
