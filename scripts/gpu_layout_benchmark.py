"""A GPU box on a machine without one: does decoding keep the (stand-in) accelerator fed?

    python scripts/gpu_layout_benchmark.py --out benchmarks/gpu.md

On a real `ray start --num-gpus=1` node of this machine (every CPU declared), the job runs with a stand-in
accelerator (`job.samples.stand_in_accelerator`: a plug-in whose forward waits `--ms-per-frame` per frame
without using the CPU, as a GPU's queue would) over generated videos of several sizes. Reported, in
interleaved rounds (medians):
  1. decoding alone on every core: one process per CPU, each decoding whole videos with PyAV on one
     thread, as the job's decoder does (`decode.iter_batches`), and one process with every thread; to RGB
     (what a decoder for a CPU model does: the issue's baseline), and to YUV planes (what the job's
     decoders hand a GPU, `colour_on_device`: a stricter baseline, often faster than the stand-in itself);
  2. the job, frames/s after start-up (the manifest's processing_seconds), for each layout given with
     --layouts (Hydra overrides), e.g. the old one (one stream) and the default (a stream per CPU);
  3. the ratio of each to the faster decoding-alone figure to RGB (the issue's target: 0.85x), and the stand-in's
     own ceiling (frames over its time alone, frames x --ms-per-frame): on the small videos it is slower
     than decoding, so there the job can only be as fast as the accelerator;
  4. per size, how two decode threads in one process scale (what a stream per CPU relies on);
  5. a timeline of the default layout's last run (the stand-in's call log): frames detected each second, by
     size, so that a phase bound by the accelerator, not by decoding, shows.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import psutil
import torch
from report import header, publish

from job.decode import BatchBuffers, iter_batches, probe
from job.samples import scene, write_video

SIZES = ((176, 144), (640, 272), (1280, 720))
LAYOUTS = {
    "1 stream x every CPU's thread, in a thread (before)": ["ray.decode_streams=1", "decode_processes=false",
                                                            "colour_on_device=false"],
    "defaults, but the decoders convert to RGB (before colour_on_device)": ["colour_on_device=false"],
    "a stream per CPU, in threads": ["decode_processes=false"],
    "defaults: a stream per CPU, in child processes": [],
    "3 streams, in child processes": ["ray.decode_streams=3"],
    "2 streams per CPU, in child processes": ["ray.decode_streams=4"],
}


def make_videos(directory: Path, frames: int, per_size: int) -> int:
    """`per_size` videos at each size, larger ones with fewer frames (a 720p one a tenth as many), with
    sensor-like noise on the generated scenes, so that they cost what real footage costs to decode."""
    total = 0
    rng = np.random.default_rng(0)
    for width, height in SIZES:
        count = max(30, round(frames * (176 * 144 / (width * height)) ** 0.5))
        for i in range(per_size):
            noisy = [np.clip(scene(k, width, height, seed=i) + rng.integers(-6, 7, (height, width, 3)), 0, 255)
                     .astype(np.uint8) for k in range(count)]
            write_video(directory / f"{width}x{height}_{i}.mp4", noisy, size=(width, height), options={"g": "50"})
            total += count
    return total


def decode_all(paths: list[str], threads: int, planar: bool = False) -> int:
    torch.set_num_threads(1)  # as in the job's actors: the frame copies into a batch use torch's threads
    frames = 0
    buffers = BatchBuffers(keep=5)  # reused as the job reuses them
    for path in paths:
        info = probe(path)
        for batch in iter_batches(path, info, batch_size=16, threads=threads, buffers=buffers, planar=planar):
            frames += len(batch.frame_indices)
            buffers.give_back(batch)
    return frames


def decode_alone(videos: list[str], processes: int, threads: int, planar: bool = False) -> float:
    """Frames/s decoding every video in `processes` processes, each taking the next video (largest first)
    as it becomes free; to RGB, or with `planar` to YUV planes (what the job's decoders hand a GPU)."""
    largest_first = sorted(videos, key=os.path.getsize, reverse=True)
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        pool.starmap(decode_all, [([], threads)] * processes)  # started and imported: not timed
        started = time.monotonic()
        frames = sum(pool.starmap(decode_all, [([path], threads, planar) for path in largest_first], chunksize=1))
        return frames / (time.monotonic() - started)


def threads_scaling(videos: list[str]) -> dict[str, float]:
    """Per size: seconds decoding its two videos one after another, over seconds decoding them in two
    threads of one process (2.0: the threads never wait on each other; 1.0: on one lock, Python's GIL)."""
    import threading

    speedups = {}
    for width, height in SIZES:
        pair = [path for path in videos if Path(path).name.startswith(f"{width}x{height}_")][:2]
        started = time.monotonic()
        decode_all(pair, 1)
        one_after_another = time.monotonic() - started
        threads = [threading.Thread(target=decode_all, args=([path], 1)) for path in pair]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        speedups[f"{width}x{height}"] = one_after_another / (time.monotonic() - started)
    return speedups


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class GpuNode:
    """`ray start --head --num-gpus=1` with every CPU, under its own temp dir; stopped by killing its processes."""

    def __init__(self, cpus: int) -> None:
        self.cpus, self.temp_dir = cpus, tempfile.mkdtemp(prefix="rayg", dir="/tmp")
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.port = free_port()

    def __enter__(self) -> GpuNode:
        ray = str(Path(sys.executable).parent / "ray")
        subprocess.run([ray, "start", "--head", f"--num-cpus={self.cpus}", "--num-gpus=1", f"--port={self.port}",
                        "--include-dashboard=false", f"--temp-dir={self.temp_dir}", "--disable-usage-stats"],
                       check=True, env=self.env, capture_output=True, timeout=120)
        return self

    def __exit__(self, *exc: object) -> None:
        mine = [p for p in psutil.process_iter(["cmdline"]) if self.temp_dir in " ".join(p.info["cmdline"] or [])]
        for proc in mine:
            try:
                proc.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(mine, timeout=10)
        for proc in alive:
            proc.kill()


def run_job(node: GpuNode, video_dir: Path, out: Path, ms_per_frame: float, extra: list[str],
            calls_log: Path | None = None) -> tuple[float, int]:
    """(frames/s after start-up, the number of status rows); with `calls_log`, the stand-in logs its calls there."""
    if calls_log is not None:
        extra = [*extra, f"+model.builder_args.calls_log={calls_log}"]
    subprocess.run([sys.executable, "-m", "job", f"video_dir={video_dir}", f"output_dir={out}",
                    f"ray.address=127.0.0.1:{node.port}", "model._target_=job.samples.stand_in_accelerator",
                    f"+model.builder_args.ms_per_frame={ms_per_frame}", "model.weights=none",
                    # A GPU's defaults (`config.for_device`): the stand-in runs on the CPU device, whose are others.
                    "batch_size=16", "prefetch_batches=2", f"hydra.run.dir={out}-hydra", *extra,
                    *([] if any(o.startswith("colour_on_device=") for o in extra) else ["colour_on_device=true"])],
                   check=True, env=node.env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = json.loads((out / "manifest.json").read_text())
    frames = manifest["totals"]["frames"]
    return frames / manifest["totals"]["processing_seconds"], pl.read_parquet(out / "videos.parquet").height


def timeline(calls_log: Path) -> list[str]:
    """Frames the stand-in detected in each second of the run, by size (its warm-up call left out)."""
    calls = [line.split() for line in calls_log.read_text().splitlines()]
    calls = [(size, int(frames), float(end)) for _, size, frames, end, *_ in calls if size != "640x480"]
    started = min(end for *_, end in calls)
    seconds = int(max(end for *_, end in calls) - started) + 1
    by_second = {f"{w}x{h}": [0] * seconds for w, h in SIZES}
    for size, frames, end in calls:
        by_second[size][int(end - started)] += frames
    lines = ["| second | " + " | ".join(by_second) + " | all |", "|---" * (len(by_second) + 2) + "|"]
    for second in range(seconds):
        counts = [by_second[size][second] for size in by_second]
        lines.append(f"| {second} | " + " | ".join(map(str, counts)) + f" | {sum(counts)} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=6000, help="frames of each 176x144 video (fewer for larger)")
    parser.add_argument("--per-size", type=int, default=2, help="videos of each size")
    parser.add_argument("--ms-per-frame", type=float, default=0.2, help="the stand-in accelerator's cost")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--videos", type=Path, help="keep the generated videos here and reuse them when there "
                        "(made with the same --frames and --per-size)")
    parser.add_argument("--only", action="append", help="run only the layouts whose name contains this (repeatable)")
    args = parser.parse_args()
    cpus = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="gpu-layout-"))
    video_dir = args.videos or work / "videos"
    if not list(video_dir.glob("*.mp4")):
        make_videos(video_dir, args.frames, args.per_size)
    videos = sorted(str(p) for p in video_dir.glob("*.mp4"))
    total = sum(probe(path).container_frames for path in videos)
    layouts = {name: overrides for name, overrides in LAYOUTS.items()
               if not args.only or any(part in name for part in args.only)}
    figures: dict[str, list[float]] = {}
    with GpuNode(cpus) as node:
        for round_ in range(args.rounds):
            figures.setdefault(f"decode alone, {cpus} processes x 1 thread", []).append(decode_alone(videos, cpus, 1))
            figures.setdefault(f"decode alone, 1 process x {cpus} threads", []).append(decode_alone(videos, 1, cpus))
            figures.setdefault(f"decode alone to YUV planes, {cpus} processes x 1 thread", []).append(
                decode_alone(videos, cpus, 1, planar=True))
            for name, overrides in layouts.items():
                out = work / f"out-{round_}-{list(LAYOUTS).index(name)}"
                calls_log = work / "calls.txt" if round_ == args.rounds - 1 and not overrides else None
                rate, rows = run_job(node, video_dir, out, args.ms_per_frame, overrides, calls_log)
                assert rows == len(videos), rows
                figures.setdefault(f"job, {name}", []).append(rate)
            for size, speedup in threads_scaling(videos).items():
                figures.setdefault(f"two {size} videos in two threads of one process, speed-up", []).append(speedup)
            print(round_, {k: round(v[-1], 1) for k, v in figures.items()}, flush=True)
    medians = {name: statistics.median(values) for name, values in figures.items()}
    decode_best = max(v for k, v in medians.items() if k.startswith("decode alone,"))  # to RGB: the issue's
    planes_best = max(v for k, v in medians.items() if k.startswith("decode alone to YUV"))
    speedups = {k: medians.pop(k) for k in list(medians) if k.endswith("speed-up")}
    lines = header("Stand-in accelerator on a `ray start --num-gpus=1` node", args,
                   f"{len(videos)} generated H.264 videos ({', '.join(f'{w}x{h}' for w, h in SIZES)}), {total} "
                   f"frames, the stand-in at {args.ms_per_frame:g} ms a frame; medians of {args.rounds} rounds")
    lines += ["", f"The stand-in alone (each frame {args.ms_per_frame:g} ms, one call at a time): at most "
              f"{1000 / args.ms_per_frame:.0f} frames/s, on any size.", ""]
    lines += ["| what | frames/s | vs decoding alone to RGB (best) | vs decoding alone to YUV planes |",
              "|---|---|---|---|"]
    for name, value in medians.items():
        lines.append(f"| {name} ({', '.join(f'{v:.0f}' for v in figures[name])}) | {value:.0f} | "
                     f"{value / decode_best:.2f}x | {value / planes_best:.2f}x |")
    lines += ["", "Decoding two videos of a size in two threads of one process, against one after another "
              "(2.0x: the threads never wait for each other):", ""]
    lines += [f"- {name.split(' videos')[0].removeprefix('two ')}: {value:.2f}x" for name, value in speedups.items()]
    if (work / "calls.txt").exists():
        lines += ["", "Frames detected in each second of the last round's run of the defaults (the stand-in's "
                  "call log):", "", *timeline(work / "calls.txt")]
    publish(lines + [""], args.out)


if __name__ == "__main__":
    main()
