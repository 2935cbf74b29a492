"""The GPU layout on this CPU machine: a real `ray start` node declaring one GPU, a stand-in accelerator
(`job.samples.stand_in_accelerator`, a plug-in that waits instead of computing) playing the GPU.

The node's CPUs go to its one GPU actor, which decodes a stream per CPU (each in a child process, as
with a GPU's read-ahead), every stream feeding the one model; the detections are the CPU layout's.
"""

from __future__ import annotations

import re
import secrets
import subprocess
import time
from collections import Counter

import polars as pl
import psutil
import pytest
from cli import run_cli
from test_cluster import RAY, free_port, kill_processes_under

from job import layout
from job.samples import write_video

pytestmark = pytest.mark.slow


@pytest.fixture
def gpu_node(tmp_path_factory):
    """(address, environment) of a fresh one-node cluster: 2 CPUs and a declared GPU."""
    import os
    import sys
    import tempfile
    from pathlib import Path

    temp_dir = tempfile.mkdtemp(prefix="rayg", dir="/tmp")
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    port = free_port()
    try:
        subprocess.run([RAY, "start", "--head", "--num-cpus=2", "--num-gpus=1", f"--port={port}",
                        "--include-dashboard=false", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
                       check=True, env=env, capture_output=True, timeout=120)
        yield f"127.0.0.1:{port}", env
    finally:
        kill_processes_under(temp_dir)


def stand_in(calls_log) -> list[str]:
    return ["model._target_=job.samples.stand_in_accelerator", "model.weights=none",
            f"+model.builder_args.calls_log={calls_log}", "+model.builder_args.ms_per_frame=2", "+model.builder_args.level=90",
            "ray.segment_frames=null", "batch_size=4", "prefetch_batches=2",  # a GPU's read-ahead
            "colour_on_device=true"]  # and its colour conversion (tests/test_colour.py: within 2 levels of the CPU's)


def detections(out) -> pl.DataFrame:
    return layout.scan_predictions(str(out)).collect().sort("video_id", "frame_index", "x1")


def test_a_gpu_node_gives_one_actor_whose_streams_share_its_model(gpu_node, tmp_path):
    address, env = gpu_node
    videos = tmp_path / "in"
    for i, (frames, size) in enumerate([(120, (320, 240)), (60, (160, 120)), (60, (160, 120))]):
        write_video(videos / f"clip{i}.mp4", frames, size=size)

    gpu_calls = tmp_path / "gpu-calls.txt"
    result = run_cli(f"video_dir={videos}", f"output_dir={tmp_path / 'gpu'}", f"ray.address={address}",
                     *stand_in(gpu_calls), env=env)
    assert result.returncode == 0, result.output
    assert "starting 1 actors (2 CPU, 1 GPU, 2 decode streams each)" in result.output
    children = set(re.findall(r"decoding ahead in child process (\d+)", result.output))
    assert len(children) == 2, result.output  # a child process per stream decoded, not a thread of the actor
    deadline = time.monotonic() + 15  # and they left with the actor
    while any(psutil.pid_exists(int(pid)) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(psutil.pid_exists(int(pid)) for pid in children)

    calls = [line.split() for line in gpu_calls.read_text().splitlines()]
    calls = [call for call in calls if call[1] != "640x480"]  # the warm-up batch (`Detector.warm_up`)
    assert len({pid for pid, *_ in calls}) == 1, "one model, in one actor"
    assert sum(int(frames) for _, _, frames, *_ in calls) == 4 * 60
    assert {kind for *_, kind in calls} == {"planes"}, "YUV planes went to the model, to be converted there"
    # Two streams at once: the model's calls alternate between the large video and the small ones, where
    # one stream would give one run of calls per size.
    sizes = [size for _, size, *_ in calls]
    runs = 1 + sum(a != b for a, b in zip(sizes, sizes[1:]))
    assert runs > 8, sizes
    assert Counter(sizes) == {"320x240": 30, "160x120": 30}  # batches of 4 from each video's own frames

    cpu_calls = tmp_path / "cpu-calls.txt"
    result = run_cli(f"video_dir={videos}", f"output_dir={tmp_path / 'cpu'}", "device=cpu", "ray.num_cpus=2",
                     *stand_in(cpu_calls), env={k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"})
    assert result.returncode == 0, result.output
    gpu, cpu = detections(tmp_path / "gpu"), detections(tmp_path / "cpu")
    assert gpu["video_id"].n_unique() == 3 and gpu.equals(cpu)
    statuses = pl.read_parquet(tmp_path / "gpu" / "videos.parquet")
    assert statuses["status"].to_list() == ["ok"] * 3 and statuses["worker"].n_unique() == 1
