"""Exactly-once output: SIGKILL the whole job at several points, rerun, compare with a clean run.

Also: one Ray actor killed mid-run is replaced and its video retried; readers scanning the
output while the job runs never see a torn file.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import polars as pl
import psutil
import pytest
from conftest import THRESHOLD
from processes import kill_tree, stop_inside_a_staged_write

from job import layout
from job.run import run
from job.samples import write_video

pytestmark = pytest.mark.slow
SETTINGS = ["batch_size=4", "output.commit_every_frames=8", "frame_stride=1"]
KEYS = ["video_id", "frame_index", "class_id"]


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("recovery")
    for i, frames in enumerate((48, 40, 32)):
        write_video(directory / f"clip{i}.mp4", frames, size=(320, 240))
    (directory / "bad.mp4").write_bytes(b"not a video")
    return directory


@pytest.fixture(scope="module")
def clean_run(ray_session, video_dir, tmp_path_factory, weights_path):
    from conftest import compose_config

    out = tmp_path_factory.mktemp("clean")
    cfg = compose_config([f"video_dir={video_dir}", f"output_dir={out}", f"model.weights={weights_path}",
                          f"score_threshold={THRESHOLD}", "device=cpu", "ray.num_actors=2",
                          "ray.cpus_per_actor=1", *SETTINGS])
    run(cfg)
    return out


def sorted_predictions(out: Path) -> pl.DataFrame:
    return layout.scan_predictions(out).collect().sort(*KEYS, "score", "x1", "y1")


def assert_same_results(out: Path, reference: Path) -> None:
    ours, theirs = sorted_predictions(out), sorted_predictions(reference)
    assert ours.height == theirs.height > 0
    assert ours.is_duplicated().sum() == 0
    # The same bytes: the clean run had 2 actors x 1 CPU, the killed one 1 actor x 2 CPUs (README).
    assert ours.equals(theirs)
    mine = pl.read_parquet(out / "videos.parquet").select("path", "status", "frame_count", "frames_processed", "detections")
    ref = pl.read_parquet(reference / "videos.parquet").select("path", "status", "frame_count", "frames_processed", "detections")
    assert mine.equals(ref)


def job_command(video_dir: Path, out: Path, weights: Path, hydra_dir: Path) -> list[str]:
    return [sys.executable, "-m", "job", f"video_dir={video_dir}", f"output_dir={out}", f"model.weights={weights}",
            f"score_threshold={THRESHOLD}", "device=cpu", "ray.num_cpus=2", "ray.num_actors=1", *SETTINGS,
            f"hydra.run.dir={hydra_dir}"]


def parts(out: Path) -> list[Path]:
    return sorted((out / "predictions").glob("*/part-*.parquet"))


def statuses(out: Path) -> list[Path]:
    return sorted((out / "_state" / "videos").glob("*.json"))


KILL_POINTS = {
    # Ray and the model are starting; nothing committed yet.
    "before_first_commit": lambda out: (out / "_state" / "settings.json").exists() and not parts(out),
    # Some parts of the first video committed, the video not finished.
    "mid_video": lambda out: len(parts(out)) >= 2 and not any("clip" in p.name for p in statuses(out)),
    # One video finished, the next not started or just started.
    "between_videos": lambda out: any("clip" in p.name for p in statuses(out)),
    # A part is being written: its staged file exists, not yet renamed (`stop_inside_a_staged_write`).
    "during_write": lambda out: stop_inside_a_staged_write(PROCESS[0], out / "_state" / "tmp", ".part-*.tmp", 300),
}
PROCESS: list[subprocess.Popen] = []  # the job under test, for the kill points that need it


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_then_rerun_gives_exactly_the_clean_results(point, video_dir, clean_run, weights_path, tmp_path):
    out = tmp_path / "out"
    command = job_command(video_dir, out, weights_path, tmp_path / "hydra")
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    reader_errors: list[BaseException] = []
    reads = [0]
    stop = threading.Event()

    def read_while_running() -> None:  # a user scanning the output mid-run must never see a torn file
        while not stop.is_set():
            if parts(out):
                try:
                    layout.scan_predictions(out).collect()
                    reads[0] += 1
                except Exception as exc:  # noqa: BLE001 - any failure here is the bug
                    reader_errors.append(exc)
            time.sleep(0.01)

    reader = threading.Thread(target=read_while_running, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 300
        PROCESS[:] = [process]
        while not KILL_POINTS[point](out):
            assert process.poll() is None, "the job finished before the kill point"
            assert time.monotonic() < deadline, "kill point never reached"
            time.sleep(0.005)
    finally:
        kill_tree(process)
        stop.set()
        reader.join()
    assert not reader_errors, reader_errors[:1]
    if point == "during_write":
        assert list((out / "_state" / "tmp").glob(".part-*.tmp")), "killed with a part half written"
        # And what a kill inside the tables' write leaves: a torn table, outside what readers list.
        (out / "_state" / "tmp" / ".videos.parquet.deadbeef.tmp").write_bytes(b"PAR1 torn")

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_same_results(out, clean_run)
    assert all(p.suffix == ".parquet" for p in (out / "predictions").rglob("*") if p.is_file())


def find_worker_processes() -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if cmdline.startswith("ray::VideoWorker"):
            found.append(proc)
    return found


def act_on_a_busy_worker_once_parts_exist(out: Path, action) -> tuple[threading.Thread, list[int]]:
    """A started thread that, once the run has committed a part, applies `action` to one worker busy on a
    video; the list it returns gets that worker's pid."""
    touched: list[int] = []

    def watch() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if parts(out):
                busy = [p for p in find_worker_processes() if "process" in " ".join(p.cmdline())]
                if busy:
                    action(busy[0])
                    touched.append(busy[0].pid)
                    return
            time.sleep(0.01)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    return watcher, touched


