"""End to end through a real local Ray: the awkward set, reruns, settings check, the CLI."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import polars as pl
import pytest
from cli import run_cli
from media import make_awkward_set

from job import layout
from job.errors import SettingsMismatchError
from job.run import run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def awkward_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("videos")
    return directory, make_awkward_set(directory)


def table(out):
    return pl.read_parquet(out / "videos.parquet")


def all_predictions(out):
    return layout.scan_predictions(out).collect().sort("video_id", "frame_index", "score", "class_id", "x1")


def test_awkward_and_bad_inputs_are_recorded_and_do_not_stop_the_run(ray_session, awkward_dir, make_cfg, tmp_path):
    directory, cases = awkward_dir
    cfg = make_cfg(directory, "frame_stride=2")
    summary = run(cfg)
    videos = table(tmp_path / "out")
    assert sorted(videos["path"]) == sorted(cases)  # every video-extension file, nothing else
    by_path = {row["path"]: row for row in videos.iter_rows(named=True)}
    for rel, expect in cases.items():
        row = by_path[rel]
        assert row["status"] == expect["status"], (rel, row)
        if "error_contains" in expect:
            assert expect["error_contains"] in row["error"], (rel, row["error"])
        if expect["status"] == "ok":
            assert row["error"] is None
            assert row["frame_count"] == expect["frame_count"], rel
            assert row["frames_processed"] == math.ceil(expect["frame_count"] / 2), rel
        for key in ("width", "height", "codec", "rotation"):
            if key in expect:
                assert row[key] == expect[key], (rel, key)

    preds = all_predictions(tmp_path / "out")
    assert preds.height == summary.detections == videos["detections"].sum()
    counts = preds.group_by("video_id").len()
    assert dict(counts.iter_rows()) == {
        r["video_id"]: r["detections"] for r in videos.iter_rows(named=True) if r["detections"]
    }
    assert preds.filter(pl.col("frame_index") % 2 != 0).height == 0
    # Boxes lie inside each video's displayed frame.
    sizes = preds.join(videos.select("video_id", "width", "height"), on="video_id")
    assert sizes.filter((pl.col("x2") > pl.col("width")) | (pl.col("y2") > pl.col("height"))).height == 0
    vfr = preds.join(videos.filter(pl.col("path") == "vfr.mkv").select("video_id"), on="video_id")
    from media import VFR_PTS_MS

    expected_ts = {i: VFR_PTS_MS[i] / 1000 for i in range(len(VFR_PTS_MS))}
    for frame_index, ts in vfr.select("frame_index", "timestamp_s").unique().iter_rows():
        assert ts == pytest.approx(expected_ts[frame_index], abs=1e-6)

    assert summary.ok + summary.partial + summary.failed == len(cases)
    manifest = (tmp_path / "out" / "manifest.json").read_text()
    for library in ("torch", "torchvision", "decord", "ray", "started_at", "finished_at"):
        assert library in manifest
    import json

    assert json.loads(manifest)["ray_job_id"], "a single run records its Ray job too"

    # A rerun skips everything finished, processes nothing new, and leaves identical tables.
    again = run(cfg)
    assert again.skipped == len(cases)  # bad files too: their failure is a fact about the file
    assert again.frames == 0
    assert table(tmp_path / "out").equals(videos.sort("path"))
    assert all_predictions(tmp_path / "out").equals(preds)

    with pytest.raises(SettingsMismatchError, match="score_threshold"):
        run(make_cfg(directory, "frame_stride=2", "score_threshold=0.3"))


def test_cli_runs_with_hydra_overrides_and_logs_a_summary(awkward_dir, weights_path, tmp_path):
    directory, _ = awkward_dir
    subset = tmp_path / "in"
    subset.mkdir()
    for name in ("plain.mp4", "zero.mp4"):
        (subset / name).write_bytes((directory / name).read_bytes())
    out = tmp_path / "cli out"
    result = subprocess.run(
        [sys.executable, "-m", "job", f"video_dir={subset}", f"output_dir={out}", f"model.weights={weights_path}",
         "score_threshold=0.25", "ray.num_cpus=2", "ray.num_actors=1", f"hydra.run.dir={tmp_path / 'hydra'}"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    videos = table(out)
    assert dict(zip(videos["path"], videos["status"])) == {"plain.mp4": "ok", "zero.mp4": "failed"}
    log = (tmp_path / "hydra" / "__main__.log").read_text()
    assert "summary: 2 videos: 1 ok, 0 partial, 1 failed" in log
    assert "zero.mp4: failed: empty file (0 bytes)" in result.stderr + log
    assert "frame/s" in result.stderr  # the progress bar


def test_cli_stops_with_one_clear_error_when_the_model_cannot_load(awkward_dir, tmp_path):
    import torch

    directory, _ = awkward_dir
    common = [f"video_dir={directory}", "ray.num_cpus=2", f"hydra.run.dir={tmp_path / 'hydra'}"]
    missing = run_cli(*common, f"output_dir={tmp_path / 'a'}", f"model.weights={tmp_path / 'missing.pth'}")
    assert missing.returncode == 2
    assert "missing.pth: no such file" in missing.output and "Traceback" not in missing.output

    torch.save({"not": torch.zeros(1)}, tmp_path / "other.pth")
    wrong = run_cli(*common, f"output_dir={tmp_path / 'b'}", f"model.weights={tmp_path / 'other.pth'}")
    assert wrong.returncode == 2
    assert "other.pth does not fit model=ssdlite320_mobilenet_v3_large" in wrong.output
    assert "Traceback" not in wrong.output


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A 256 KiB tmpfs: fills up after a few parts. Needs root (CI and this machine have it)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_stops_with_a_clear_error_and_keeps_committed_parts(awkward_dir, weights_path, tmp_path,
                                                                     tiny_filesystem):
    import numpy as np

    from job.samples import write_video

    videos = tmp_path / "in"
    # Noise frames: the calibrated model finds many boxes in them, so parts are large.
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (240, 320, 3), dtype=np.uint8) for _ in range(8)]
    for i in range(3):
        write_video(videos / f"v{i}.mp4", frames * 6)
    out = tiny_filesystem / "out"
    command = [f"video_dir={videos}", f"output_dir={out}", f"model.weights={weights_path}",
               "score_threshold=0.05", "output.commit_every_frames=4", "batch_size=4", "ray.num_cpus=2",
               "ray.num_actors=1", f"hydra.run.dir={tmp_path / 'hydra'}"]
    result = run_cli(*command)
    assert result.returncode == 2, result.output[-2000:]
    assert "cannot write to output_dir" in result.output and "No space left on device" in result.output
    assert "rerun the same command to resume" in result.output
    assert len(result.output.strip().splitlines()[-1]) < 400 and "Traceback" not in result.output
    committed = list((out / "predictions").glob("*/part-*.parquet"))
    assert committed, "some parts should have landed before the disk filled"
    # Nothing torn where readers look: only whole parts, no temp files, in predictions/.
    assert sorted(p for p in (out / "predictions").rglob("*") if p.is_file()) == sorted(committed)
    for part in committed:
        pl.read_parquet(part)

    # Space freed: the same command finishes, with exactly the rows of a clean run.
    subprocess.run(["mount", "-o", "remount,size=64m", str(tiny_filesystem)], check=True)
    resumed = run_cli(*command)
    assert resumed.returncode == 0, resumed.output[-2000:]
    clean = tmp_path / "clean"
    assert run_cli(*[c.replace(str(out), str(clean)) for c in command]).returncode == 0
    for table in ("predictions", "videos"):
        ours, theirs = (all_predictions(out), all_predictions(clean)) if table == "predictions" else (
            pl.read_parquet(d / "videos.parquet").select("path", "status", "frame_count", "frames_processed",
                                                          "detections").sort("path") for d in (out, clean))
        assert ours.height > 0 and ours.equals(theirs), table


def test_an_embedded_ray_gives_every_worker_one_malloc_arena_and_leaves_the_driver_env_alone():
    """Actors then reuse Ray's prestarted workers (no runtime_env) and still get the setting."""
    script = """
import os, ray
from job.config import RayConfig
from job.execute import RayRuntime
with RayRuntime(RayConfig(num_cpus=1)) as runtime:
    assert runtime.started and runtime.actor_runtime_env is None and "MALLOC_ARENA_MAX" not in os.environ
    print(ray.get(ray.remote(lambda: os.environ.get("MALLOC_ARENA_MAX")).remote()))
assert not ray.is_initialized()
"""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MALLOC_ARENA_MAX")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "1"


