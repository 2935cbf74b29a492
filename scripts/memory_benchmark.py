"""Peak memory of the whole job process tree: a short video vs a 20x longer one vs many videos.

    python scripts/memory_benchmark.py --frames 60 --size 1280x720 --out benchmarks/memory.md

Runs `python -m job` as a subprocess for each case with an embedded local Ray and samples the
proportional set size (PSS: shared pages split between the processes sharing them, so Ray's
shared object store is not counted once per worker) and the RSS of the driver and every
process it starts, every 0.1 s.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
from report import header, publish

from job.samples import calibrated_state_dict, scene, write_video


def tree_memory(root: psutil.Process) -> tuple[int, int]:
    pss = rss = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            info = proc.memory_full_info()
            pss += info.pss
            rss += info.rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return pss, rss


def run_job(video_dir: Path, out: Path, weights: Path, stride: int) -> dict:
    command = [sys.executable, "-m", "job", f"video_dir={video_dir}", f"output_dir={out}", f"model.weights={weights}",
               "score_threshold=0.25", f"frame_stride={stride}", "ray.num_actors=1", f"hydra.run.dir={out}-hydra"]
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root = psutil.Process(process.pid)
    peak_pss = peak_rss = 0
    while process.poll() is None:
        pss, rss = tree_memory(root)
        peak_pss, peak_rss = max(peak_pss, pss), max(peak_rss, rss)
        time.sleep(0.1)
    if process.returncode:
        raise SystemExit(f"job failed: {' '.join(command)}")
    return {"peak_pss_mb": peak_pss / 2**20, "peak_rss_mb": peak_rss / 2**20, "seconds": time.monotonic() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=60, help="frames of the short video")
    parser.add_argument("--size", default="1280x720")
    parser.add_argument("--stride", type=int, default=4, help="frame_stride (every frame is still decoded)")
    parser.add_argument("--many", type=int, default=20, help="number of short videos in the many-videos case")
    parser.add_argument("--out", type=Path, help="append a markdown report here")
    args = parser.parse_args()
    width, height = map(int, args.size.split("x"))

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        weights = tmp / "weights.pth"
        torch.save(calibrated_state_dict("ssdlite320_mobilenet_v3_large",
                                         [scene(i, width, height) for i in range(0, 48, 6)]), weights)
        frames = [scene(i, width, height) for i in range(args.frames)]
        write_video(tmp / "short" / "short.mp4", frames, options={"preset": "ultrafast"})
        write_video(tmp / "long" / "long.mp4", frames * 20, options={"preset": "ultrafast"})
        for i in range(args.many):
            (tmp / "many").mkdir(exist_ok=True)
            (tmp / "many" / f"v{i:03d}.mp4").write_bytes((tmp / "short" / "short.mp4").read_bytes())
        results = {}
        for case in ("short", "long", "many"):
            results[case] = run_job(tmp / case, tmp / f"out-{case}", weights, args.stride)
            print(case, {k: round(v, 1) for k, v in results[case].items()}, flush=True)

    growth_long = results["long"]["peak_pss_mb"] / results["short"]["peak_pss_mb"] - 1
    growth_many = results["many"]["peak_pss_mb"] / results["short"]["peak_pss_mb"] - 1
    lines = [
        *header("Memory", args),
        "",
        "| case | frames decoded | peak PSS of tree (MiB) | peak RSS sum (MiB) | seconds |",
        "| --- | --- | --- | --- | --- |",
    ]
    decoded = {"short": args.frames, "long": args.frames * 20, "many": args.frames * args.many}
    for case, result in results.items():
        lines.append(f"| {case} | {decoded[case]} | {result['peak_pss_mb']:.0f} | {result['peak_rss_mb']:.0f} | "
                     f"{result['seconds']:.0f} |")
    lines += ["", f"Long vs short: {growth_long:+.1%} peak PSS; {args.many} videos vs one: {growth_many:+.1%}.", ""]
    publish(lines, args.out)


if __name__ == "__main__":
    main()
