"""Throughput: our job vs a hand-written Ray Data pipeline vs the seed's temp-file loop.

    pip install -e ".[bench]" && python scripts/benchmark.py --out benchmarks/throughput.md

On the same generated videos, model (ssdlite320_mobilenet_v3_large), weights and threshold,
times in one run:
  1. our job (`python -m job`, a fresh process, Ray start-up included);
  2. Ray Data as users write it: read_videos -> map_batches(Detector, batch_size=16, concurrency=1)
     -> write_parquet, the model at torchvision's default settings, filtered by score afterwards;
     and as an expert writes it: the threshold in the builder, a 1-thread actor on 1 CPU;
  3. the seed app's loop: each frame written to a temporary JPEG, read back, model([image]);
  4. decode only (same frames; PyAV, the job's default decoder, and our decord path);
  5. model only (same frames already in memory, the model configured exactly as the job does), in
     this process, and in Ray actors set up as the job's: one with every thread, one 1-thread actor per CPU.
Weights: a seeded model calibrated on the frames (offline); speed does not depend on the values.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from report import header, publish

from job.config import JobConfig, ModelConfig, for_device
from job.detect import Detector
from job.samples import calibrated_state_dict, scene, write_video

MODEL = "ssdlite320_mobilenet_v3_large"
# Ray Data as users write it ("usual": torchvision's default score_thresh, so thousands of low-score boxes
# are decoded and suppressed per frame, then filtered; one actor on every thread), and as an expert writes
# it ("expert": the threshold passed to the builder; one single-threaded actor on one CPU, leaving the other
# CPU to read_videos; two such actors hang on 2 CPUs, the read tasks getting no CPU).
RAY_DATA_PIPELINE = r'''
import sys
import numpy as np, ray, torch
from torchvision.models import get_model

video_dir, out, weights, threshold, style = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5]
expert = style == "expert"


class Detector:
    def __init__(self):
        if expert:
            torch.set_num_threads(1)
        self.model = get_model("ssdlite320_mobilenet_v3_large", weights=None, weights_backbone=None, num_classes=91,
                               **({"score_thresh": threshold} if expert else {}))
        self.model.load_state_dict(torch.load(weights, weights_only=True))
        self.model.eval()

    def __call__(self, batch):
        images = [torch.from_numpy(np.asarray(f)).permute(2, 0, 1).float() / 255 for f in batch["frame"]]
        with torch.inference_mode():
            outputs = self.model(images)
        rows = {"frame_index": [], "boxes": [], "scores": [], "labels": []}
        for index, out in zip(batch["frame_index"], outputs):
            keep = out["scores"] >= threshold
            rows["frame_index"].append(int(index))
            rows["boxes"].append(out["boxes"][keep].numpy().tolist())
            rows["scores"].append(out["scores"][keep].numpy().tolist())
            rows["labels"].append(out["labels"][keep].numpy().tolist())
        return rows


ray.init(num_cpus=2, include_dashboard=False)
ds = ray.data.read_videos(video_dir)
ds.map_batches(Detector, batch_size=16, concurrency=1, **({"num_cpus": 1} if expert else {})).write_parquet(out)
'''

# The model-only loop again, in Ray actors set up as the job's (embedded Ray, the job's worker environment,
# CPUs and torch threads), as 1 actor x all threads or one 1-thread actor per CPU, the frames shared out:
# what Ray's runtime costs the model apart from our pipeline, and which layout of processes x threads is fastest.
MODEL_IN_ACTORS = r'''
import os, sys, time
import ray
from job.execute import WORKER_ENV_VARS

video_dir, weights, threshold, batch_size, actors = (sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]),
                                                     int(sys.argv[5]))
cpus = os.cpu_count()
os.environ.update(WORKER_ENV_VARS)
ray.init(num_cpus=cpus, include_dashboard=False, logging_level="WARNING")


@ray.remote
class ModelOnly:
    def __init__(self, share):
        import torch
        from pathlib import Path
        from job.config import ModelConfig
        from job.decode import iter_batches, probe
        from job.detect import Detector

        torch.set_num_threads(max(1, cpus // actors))
        self.detector = Detector(ModelConfig(name="ssdlite320_mobilenet_v3_large", weights=weights), threshold,
                                 device="cpu")
        batches = [b.frames for v in sorted(Path(video_dir).iterdir())
                   for b in iter_batches(str(v), probe(str(v)), batch_size=batch_size)]
        self.batches = batches[share::actors]
        self.detector(self.batches[0])  # warm-up

    def run(self):
        for batch in self.batches:
            self.detector(batch)


workers = [ModelOnly.options(num_cpus=cpus / actors).remote(i) for i in range(actors)]
ray.get([w.__ray_ready__.remote() for w in workers])
started = time.monotonic()
ray.get([w.run.remote() for w in workers])
print(time.monotonic() - started)
'''


def timed(command: list[str]) -> float:
    started = time.monotonic()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.monotonic() - started


def run_job(video_dir: Path, out: Path, weights: Path, threshold: float, extra: list[str]) -> tuple[float, float]:
    """Wall seconds, and seconds after start-up (actors ready) as the job's manifest records them."""
    seconds = timed([sys.executable, "-m", "job", f"video_dir={video_dir}", f"output_dir={out}",
                     f"model.weights={weights}", f"score_threshold={threshold}", f"hydra.run.dir={out}-hydra",
                     *extra])
    totals = json.loads((out / "manifest.json").read_text())["totals"]
    return seconds, totals["processing_seconds"]


