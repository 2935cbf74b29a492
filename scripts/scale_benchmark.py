"""Many tiny clips: the job's own cost per video, a first run and a rerun with everything done.

    python scripts/scale_benchmark.py --videos 1000 --store local --out benchmarks/scale.md
    python scripts/scale_benchmark.py --videos 200 --store s3 --out benchmarks/scale.md

10-frame 64x48 clips and a plug-in detector that costs nothing (tests/plugins.py), so only the job's own
overhead is measured (PYTHONPATH=/another/checkout/src measures that version's job the same way). With --store s3 the videos and output_dir are on moto's S3 server on localhost, behind
a proxy that counts every request (tests/faults.py, failing none). Prints seconds, requests and files per video.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from urllib.parse import unquote

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from report import header, publish  # noqa: E402

from job.samples import write_video  # noqa: E402

BUCKET = "job-scale-bucket"
VIDEO_OR_NUMBER = re.compile(r"v\d{6}[^/.]*|\d{2,}")


def run_job(video_dir: str, output_dir: str, env: dict, log_dir: Path) -> float:
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "job", f"video_dir={video_dir}", f"output_dir={output_dir}",
                    "model._target_=plugins.build_nothing", "device=cpu", f"hydra.run.dir={log_dir}"],
                   check=True, env={**env, "PYTHONPATH": os.pathsep.join(filter(None, [env.get("PYTHONPATH"),
                                                                                         str(REPO / "tests")]))},
                   stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.monotonic() - started


def request_kind(method: str, path: str) -> str:
    """A request with its video ids and numbers starred out: `GET out/_state/progress/*`, `LIST out/predictions/*`."""
    where, _, query = unquote(path).partition("?")
    params = dict(item.partition("=")[::2] for item in query.split("&") if item)
    if method == "GET" and "list-type" in params:
        method, where = "LIST", f"{where.rstrip('/')}/{params.get('prefix', '')}"
    key = where.lstrip("/").split("/", 1)[-1]
    return f"{method} {VIDEO_OR_NUMBER.sub('*', key)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=200)
    parser.add_argument("--store", choices=["local", "s3"], default="local")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="job-scale-"))
    clip = tmp / "clip.mp4"
    write_video(clip, 10, size=(64, 48))
    rows = []
    kinds: dict[str, Counter] = {}
    if args.store == "local":
        for i in range(args.videos):
            (tmp / "videos").mkdir(exist_ok=True)
            os.link(clip, tmp / "videos" / f"v{i:06d}.mp4")
        for run in ("first run", "rerun, all done"):
            seconds = run_job(str(tmp / "videos"), str(tmp / "out"), dict(os.environ), tmp / f"h-{run[:5]}")
            files = sum(1 for p in (tmp / "out").rglob("*") if p.is_file() and ".hydra_logs" not in p.parts)
            rows.append((run, seconds, None, files / args.videos))
    else:
        import boto3
        from faults import FlakyProxy
        from moto.server import ThreadedMotoServer

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ALLOW_HTTP": "true"}
        os.environ.update(env)
        client = boto3.client("s3")
        client.create_bucket(Bucket=BUCKET)
        for i in range(args.videos):
            client.upload_file(str(clip), BUCKET, f"videos/v{i:06d}.mp4")
        with FlakyProxy(env["AWS_ENDPOINT_URL"]) as proxy:
            proxy.failing = False
            for run in ("first run", "rerun, all done"):
                before = proxy.requests
                seen_before = len(proxy.seen)
                seconds = run_job(f"s3://{BUCKET}/videos", f"s3://{BUCKET}/out",
                                  {**os.environ, "AWS_ENDPOINT_URL": proxy.url}, tmp / f"h-{run[:5]}")
                listing = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="out/")
                files = sum(len(page.get("Contents", [])) for page in listing)
                rows.append((run, seconds, (proxy.requests - before) / args.videos, files / args.videos))
                kinds[run] = Counter(request_kind(method, path) for method, path in proxy.seen[seen_before:])
        server.stop()
    lines = [*header("Many tiny clips", args, f"{args.videos} clips of 10 frames (64x48 H.264), a plug-in detector "
                     f"that costs nothing; output on {'moto S3 behind a counting proxy' if args.store == 's3' else 'local disk'}"),
             "", "| run | seconds | ms per video | requests per video | files per video |",
             "| --- | --- | --- | --- | --- |"]
    for run, seconds, requests, files in rows:
        lines.append(f"| {run} | {seconds:.1f} | {1000 * seconds / args.videos:.1f} | "
                     f"{'' if requests is None else f'{requests:.2f}'} | {files:.2f} |")
    for run, counts in kinds.items():
        lines += ["", f"Requests of the {run}, by kind (per video):", "", "| request | per video |", "| --- | --- |"]
        lines += [f"| `{kind}` | {count / args.videos:.3f} |" for kind, count in counts.most_common()]
    lines.append("")
    publish(lines, args.out)


if __name__ == "__main__":
    main()
