"""Reading one long s3:// video in segments: in place (ranged reads), a copy per segment, a copy per node.

    python scripts/object_store_benchmark.py --out benchmarks/object_store.md

Starts moto's S3 server on localhost, uploads a generated long video, and times what the workers of a
split video do to read it, without the detector (the same in every case):
  1. copy per segment: each segment's worker copies the whole object, then reads it locally (the job
     before this measurement);
  2. in place: each segment reads the object through pyarrow's S3 file with ranged GETs, PyAV's reads
     going through a read-ahead buffer of --read-ahead-mib;
  3. one copy per node: the object is copied once, every segment reads the copy.
Per segment, the reads mirror decode.py's three passes: probe (stream info and the first frame), the
packet scan (every packet's PTS and keyframe flag, demuxed, not decoded) and the segment's frames
(seek to its keyframe, decode to its end). Rounds are interleaved; figures are medians.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import av
import boto3
from report import header, publish

from job.samples import write_video

BUCKET = "bench"
KEY = "videos/long.mp4"


class RangedReader(io.RawIOBase):
    """A pyarrow random-access file as a raw stream, so io.BufferedReader can read ahead over it."""

    def __init__(self, remote) -> None:
        self.remote = remote

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.remote.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.remote.seek(offset, whence)

    def tell(self) -> int:
        return self.remote.tell()


def read_segment(open_video, start_pts: int | None, end_pts: int | None) -> int:
    """decode.py's three passes over one segment; the frames decoded in it."""
    with av.open(open_video()) as container:  # probe
        stream = container.streams.video[0]
        next(container.decode(stream))
    with av.open(open_video()) as container:  # the packet scan
        keyframes = [p.pts for p in container.demux(container.streams.video[0]) if p.is_keyframe]
    assert keyframes
    frames = 0
    with av.open(open_video()) as container:  # the segment's frames
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        if start_pts is not None:
            container.seek(start_pts, stream=stream, backward=True, any_frame=False)
        for frame in container.decode(stream):
            if end_pts is not None and frame.pts >= end_pts:
                break
            if start_pts is None or frame.pts >= start_pts:
                frames += 1
    return frames


def segment_bounds(path: Path, segments: int) -> list[tuple[int | None, int | None]]:
    with av.open(str(path)) as container:
        keyframes = sorted(p.pts for p in container.demux(container.streams.video[0]) if p.is_keyframe)
    cuts = [keyframes[round(i * len(keyframes) / segments)] for i in range(1, segments)]
    return list(zip([None, *cuts], [*cuts, None]))


def copy_object(client, target: Path) -> None:
    with open(target, "wb") as handle:
        shutil.copyfileobj(client.get_object(Bucket=BUCKET, Key=KEY)["Body"], handle, 8 << 20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=9000)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=272)
    parser.add_argument("--bitrate-kbps", type=int, default=2000,
                        help="constant bitrate: generated scenes compress far below real footage otherwise")
    parser.add_argument("--segments", type=int, default=5)
    parser.add_argument("--read-ahead-mib", type=float, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, help="append the report to this markdown file")
    args = parser.parse_args()

    from moto.server import ThreadedMotoServer
    from pyarrow import fs as pafs

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update({"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION":
                       "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ALLOW_HTTP": "true"})
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    work = Path(tempfile.mkdtemp(prefix="job-object-store-bench-"))
    source = work / "long.mp4"
    rate = f"{args.bitrate_kbps}k"
    write_video(source, args.frames, size=(args.width, args.height),
                options={"g": "50", "b": rate, "minrate": rate, "maxrate": rate, "bufsize": rate,
                         "x264-params": "nal-hrd=cbr"})
    client.upload_file(str(source), BUCKET, KEY)
    size_mib = source.stat().st_size / 2**20
    bounds = segment_bounds(source, args.segments)
    s3 = pafs.S3FileSystem(endpoint_override=f"http://{host}:{port}", scheme="http", access_key="test",
                           secret_key="test", region="us-east-1")
    read_ahead = int(args.read_ahead_mib * 2**20)

    def in_place() -> int:
        return sum(read_segment(lambda: io.BufferedReader(RangedReader(s3.open_input_file(f"{BUCKET}/{KEY}")),
                                                          read_ahead), *bound) for bound in bounds)

    def copy_per_segment() -> int:
        frames = 0
        for bound in bounds:
            copy = work / "segment-copy.mp4"
            copy_object(client, copy)
            frames += read_segment(lambda copy=copy: str(copy), *bound)
            copy.unlink()
        return frames

    def copy_per_node() -> int:
        copy = work / "node-copy.mp4"
        copy_object(client, copy)
        frames = sum(read_segment(lambda: str(copy), *bound) for bound in bounds)
        copy.unlink()
        return frames

    cases = {"copy per segment (before)": copy_per_segment, "in place (ranged reads)": in_place,
             "one copy per node": copy_per_node}
    seconds: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeat):
        for name, case in cases.items():
            started = time.monotonic()
            assert case() == args.frames, name
            seconds[name].append(time.monotonic() - started)
    server.stop()
    shutil.rmtree(work)

    fastest = min(statistics.median(s) for s in seconds.values())
    lines = [
        "",
        *header("Reading a split s3:// video", args, f"one {args.width}x{args.height} H.264 video of {args.frames} "
                f"frames ({size_mib:.1f} MiB, {args.bitrate_kbps} kb/s), keyframe every 50, in {args.segments} "
                f"segments, on moto's S3 server on localhost; reading and decoding only (no detector)"),
        "",
        "| reading | seconds for all segments (median) | vs fastest | each round |",
        "| --- | --- | --- | --- |",
    ]
    for name, values in seconds.items():
        median = statistics.median(values)
        lines.append(f"| {name} | {median:.2f} | {median / fastest:.2f}x | "
                     f"{', '.join(f'{v:.2f}' for v in values)} |")
    publish(lines, args.out)


if __name__ == "__main__":
    main()