def run_ray_data(video_dir: Path, out: Path, weights: Path, threshold: float, tmp: Path, style: str) -> float:
    script = tmp / "ray_data_pipeline.py"
    script.write_text(RAY_DATA_PIPELINE)
    return timed([sys.executable, str(script), str(video_dir), str(out), str(weights), str(threshold), style])


def run_model_in_actors(video_dir: Path, weights: Path, threshold: float, batch_size: int, tmp: Path,
                        actors: int) -> float:
    script = tmp / "model_in_actors.py"
    script.write_text(MODEL_IN_ACTORS)
    done = subprocess.run([sys.executable, str(script), str(video_dir), str(weights), str(threshold), str(batch_size),
                           str(actors)], check=True, capture_output=True, text=True)
    return float(done.stdout.strip().splitlines()[-1])


def run_temp_file_loop(videos: list[Path], weights: Path, threshold: float, tmp: Path) -> float:
    import decord
    from PIL import Image
    from torchvision.models import get_model
    from torchvision.transforms.functional import to_tensor

    started = time.monotonic()
    model = get_model(MODEL, weights=None, weights_backbone=None, num_classes=91)
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    kept = 0
    for video in videos:
        reader = decord.VideoReader(str(video))
        for i in range(len(reader)):
            path = tmp / "frame.jpg"
            Image.fromarray(reader[i].asnumpy()).save(path)
            image = to_tensor(Image.open(path).convert("RGB"))
            with torch.inference_mode():
                out = model([image])[0]
            kept += int((out["scores"] >= threshold).sum())
    return time.monotonic() - started


def decode_only(videos: list[Path], batch_size: int, decoder: str) -> tuple[float, list[torch.Tensor]]:
    from job.decode import iter_batches, probe

    started = time.monotonic()
    batches = []
    for video in videos:
        info = probe(str(video))
        batches.extend(b.frames for b in iter_batches(str(video), info, batch_size=batch_size, decoder=decoder))
    return time.monotonic() - started, batches