def test_progress_is_batched_and_nothing_is_lost_at_the_end(ray_session):
    import ray

    from job.execute import BatchedProgress, ProgressCounter

    counter = ProgressCounter.options(num_cpus=0).remote()
    report = BatchedProgress(counter, interval=3600)
    for _ in range(10):
        report(4, 0)
    report(0, 100)
    assert ray.get(counter.read.remote()) == (0, 0)  # held back, not one call per batch
    report.flush()
    assert ray.get(counter.read.remote()) == (40, 100)
    eager = BatchedProgress(counter, interval=0)
    eager(2, 0)
    assert ray.get(counter.read.remote()) == (42, 100)
    ray.kill(counter)


def test_a_deleted_video_keeps_its_row_as_missing_until_pruned(ray_session, make_cfg, tmp_path):
    from job.samples import write_video

    for name in ("a.mp4", "b.mkv"):
        write_video(tmp_path / "in" / name, 12, size=(320, 240))
    run(make_cfg(tmp_path / "in"))
    out = tmp_path / "out"
    before = all_predictions(out)
    (tmp_path / "in" / "b.mkv").unlink()
    summary = run(make_cfg(tmp_path / "in"))
    assert summary.missing == 1 and summary.frames == 0
    videos = table(out)
    assert dict(zip(videos["path"], videos["status"])) == {"a.mp4": "ok", "b.mkv": "missing"}
    assert set(all_predictions(out)["video_id"]) == set(videos["video_id"])  # every partition has its row
    assert all_predictions(out).equals(before)
    run(make_cfg(tmp_path / "in", "prune=true"))
    videos = table(out)
    assert videos["path"].to_list() == ["a.mp4"]
    assert set(all_predictions(out)["video_id"]) == set(videos["video_id"])


def test_a_symlink_loop_and_a_non_utf8_file_name_do_not_stop_the_run(ray_session, make_cfg, tmp_path):
    import shutil

    from job.samples import write_video

    good = write_video(tmp_path / "in" / "good.mp4", 8, size=(320, 240))
    os.symlink("loop.mp4", tmp_path / "in" / "loop.mp4")
    shutil.copyfile(good, os.fsencode(tmp_path / "in") + b"/caf\xe9.mp4")
    summary = run(make_cfg(tmp_path / "in"))
    videos = table(tmp_path / "out")
    by_path = dict(zip(videos["path"], zip(videos["status"], videos["error"])))
    assert by_path["good.mp4"] == ("ok", None) and by_path["caf\ufffd.mp4"] == ("ok", None)
    assert by_path["loop.mp4"][0] == "failed" and "symbolic links" in by_path["loop.mp4"][1]
    assert summary.ok == 2