@pytest.mark.parametrize("attempts, expect_status", [(3, "ok"), (1, "failed")])
def test_a_killed_actor_is_replaced_and_its_video_retried(
    ray_session, video_dir, clean_run, make_cfg, tmp_path, attempts, expect_status
):
    out = tmp_path / "out"
    cfg = make_cfg(video_dir, *SETTINGS, f"ray.max_video_attempts={attempts}", output_dir=out)
    killer, killed = act_on_a_busy_worker_once_parts_exist(out, psutil.Process.kill)
    summary = run(cfg)
    killer.join()
    assert killed, "no worker was killed"
    videos = pl.read_parquet(out / "videos.parquet")
    retried = videos.filter(pl.col("path").str.starts_with("clip") & (pl.col("attempts") > 1) |
                            pl.col("error").str.contains("died").fill_null(False))
    assert retried.height == 1
    if expect_status == "ok":
        assert summary.failed == 1  # only bad.mp4
        assert retried["status"][0] == "ok" and retried["attempts"][0] == 2
        assert_same_results(out, clean_run)
    else:
        assert retried["status"][0] == "failed"
        assert "worker process died" in retried["error"][0]
        others = videos.filter(pl.col("path").str.starts_with("clip") & (pl.col("status") == "ok"))
        assert others.height == 2  # the rest of the run is unaffected


def test_a_stopped_worker_is_killed_after_the_stall_timeout_and_its_video_retried(
    ray_session, video_dir, clean_run, make_cfg, tmp_path, caplog
):
    """SIGSTOP stands for a stuck filesystem read or a decoder deadlock: the process is alive and silent."""
    out = tmp_path / "out"
    cfg = make_cfg(video_dir, *SETTINGS, "ray.stall_timeout_s=8", output_dir=out)
    stopper, stopped = act_on_a_busy_worker_once_parts_exist(out, psutil.Process.suspend)  # SIGSTOP
    summary = run(cfg)
    stopper.join()
    assert stopped, "no worker was stopped"
    assert not psutil.pid_exists(stopped[0]) or psutil.Process(stopped[0]).status() == psutil.STATUS_ZOMBIE
    assert "no progress for" in caplog.text and "killing its worker and retrying" in caplog.text
    videos = pl.read_parquet(out / "videos.parquet")
    assert summary.failed == 1  # only bad.mp4
    assert videos.filter(pl.col("attempts") > 1).height == 1
    assert_same_results(out, clean_run)


def test_a_second_run_into_the_same_output_dir_stops_naming_the_first(video_dir, weights_path, clean_run, tmp_path):
    out = tmp_path / "out"
    first = subprocess.Popen(job_command(video_dir, out, weights_path, tmp_path / "h1"), start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (out / "_state" / "lease.json").exists():
            assert first.poll() is None and time.monotonic() < deadline, "the first run never took the lease"
            time.sleep(0.01)
        # Different settings too: it must not get as far as the settings check.
        second = subprocess.run([*job_command(video_dir, out, weights_path, tmp_path / "h2"), "score_threshold=0.9"],
                                capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"pid {first.pid}" in second.stdout + second.stderr
        assert first.wait(timeout=600) == 0
    finally:
        if first.poll() is None:
            kill_tree(first)
    assert_same_results(out, clean_run)
    assert not (out / "_state" / "lease.json").exists(), "released at the end"


# Loaded by every Python process of the run (PYTHONPATH): a decoder that segfaults on one file, a few
# packets into it, as a bug in a native decoder does.
CRASHING_DECODER = '''
import os, signal
import av

_open = av.open


class _Container:
    def __init__(self, container, crash):
        self._container, self._crash = container, crash

    def __getattr__(self, name):
        return getattr(self._container, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._container.__exit__(*exc)

    def demux(self, *args, **kwargs):
        for count, packet in enumerate(self._container.demux(*args, **kwargs)):
            if self._crash and count == 5:
                os.kill(os.getpid(), signal.SIGSEGV)
            yield packet


def _crashing_open(path, *args, **kwargs):
    return _Container(_open(path, *args, **kwargs), "crash" in os.path.basename(str(path)))


av.open = _crashing_open
'''


def test_a_worker_that_segfaults_while_decoding_costs_that_video_its_retries_and_nothing_else(
        video_dir, clean_run, weights_path, tmp_path):
    import os
    import shutil

    videos = tmp_path / "videos"
    shutil.copytree(video_dir, videos)
    write_video(videos / "crash.mp4", 24, size=(320, 240))
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(CRASHING_DECODER)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(hooks), os.environ.get("PYTHONPATH")]))}
    command = job_command(videos, out, weights_path, tmp_path / "hydra") + ["ray.max_video_attempts=2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    table = pl.read_parquet(out / "videos.parquet")
    crashed = table.filter(pl.col("path") == "crash.mp4").row(0, named=True)
    assert crashed["status"] == "failed" and crashed["attempts"] == 2, crashed
    assert "the worker process died on this video 2 times" in crashed["error"], crashed["error"]
    assert "Fatal Python error: Segmentation fault" in result.stderr  # the crash, named in the run's log
    others = table.filter(pl.col("path") != "crash.mp4").select("path", "status", "frame_count", "detections")
    reference = pl.read_parquet(clean_run / "videos.parquet").select("path", "status", "frame_count", "detections")
    assert others.sort("path").equals(reference.sort("path"))
    assert sorted_predictions(out).filter(pl.col("video_id").str.starts_with("clip")).equals(
        sorted_predictions(clean_run))