def model_only(batches: list[torch.Tensor], detector) -> float:
    detector(batches[0])  # warm-up, as the job's actors are warm after the first batch
    started = time.monotonic()
    for batch in batches:
        detector(batch)
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=3, help="number of 640x272 videos")
    parser.add_argument("--large", type=int, default=2, help="number of 1280x720 videos")
    parser.add_argument("--frames", type=int, default=200, help="frames per video")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; each figure is the median")
    parser.add_argument("--threshold", type=float, default=0.2)
    parser.add_argument("--batch-size", type=int, help="the job's batch_size (default: the job's default)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["ray_data", "temp_file"])
    parser.add_argument("--out", type=Path, help="append a markdown report here")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        video_dir = tmp / "videos"
        sizes = [(640, 272)] * args.small + [(1280, 720)] * args.large
        videos = [write_video(video_dir / f"v{i}_{w}x{h}.mp4", [scene(k, w, h, seed=i) for k in range(args.frames)])
                  for i, (w, h) in enumerate(sizes)]
        total = len(videos) * args.frames
        weights = tmp / "weights.pth"
        torch.save(calibrated_state_dict(MODEL, [scene(k, 640, 272) for k in range(0, 48, 4)]), weights)

        # The model exactly as the job's actors configure it, with the job's batch size.
        detector = Detector(ModelConfig(name=MODEL, weights=str(weights)), args.threshold, device="cpu")
        batch_size = for_device(JobConfig(batch_size=args.batch_size), detector.device.type).batch_size

        # Rounds interleave the pipelines so that a slow spell of a shared machine hits all of them.
        runs: dict[str, list[float]] = {}
        for round_ in range(args.repeat):
            measured = {}
            measured["job"], measured["job_steady"] = run_job(
                video_dir, tmp / f"out-job-{round_}", weights, args.threshold, [f"batch_size={batch_size}"])
            if "ray_data" not in args.skip:
                measured["ray_data"] = run_ray_data(video_dir, tmp / f"out-ray-data-{round_}", weights,
                                                    args.threshold, tmp, "usual")
                measured["ray_data_expert"] = run_ray_data(video_dir, tmp / f"out-ray-data-expert-{round_}", weights,
                                                           args.threshold, tmp, "expert")
            if "temp_file" not in args.skip:
                measured["temp_file"] = run_temp_file_loop(videos, weights, args.threshold, tmp)
            measured["decode_decord"], _ = decode_only(videos, batch_size, "decord")
            measured["decode_only"], batches = decode_only(videos, batch_size, "pyav")
            measured["model_only"] = model_only(batches, detector)
            cpus = os.cpu_count() or 1
            measured["model_in_actor"] = run_model_in_actors(video_dir, weights, args.threshold, batch_size, tmp, 1)
            if cpus > 1:
                measured["model_in_actors"] = run_model_in_actors(video_dir, weights, args.threshold, batch_size,
                                                                  tmp, cpus)
            del batches
            for name, value in measured.items():
                runs.setdefault(name, []).append(value)
            print(f"round {round_ + 1}:", {name: round(total / s, 1) for name, s in measured.items()}, flush=True)

    seconds = {name: statistics.median(values) for name, values in runs.items()}
    fps = {name: total / s for name, s in seconds.items()}
    labels = {
        "job": "our job (`python -m job`, end to end: Ray start-up and model load included)",
        "job_steady": "our job after start-up (actors ready to last video written)",
        "ray_data": "Ray Data as usually written: read_videos -> map_batches(batch_size=16, concurrency=1) -> "
                    "write_parquet, torchvision's default score_thresh, one actor on every thread",
        "ray_data_expert": "Ray Data as an expert writes it: score_thresh in the builder, one 1-thread actor "
                           "with num_cpus=1 (the other CPU reads)",
        "temp_file": "seed loop: frame -> temp JPEG -> model([image])",
        "decode_only": "decode only (PyAV, the job's default decoder)",
        "decode_decord": "decode only (our decord path, `decoder=decord`)",
        "model_only": "model only (frames in memory, configured as the job)",
        "model_in_actor": "model only, in one Ray actor with every thread, set up as the job's",
        "model_in_actors": "model only, in one 1-thread Ray actor per CPU, set up as the job's",
    }
    lines = [
        *header("Throughput", args, f"{args.small} x 640x272 and {args.large} x 1280x720 videos, {args.frames} "
                f"frames each ({total} frames); {MODEL}, score_threshold={args.threshold}, batch_size={batch_size}"),
        "",
        f"Each figure is the median of {args.repeat} interleaved rounds.",
        "",
        "| pipeline | seconds | frames/s | frames/s in each round | our job is (which figure) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, value in fps.items():
        # End-to-end pipelines are compared end to end; the in-memory model with the job's steady state.
        ours = "job_steady" if name.startswith(("model_", "decode_")) else "job"
        ratio = fps[ours] / value
        each = ", ".join(f"{total / s:.1f}" for s in runs[name])
        lines.append(f"| {labels[name]} | {seconds[name]:.1f} | {value:.1f} | {each} | {ratio:.2f}x ({ours}) |")
    lines.append("")
    publish(lines, args.out)


if __name__ == "__main__":
    main()
