"""A real Ray cluster on this machine (a head and a worker node), the job submitted through the Jobs API.

The cluster is started with `ray start` under its own temp dir and auth token, and stopped by killing
exactly the processes that carry that temp dir, so other Ray runtimes (the test session's) live on.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl
import psutil
import pytest

from job.samples import write_video

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def kill_processes_under(temp_dir: str) -> None:
    mine = [p for p in psutil.process_iter(["cmdline"]) if temp_dir in " ".join(p.info["cmdline"] or [])]
    for proc in mine:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(mine, timeout=10)
    for proc in alive:
        proc.kill()


@pytest.fixture
def ray_cluster(monkeypatch):
    temp_dir = tempfile.mkdtemp(prefix="rayc", dir="/tmp")  # short: Ray's socket paths have a length limit
    token = secrets.token_hex(32)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    gcs_port, dashboard_port = free_port(), free_port()
    try:
        subprocess.run([RAY, "start", "--head", "--num-cpus=1", f"--port={gcs_port}", "--include-dashboard=true",
                        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", f"--temp-dir={temp_dir}",
                        "--disable-usage-stats"], check=True, env=env, capture_output=True, timeout=120)
        subprocess.run([RAY, "start", f"--address=127.0.0.1:{gcs_port}", "--num-cpus=1", f"--temp-dir={temp_dir}",
                        "--disable-usage-stats"], check=True, env=env, capture_output=True, timeout=120)
        yield f"http://127.0.0.1:{dashboard_port}"
    finally:
        kill_processes_under(temp_dir)


def test_job_submitted_to_a_two_node_cluster(ray_cluster, weights_path, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    for i in range(3):
        write_video(tmp_path / "in" / f"clip {i}.mp4", 8, size=(160, 120))
    (tmp_path / "in" / "bad.mp4").write_bytes(b"nope")
    out = tmp_path / "out"
    client = JobSubmissionClient(ray_cluster)
    # Two 1-CPU actors on two 1-CPU nodes: the run only finishes if Ray places them on both nodes.
    job_id = client.submit_job(
        entrypoint=f"python -m job video_dir='{tmp_path / 'in'}' output_dir='{out}' model.weights='{weights_path}' "
                   f"score_threshold=0.25 ray.num_actors=2 ray.cpus_per_actor=1",
        runtime_env={"working_dir": str(REPO), "excludes": [".venv/", ".git/", "demo/"]},
    )
    deadline = time.monotonic() + 600
    while (status := client.get_job_status(job_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.monotonic() < deadline, client.get_job_logs(job_id)[-3000:]
        time.sleep(1)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert "starting 2 actors" in logs and "summary: 4 videos: 3 ok, 0 partial, 1 failed" in logs
    videos = pl.read_parquet(out / "videos.parquet")
    assert sorted(videos.filter(pl.col("status") == "ok")["path"]) == ["clip 0.mp4", "clip 1.mp4", "clip 2.mp4"]
    assert (out / "manifest.json").exists()
