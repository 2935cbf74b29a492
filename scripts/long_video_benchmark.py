"""One long video: actor layouts with and without segments, and the default layout.

    python scripts/long_video_benchmark.py --out benchmarks/long_video.md

Times `python -m job` (a fresh process each run, Ray start-up included) on one generated long video,
in interleaved rounds, and reports end-to-end and after-start-up frames/s (the manifest's
processing_seconds: actors ready to last video written). Layouts:
  1. one actor with 1 CPU, the video whole (the baseline the 2-actor figure is compared with);
  2. one actor with all (2) CPUs, the video whole: the job's layout before segments;
  3. two actors with 1 CPU each, the video in segments;
  4. the defaults (`ray.*` unset): what a user gets.
Weights: a seeded model calibrated on the frames (offline); speed does not depend on the values.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from report import header, publish

from job.samples import calibrated_state_dict, scene, write_video

MODEL = "ssdlite320_mobilenet_v3_large"
LAYOUTS = {
    "1x1_whole": ["ray.num_actors=1", "ray.cpus_per_actor=1", "ray.segment_frames=null"],
    "1x2_whole": ["ray.num_actors=1", "ray.cpus_per_actor=2", "ray.segment_frames=null"],
    "2x1_segments": ["ray.num_actors=2", "ray.cpus_per_actor=1"],
    "default": [],
}
LABELS = {
    "1x1_whole": "1 actor x 1 CPU, whole video",
    "1x2_whole": "1 actor x 2 CPUs, whole video (the layout before segments)",
    "2x1_segments": "2 actors x 1 CPU, segments",
    "default": "defaults (ray.* unset)",
}


def run_job(video_dir: Path, out: Path, weights: Path, extra: list[str]) -> tuple[float, float]:
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "job", f"video_dir={video_dir}", f"output_dir={out}",
                    f"model.weights={weights}", "score_threshold=0.2", "device=cpu", f"hydra.run.dir={out}-hydra",
                    *extra], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.monotonic() - started
    return seconds, json.loads((out / "manifest.json").read_text())["totals"]["processing_seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=1500)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=272)
    parser.add_argument("--gop", type=int, default=50, help="keyframe interval of the generated video")
    parser.add_argument("--segment-frames", type=int, default=None,
                        help="ray.segment_frames for the segmented layouts (default: the job's)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    segments = [f"ray.segment_frames={args.segment_frames}"] if args.segment_frames else []

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        video_dir = tmp / "videos"
        write_video(video_dir / "long.mp4", [scene(k, args.width, args.height) for k in range(args.frames)],
                    size=(args.width, args.height), options={"g": str(args.gop)})
        weights = tmp / "weights.pth"
        torch.save(calibrated_state_dict(MODEL, [scene(k, args.width, args.height) for k in range(0, 48, 4)]),
                   weights)
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in LAYOUTS}
        for round_ in range(args.repeat):
            for name, extra in LAYOUTS.items():
                extra = extra + (segments if "segment_frames=null" not in " ".join(extra) else [])
                runs[name].append(run_job(video_dir, tmp / f"out-{name}-{round_}", weights, extra))
            print(f"round {round_ + 1}:", {name: round(args.frames / r[-1][0], 1) for name, r in runs.items()},
                  flush=True)

    end_to_end = {name: statistics.median(args.frames / s for s, _ in r) for name, r in runs.items()}
    steady = {name: statistics.median(args.frames / p for _, p in r) for name, r in runs.items()}
    base = "1x1_whole"
    lines = [
        *header("One long video", args, f"one {args.width}x{args.height} H.264 video of {args.frames} frames "
                f"(keyframe every {args.gop}); {MODEL}, score_threshold=0.2, batch_size 4 (the CPU default)"),
        "",
        f"Each figure is the median of {args.repeat} interleaved rounds.",
        "",
        "| layout | frames/s end to end | frames/s after start-up | after start-up vs 1 actor x 1 CPU | "
        "end to end in each round |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name in LAYOUTS:
        each = ", ".join(f"{args.frames / s:.1f}" for s, _ in runs[name])
        lines.append(f"| {LABELS[name]} | {end_to_end[name]:.1f} | {steady[name]:.1f} | "
                     f"{steady[name] / steady[base]:.2f}x | {each} |")
    lines.append("")
    publish(lines, args.out)


if __name__ == "__main__":
    main()
