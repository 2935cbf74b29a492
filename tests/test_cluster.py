"""A real Ray cluster on this machine (a head and a worker node), the job submitted through the Jobs API.

The cluster is started with `ray start` under its own temp dir and auth token, and stopped by killing
exactly the processes that carry that temp dir, so other Ray runtimes (the test session's) live on.
"""

from __future__ import annotations

import json
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
from cli import venv_without_the_project

from job.samples import write_video

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def node_ports() -> list[str]:
    """Two nodes on one machine must not share their agents' default ports (52365, ...)."""
    flags = ["--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port",
             "--runtime-env-agent-port"]
    return [f"{flag}={free_port()}" for flag in flags]


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
def ray_cluster():
    """(dashboard address, environment with the cluster's token) of a fresh head + worker node."""
    temp_dir = tempfile.mkdtemp(prefix="rayc", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           # The job's `python` must be this environment's, as in an activated venv.
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    gcs_port, dashboard_port = free_port(), free_port()
    try:
        subprocess.run([RAY, "start", "--head", "--num-cpus=1", f"--port={gcs_port}", "--include-dashboard=true",
                        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", f"--temp-dir={temp_dir}",
                        "--disable-usage-stats", *node_ports()], check=True, env=env, capture_output=True, timeout=120)
        subprocess.run([RAY, "start", f"--address=127.0.0.1:{gcs_port}", "--num-cpus=1", f"--temp-dir={temp_dir}",
                        "--disable-usage-stats", *node_ports()], check=True, env=env, capture_output=True, timeout=120)
        yield f"http://127.0.0.1:{dashboard_port}", env
    finally:
        kill_processes_under(temp_dir)


def test_job_submitted_to_a_two_node_cluster(ray_cluster, weights_path, tmp_path):
    address, env = ray_cluster
    for i in range(3):
        write_video(tmp_path / "in" / f"clip {i}.mp4", 8, size=(160, 120))
    (tmp_path / "in" / "bad.mp4").write_bytes(b"nope")
    out = tmp_path / "out"
    # The Jobs CLI as a user runs it (in its own process: Ray reads RAY_AUTH_* once per process).
    # Two 1-CPU actors on two 1-CPU nodes: the run only finishes if Ray places them on both nodes.
    command = [RAY, "job", "submit", "--address", address, "--working-dir", str(REPO),
               "--runtime-env-json", json.dumps({"excludes": [".venv/", ".git/", "demo/"]}), "--",
               "python", "-m", "job", f"video_dir={tmp_path / 'in'}", f"output_dir={out}",
               f"model.weights={weights_path}", "score_threshold=0.25", "ray.num_actors=2", "ray.cpus_per_actor=1"]
    deadline = time.monotonic() + 120
    while True:  # right after `ray start` the head's job agent may not be up yet
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        logs = result.stdout + result.stderr
        if "No available agent to submit job" not in logs or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert result.returncode == 0, "\n".join(line for line in logs.splitlines() if "packaging.py" not in line)[-6000:]
    assert "succeeded" in logs
    assert "starting 2 actors" in logs and "summary: 4 videos: 3 ok, 0 partial, 1 failed" in logs
    videos = pl.read_parquet(out / "videos.parquet")
    assert sorted(videos.filter(pl.col("status") == "ok")["path"]) == ["clip 0.mp4", "clip 1.mp4", "clip 2.mp4"]
    assert (out / "manifest.json").exists()


@pytest.fixture
def python_without_the_project(tmp_path_factory) -> Path:
    """A Python with every dependency but not `job`, like a node image with only the deps."""
    python, _ = venv_without_the_project(tmp_path_factory.mktemp("nodeenv"))
    return python


def test_the_readme_submit_command_on_a_cluster_whose_python_lacks_the_project(python_without_the_project,
                                                                              weights_path, tmp_path):
    """Without the README's PYTHONPATH=src the entrypoint fails with `No module named job` (checked by hand)."""
    python = str(python_without_the_project)
    ray_cli = [python, "-c", "import sys; from ray.scripts.scripts import main; sys.argv[0] = 'ray'; main()"]
    temp_dir = tempfile.mkdtemp(prefix="rayb", dir="/tmp")
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "PATH": f"{Path(python).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("PYTHONPATH", None)
    gcs_port, dashboard_port = free_port(), free_port()
    for i in range(2):
        write_video(tmp_path / "in" / f"clip {i}.mp4", 8, size=(160, 120))
    out = tmp_path / "out"
    try:
        subprocess.run([*ray_cli, "start", "--head", "--num-cpus=2", f"--port={gcs_port}", "--include-dashboard=true",
                        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", f"--temp-dir={temp_dir}",
                        "--disable-usage-stats", *node_ports()], check=True, env=env, capture_output=True, timeout=120)
        # The README's command, as written (the excludes only keep the upload small here).
        command = [*ray_cli, "job", "submit", "--address", f"http://127.0.0.1:{dashboard_port}", "--working-dir",
                   str(REPO), "--runtime-env-json",
                   json.dumps({"env_vars": {"PYTHONPATH": "src"}, "excludes": [".venv/", ".git/", "demo/"]}), "--",
                   "python", "-m", "job", f"video_dir={tmp_path / 'in'}", f"output_dir={out}",
                   f"model.weights={weights_path}", "score_threshold=0.25", "ray.num_actors=2", "ray.cpus_per_actor=1"]
        deadline = time.monotonic() + 120
        while True:
            result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
            logs = result.stdout + result.stderr
            if "No available agent to submit job" not in logs or time.monotonic() > deadline:
                break
            time.sleep(2)
    finally:
        kill_processes_under(temp_dir)
    assert result.returncode == 0, logs[-6000:]
    assert "summary: 2 videos: 2 ok" in logs
    assert pl.read_parquet(out / "videos.parquet")["status"].to_list() == ["ok", "ok"]


def test_an_embedded_run_does_not_join_a_ray_start_cluster_on_the_same_machine(weights_path, tmp_path):
    """`ray start` leaves its address in RAY_TMPDIR/ray/ray_current_cluster, which a plain ray.init() joins."""
    ray_tmp = tempfile.mkdtemp(prefix="rayh", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("RAY_ADDRESS", None)
    write_video(tmp_path / "in" / "clip.mp4", 8, size=(160, 120))
    try:
        subprocess.run([RAY, "start", "--head", "--num-cpus=1", f"--port={free_port()}", "--include-dashboard=false",
                        "--disable-usage-stats", *node_ports()], check=True, env=env, capture_output=True, timeout=120)
        assert (Path(ray_tmp) / "ray" / "ray_current_cluster").exists()
        result = subprocess.run(
            [sys.executable, "-m", "job", f"video_dir={tmp_path / 'in'}", f"output_dir={tmp_path / 'out'}",
             f"model.weights={weights_path}", "score_threshold=0.25", "ray.num_cpus=2",
             f"hydra.run.dir={tmp_path / 'h'}"],
            env=env, capture_output=True, text=True, timeout=600)
    finally:
        kill_processes_under(ray_tmp)
    logs = result.stdout + result.stderr
    assert result.returncode == 0, logs[-4000:]
    # Joining the 1-CPU cluster would have refused ray.num_cpus (a setting for a new runtime) or run on 1 CPU.
    assert "starting Ray (embedded)" in logs and "starting 1 actors (2 CPU" in logs


def node_processes(marker: str) -> list[psutil.Process]:
    """The raylet whose command line holds `marker` (one of its node's own ports) and everything under it."""
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "raylet" in cmdline.split(" ")[0] and marker in cmdline:
            return [proc, *proc.children(recursive=True)]
    return []


# Holds every CPU of the node it runs on (the head) until killed, so the job's actors start on the other.
BLOCKER = """
import sys, time, ray
ray.init(address=sys.argv[1])
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
@ray.remote
class Hold:
    def ready(self):
        return True
hold = Hold.options(num_cpus=int(sys.argv[2]), scheduling_strategy=here).remote()
ray.get(hold.ready.remote())
print("holding", flush=True)
time.sleep(3600)
"""


@pytest.mark.parametrize("where", ["one actor on each node", "every actor on the lost node"])
def test_a_worker_node_lost_mid_run_costs_nothing_but_time(where, weights_path, tmp_path):
    """Two `ray start` nodes; the worker node's raylet and workers are SIGKILLed once parts are being
    committed: the run ends on the head with exactly a clean run's rows. With every actor on the lost node
    (the head's CPUs held by another driver until the loss), new ones start on the head."""
    from conftest import THRESHOLD

    temp_dir = tempfile.mkdtemp(prefix="rayl", dir="/tmp")
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    for i in range(4):
        write_video(tmp_path / "in" / f"clip{i}.mp4", 48, size=(320, 240))
    settings = [f"video_dir={tmp_path / 'in'}", f"model.weights={weights_path}", f"score_threshold={THRESHOLD}",
                "device=cpu", "batch_size=4", "output.commit_every_frames=8", "ray.num_actors=2",
                "ray.cpus_per_actor=1", "ray.segment_frames=null"]
    clean = subprocess.run([sys.executable, "-m", "job", *settings, f"output_dir={tmp_path / 'clean'}",
                            "ray.num_cpus=2", f"hydra.run.dir={tmp_path / 'h1'}"], capture_output=True, text=True,
                           timeout=600, env=env)
    assert clean.returncode == 0, clean.stderr[-3000:]
    gcs_port = free_port()
    worker_ports = node_ports()
    out = tmp_path / "out"
    try:
        cpus = 1 if where == "one actor on each node" else 2
        subprocess.run([RAY, "start", "--head", f"--num-cpus={cpus}", f"--port={gcs_port}",
                        "--include-dashboard=false", f"--temp-dir={temp_dir}", "--disable-usage-stats", *node_ports()],
                       check=True, env=env, capture_output=True, timeout=120)
        blocker = None
        if where == "every actor on the lost node":
            blocker = subprocess.Popen([sys.executable, "-c", BLOCKER, f"127.0.0.1:{gcs_port}", str(cpus)],
                                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
            assert blocker.stdout.readline().strip() == "holding"
        subprocess.run([RAY, "start", f"--address=127.0.0.1:{gcs_port}", f"--num-cpus={cpus}",
                        f"--temp-dir={temp_dir}", "--disable-usage-stats", *worker_ports], check=True, env=env,
                       capture_output=True, timeout=120)
        marker = worker_ports[2].split("=")[1]  # the worker node's metrics export port, on its raylet's command line
        assert node_processes(marker), "the worker node's raylet"
        job = subprocess.Popen([sys.executable, "-m", "job", *settings, f"output_dir={out}",
                                f"ray.address=127.0.0.1:{gcs_port}", f"hydra.run.dir={tmp_path / 'h2'}"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        deadline = time.monotonic() + 300
        while len(list(out.glob("predictions/*/part-*.parquet"))) < 3:
            assert job.poll() is None and time.monotonic() < deadline, "the run ended before the node was lost"
            time.sleep(0.05)
        lost = node_processes(marker)
        actors_there = [p for p in lost if p.is_running() and "VideoWorker" in " ".join(p.cmdline())]
        assert len(actors_there) == (1 if blocker is None else 2), "the job's actors on the node to be lost"
        for proc in lost:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        if blocker is not None:  # the head's CPUs are free for new actors only now
            blocker.kill()
        output, _ = job.communicate(timeout=600)
    finally:
        for process in (locals().get("job"), locals().get("blocker")):
            if process is not None and process.poll() is None:
                process.kill()
        kill_processes_under(temp_dir)
    assert job.returncode == 0, output[-4000:]
    columns = ["path", "status", "frame_count", "frames_processed", "detections"]
    ours, theirs = (pl.read_parquet(d / "videos.parquet").select(columns).sort("path") for d in (out, tmp_path / "clean"))
    assert ours.equals(theirs)
    keys = ["video_id", "frame_index", "class_id", "x1", "y1"]
    assert pl.read_parquet(out / "predictions").sort(keys).equals(pl.read_parquet(tmp_path / "clean" / "predictions")
                                                                   .sort(keys))
