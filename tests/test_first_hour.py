"""The first hour as a new user meets it: installs, --help, one-line errors, Ctrl-C, someone else's directory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from cli import run_cli

from job.samples import write_video


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("videos")
    for i in range(3):
        write_video(directory / f"clip{i}.mp4", 24, size=(320, 240))
    return directory


def test_help_is_the_jobs_own_summary(tmp_path):
    result = run_cli("--help", cwd=tmp_path)
    assert result.returncode == 0, result.output
    assert result.output.startswith("job: find every object")
    assert "keypointrcnn_resnet50_fpn" in result.output and "model.classes" in result.output
    assert "base_model" not in result.output and "Powered by Hydra" not in result.output


def test_no_arguments_is_one_line_saying_what_to_pass(tmp_path):
    result = run_cli(cwd=tmp_path)
    assert result.returncode == 2, result.output
    assert "video_dir and output_dir are required" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == [], "nothing written into the user's working directory"


def test_a_typo_added_with_plus_stops_at_start_up(tmp_path, videos):
    result = run_cli(f"video_dir={videos}", f"output_dir={tmp_path / 'out'}", "+score_treshold=0.3",
                     f"hydra.run.dir={tmp_path / 'h'}")
    assert result.returncode == 2 and "unknown setting score_treshold" in result.output, result.output


def test_an_empty_video_dir_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_cli(f"video_dir={tmp_path / 'empty'}", f"output_dir={tmp_path / 'out'}",
                     f"hydra.run.dir={tmp_path / 'h'}")
    assert result.returncode == 2, result.output
    assert "no videos found under video_dir=" in result.output and ".mp4" in result.output


def test_someone_elses_directory_is_refused_and_untouched(tmp_path, videos):
    theirs = tmp_path / "theirs"
    (theirs / "predictions").mkdir(parents=True)
    (theirs / "videos.parquet").write_bytes(b"the user's own table")
    result = run_cli(f"video_dir={videos}", f"output_dir={theirs}", f"hydra.run.dir={tmp_path / 'h'}")
    assert result.returncode == 2, result.output
    assert "already holds files this job did not write (predictions, videos.parquet)" in result.output
    assert sorted(p.name for p in theirs.iterdir()) == ["predictions", "videos.parquet"]
    assert (theirs / "videos.parquet").read_bytes() == b"the user's own table"


@pytest.mark.slow
def test_ray_address_auto_without_a_cluster_is_one_line(tmp_path, videos, weights_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = run_cli(f"video_dir={videos}", f"output_dir={tmp_path / 'out'}", f"model.weights={weights_path}",
                     "ray.address=auto", f"hydra.run.dir={tmp_path / 'h'}", env=env)
    assert result.returncode == 2, result.output[-3000:]
    assert "cannot connect to the Ray cluster at ray.address=auto" in result.output
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_weights_that_cannot_download_are_one_line_and_do_not_lock_the_output(tmp_path, videos, weights_path):
    """Offline, DEFAULT weights fail on the workers: one line, no worker traceback; the fix then runs."""
    common = [f"video_dir={videos}", f"output_dir={tmp_path / 'out'}", "ray.num_cpus=2", "score_threshold=0.25",
              f"hydra.run.dir={tmp_path / 'h'}"]
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "empty torch hub")}  # nothing cached: must download
    offline = run_cli(*common, env=env)
    assert offline.returncode == 2, offline.output[-3000:]
    assert "the Ray workers could not load the model: could not load torchvision's" in offline.output
    assert "Traceback" not in offline.output and "Exception raised in creation task" not in offline.output
    assert "Token authentication is enabled" not in offline.output, "an embedded Ray needs no notice about tokens"
    fixed = run_cli(*common, f"model.weights={weights_path}")
    assert fixed.returncode == 0, fixed.output[-3000:]
    assert "summary: 3 videos: 3 ok" in fixed.output


@pytest.mark.slow
def test_ctrl_c_is_one_line_exit_130_and_the_rerun_resumes(tmp_path, videos, weights_path):
    out = tmp_path / "out"
    args = [sys.executable, "-m", "job", f"video_dir={videos}", f"output_dir={out}", f"model.weights={weights_path}",
            "score_threshold=0.25", "ray.num_cpus=2", "ray.num_actors=1", "output.commit_every_frames=4",
            f"hydra.run.dir={tmp_path / 'h'}"]
    # Its own process group, as a terminal's foreground job: Ctrl-C reaches the driver and Ray's processes.
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(out.glob("predictions/*/part-*.parquet")):
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 130, output[-3000:]
    assert "interrupted; everything committed so far is kept: rerun the same command to resume" in output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output
    result = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    videos_table = pl.read_parquet(out / "videos.parquet")
    assert videos_table["status"].to_list() == ["ok"] * 3
    assert videos_table["frames_processed"].to_list() == [24] * 3
