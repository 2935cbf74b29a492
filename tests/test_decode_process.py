"""Decoding in a child process (`job.decode_process`): the same batches as decoding in the model's process,
buffers reused only once handed back, and a child that never outlives its parent nor hangs it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import psutil
import pytest
import torch
from media import make_awkward_set, overwrite_middle

from job.decode import DecodeProgress, VideoError, iter_batches, probe
from job.decode_process import DecodeProcess, DecodeProcessError
from job.samples import scene, write_video


def decoded(decode, path, info, **options):
    """(indices, frames, progress, error, layouts) of decoding `path` with `decode`: iter_batches, or a
    child's `batches` (each batch handed back once copied, as the job does)."""
    progress, indices, frames, error, layouts = DecodeProgress(), [], [], None, []
    child = getattr(decode, "__self__", None)
    try:
        for batch in decode(path, info, progress=progress, **options):
            indices.append(batch.frame_indices.copy())
            frames.append(batch.frames.clone())
            layouts.append(batch.planar)
            if child is not None:
                child.give_back(batch)
    except (VideoError, DecodeProcessError) as exc:
        error = str(exc)
    except Exception as exc:  # as `process` records it
        error = f"{type(exc).__name__}: {exc}"
    return indices, frames, progress, error, layouts


def assert_same(one, other):
    (indices_a, frames_a, progress_a, error_a, layouts_a), (indices_b, frames_b, progress_b, error_b, layouts_b) = \
        one, other
    assert layouts_a == layouts_b
    assert len(indices_a) == len(indices_b)
    assert all(np.array_equal(a, b) for a, b in zip(indices_a, indices_b, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(frames_a, frames_b, strict=True))
    assert error_a == error_b
    assert (progress_a.frames_decoded, progress_a.problems) == (progress_b.frames_decoded, progress_b.problems)
    # Where decord hands a damaged video over to PyAV depends on its own read-ahead thread: not compared.
    assert sum(progress_a.frames_by_decoder.values()) == sum(progress_b.frames_by_decoder.values())


def test_a_child_decodes_every_awkward_video_as_the_models_process_does(tmp_path):
    """Frames, indices, damage and errors alike, one child for every video (its buffers change size)."""
    directory = tmp_path / "set"
    cases = make_awkward_set(directory)
    source = write_video(tmp_path / "source.mp4", 200, size=(320, 240), options={"g": "25"})
    overwrite_middle(source, directory / "damaged.mp4")
    paths = [directory / name for name in cases if cases[name]["status"] != "failed"] + [directory / "damaged.mp4"]
    with DecodeProcess(keep=3) as child:
        for path in paths:
            info = probe(str(path))
            for options in ({"batch_size": 4}, {"batch_size": 3, "frame_stride": 2, "start_frame": 2, "end_frame": 7},
                            {"batch_size": 5, "decoder": "decord"}, {"batch_size": 4, "planar": True}):
                in_process = decoded(iter_batches, str(path), info, **options)
                assert_same(decoded(child.batches, str(path), info, **options), in_process)
                assert len(child._slots) <= 3  # the read-ahead is bounded, whatever the video's size
        assert "damaged data" in decoded(child.batches, str(directory / "damaged.mp4"),
                                         probe(str(directory / "damaged.mp4")), batch_size=4)[2].damage
        # A failure that is not a VideoError reads as it would have in the model's process.
        plain = str(directory / "plain.mp4")
        info = probe(plain)
        (directory / "plain.mp4").write_bytes(b"not a video any more")
        error = decoded(child.batches, plain, info, batch_size=4)[3]
        assert error == decoded(iter_batches, plain, info, batch_size=4)[3] and error


def test_a_batch_not_handed_back_is_never_written_into_and_an_early_stop_leaves_the_child_sound(tmp_path):
    first = str(write_video(tmp_path / "a.mp4", [scene(i, 160, 120, seed=1) for i in range(40)], size=(160, 120)))
    second = str(write_video(tmp_path / "b.mp4", [scene(i, 160, 120, seed=2) for i in range(40)], size=(160, 120)))
    expected = {path: decoded(iter_batches, path, probe(path), batch_size=8) for path in (first, second)}
    with DecodeProcess(keep=2) as child:
        held = None
        for i, batch in enumerate(child.batches(first, probe(first), batch_size=8)):
            if i == 1:
                held = batch  # kept, as a consumer still reading it would
            else:
                child.give_back(batch)
        stopped = child.batches(second, probe(second), batch_size=8)
        next(stopped)
        stopped.close()  # an early stop: what it had in flight must not leak into the next video
        assert_same(decoded(child.batches, second, probe(second), batch_size=8), expected[second])
        assert_same(decoded(child.batches, first, probe(first), batch_size=8), expected[first])
        assert torch.equal(held.frames, expected[first][1][1])  # never written into by any batch since


def test_a_child_that_dies_midway_is_a_retryable_failure_and_the_next_video_gets_a_new_child(tmp_path):
    path = str(write_video(tmp_path / "a.mp4", 60, size=(160, 120)))
    with DecodeProcess(keep=2) as child:
        batches = child.batches(path, probe(path), batch_size=4)
        next(batches)
        first_child = child._child.pid
        os.kill(first_child, signal.SIGKILL)
        with pytest.raises(DecodeProcessError, match="died"):
            for batch in batches:
                child.give_back(batch)
        assert_same(decoded(child.batches, path, probe(path), batch_size=4),
                    decoded(iter_batches, path, probe(path), batch_size=4))
        assert child._child.pid != first_child


def test_a_child_exits_when_its_parent_is_killed_with_minus_9(tmp_path):
    """The actor may be killed at any moment (the pool's stall timeout, kill -9): its children go with it."""
    path = write_video(tmp_path / "a.mp4", 400, size=(320, 240))
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        from job.decode import probe
        from job.decode_process import DecodeProcess
        child = DecodeProcess(keep=2)
        batches = child.batches({str(path)!r}, probe({str(path)!r}), batch_size=4)
        next(batches)  # holds it: the child fills its read-ahead and waits
        print(child._child.pid, flush=True)
        import time; time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        child_pid = int(parent.stdout.readline())
        assert psutil.pid_exists(child_pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and psutil.pid_exists(child_pid) and \
                psutil.Process(child_pid).status() != psutil.STATUS_ZOMBIE:
            time.sleep(0.1)
        assert not psutil.pid_exists(child_pid) or psutil.Process(child_pid).status() == psutil.STATUS_ZOMBIE
    finally:
        parent.kill()


def test_waiting_until_a_child_is_up_leaves_it_nothing_to_import_on_the_first_video(tmp_path):
    """An actor reports ready once its children have started up, so the first task does not wait on imports."""
    path = str(tmp_path / "clip.mp4")
    write_video(path, 8, size=(64, 48))
    with DecodeProcess(keep=3) as child:
        child.start()
        child.wait_until_up()
        imported = {module.path for module in psutil.Process(child._child.pid).memory_maps()}
        assert any("libavcodec" in mapped for mapped in imported), "the child has loaded PyAV"
        assert not child._conn.poll()  # its "up" message was read, nothing else is pending
        info = probe(path)
        assert_same(decoded(child.batches, path, info, batch_size=4), decoded(iter_batches, path, info, batch_size=4))


@pytest.mark.cuda
def test_a_childs_buffers_are_page_locked_for_a_gpu_and_unlocked_when_dropped(tmp_path):
    """With `pin`, a batch crosses to the GPU straight from the child's buffer (no pinned copy first), its
    frames the same as unpinned; closing unlocks every buffer."""
    write_video(tmp_path / "v.mp4", [scene(i, 128, 96) for i in range(40)], size=(128, 96))
    path = str(tmp_path / "v.mp4")
    info = probe(path)
    with DecodeProcess(keep=3, pin=True) as child:
        pinned = []
        for batch in child.batches(path, info, batch_size=8):
            pinned.append(batch.frames.is_pinned())
            on_gpu = batch.frames.to("cuda", non_blocking=True)
            torch.cuda.synchronize()
            assert torch.equal(on_gpu.cpu(), batch.frames)
            child.give_back(batch)
        assert all(pinned) and child._locked
    assert not child._locked
