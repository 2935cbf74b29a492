"""The GPU check: one command that measures, on the job's own code paths, what a GPU box gives.

    python scripts/gpu_check.py --out benchmarks/gpu.md              # on a GPU machine (about 8 minutes)
    python scripts/gpu_check.py --device cpu --quick                 # here: the same code, tiny sizes

Measures, each in this process (no Ray, no Hydra; the job's `Detector` and `iter_batches`):
  1. model only: frames/s of each detector at fp32, fp16 and bf16 and two or three batch sizes, on frames
     already in memory, and the share of fp32's detections that fp16 and bf16 keep (same class, IoU >= 0.9);
  2. decoding only: PyAV frames/s at 1/4/8/16 threads and 1/4/8 streams at once (threads, one video each),
     to RGB and to the YUV planes the job hands a GPU (`colour_on_device`);
     NVDEC's (where PyNvVideoCodec is installed) at 1/4/8 streams, and whether its frame indices and
     timestamps are PyAV's;
  3. the job's path end to end (decode -> detect -> commit with `process.process_task`, where polars is
     installed), with PyAV (planes converted on the device, and RGB from the decoder) and with NVDEC,
     against the model-only ceiling, with the share of the time the
     device was busy; and with 1/4/8 streams feeding one model, decoding in child processes or in threads.
Wheels the machine lacks (PyAV, polars, PyNvVideoCodec) can be installed from a folder first: --wheels DIR.
Weights: seeded detectors calibrated on the frames (offline); speed does not depend on the values.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

FULL_MODELS = ["ssdlite320_mobilenet_v3_large", "fasterrcnn_mobilenet_v3_large_fpn", "fasterrcnn_resnet50_fpn_v2",
               "retinanet_resnet50_fpn_v2", "fcos_resnet50_fpn"]
QUICK_MODELS = ["ssdlite320_mobilenet_v3_large"]


def install_wheels(folder: Path) -> None:
    wheels = sorted(str(p) for p in folder.glob("*.whl"))
    if wheels:
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--quiet", *wheels],
                       check=True)


def timed(function, repeat: int) -> float:
    """Median seconds of `repeat` calls after one warm-up call."""
    import torch

    function()
    seconds = []
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        function()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def kept_share(reference, other, threshold: float) -> float | None:
    """Share of `reference`'s detections clear of the threshold that `other` also has (same class, IoU >= 0.9)."""
    from torchvision.ops import box_iou

    matched = total = 0
    for ref, oth in zip(reference, other, strict=True):
        clear = ref.scores >= threshold + 0.05
        for box, label in zip(ref.boxes[clear], ref.labels[clear], strict=True):
            total += 1
            same = oth.labels == label
            matched += bool(same.any() and box_iou(box[None], oth.boxes[same]).max() >= 0.9)
    return matched / total if total else None


def model_only(args, frames, weights_dir: Path) -> list[str]:
    import torch

    from job.config import ModelConfig, Precision
    from job.detect import Detector
    from job.samples import calibrated_state_dict

    lines = ["| model | precision | batch | frames/s | detections kept vs fp32 |", "| --- | --- | --- | --- | --- |"]
    for name in args.models:
        weights = weights_dir / f"{name}.pth"
        torch.save(calibrated_state_dict(name, [f.numpy() for f in frames[:8]]), weights)
        reference = None
        for precision in ("fp32", "fp16", "bf16"):
            detector = Detector(ModelConfig(name=name, weights=str(weights), precision=Precision(precision)),
                                args.threshold, device=args.device)
            found = detector(frames[: args.batch_sizes[0]])
            if precision == "fp32":
                reference = found
            share = "" if precision == "fp32" else kept_share(reference, found, args.threshold)
            for batch in args.batch_sizes:
                stack = frames[:batch]
                seconds = timed(lambda d=detector, s=stack: d(s), args.repeat)
                shown = "" if share in ("", None) else f"{100 * share:.1f}%"
                lines.append(f"| {name} | {precision} | {batch} | {batch / seconds:.1f} | {shown} |")
                print(lines[-1], flush=True)
    return lines


def streams_rate(video: Path, streams: int, **decoding) -> float:
    """Frames/s decoding `video` in `streams` threads at once (`decoding`: iter_batches' options)."""
    from job.decode import iter_batches, probe

    info = probe(str(video))
    counts = [0] * streams

    def decode(k: int) -> None:
        for batch in iter_batches(str(video), info, batch_size=8, **decoding):
            counts[k] += len(batch.frame_indices)

    started = time.perf_counter()
    workers = [threading.Thread(target=decode, args=(k,)) for k in range(streams)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if decoding.get("device") is not None:  # NVDEC's frames: counted once they are on the GPU
        import torch

        torch.cuda.synchronize()
    return sum(counts) / (time.perf_counter() - started)


def decoding(args, video: Path) -> list[str]:
    """PyAV's frames/s to RGB, and to the YUV planes the job hands a GPU (`colour_on_device`)."""
    lines = ["| streams | threads each | frames/s to RGB | frames/s to YUV planes |", "| --- | --- | --- | --- |"]
    for streams in args.streams:
        for threads in args.threads:
            lines.append(f"| {streams} | {threads} | {streams_rate(video, streams, threads=threads):.1f} | "
                         f"{streams_rate(video, streams, threads=threads, planar=True):.1f} |")
            print(lines[-1], flush=True)
    return lines


def nvdec_decoding(args, video: Path) -> list[str]:
    """NVDEC's frames/s with 1 to 8 streams at once, and whether its frames are PyAV's frames (indices, stamps)."""
    import numpy as np
    import torch

    from job.decode import DecodeProgress, iter_batches, nvdec_installed, probe

    if not nvdec_installed():
        return ["(skipped: PyNvVideoCodec is not installed here; pass --wheels with its wheel)"]
    if args.device != "cuda":
        return ["(skipped: NVDEC needs --device cuda)"]
    device = torch.device("cuda")
    info = probe(str(video))

    def decoded(decoder: str, progress: DecodeProgress) -> tuple[np.ndarray, np.ndarray]:
        batches = list(iter_batches(str(video), info, batch_size=8, decoder=decoder, progress=progress,
                                    device=device))
        return (np.concatenate([b.frame_indices for b in batches]), np.concatenate([b.timestamps_s for b in batches]))

    nvdec = DecodeProgress()
    (indices, stamps), (want_indices, want_stamps) = decoded("nvdec", nvdec), decoded("pyav", DecodeProgress())
    same = np.array_equal(indices, want_indices) and np.array_equal(stamps, want_stamps)
    lines = [f"Decoded by {nvdec.frames_by_decoder}; frame indices and timestamps equal PyAV's: {same}", "",
             "| streams | frames/s |", "| --- | --- |"]
    for streams in args.streams:
        rate = streams_rate(video, streams, decoder="nvdec", device=device)
        lines.append(f"| {streams} | {rate:.1f} |")
        print(lines[-1], flush=True)
    return lines


def polars_missing() -> list[str] | None:
    """The report's line when the job's path cannot run here (its output tables need polars), else None."""
    try:
        import polars  # noqa: F401
    except ImportError:
        return ["(skipped: polars is not installed here; pass --wheels with its wheel)"]
    return None


def job_detector(args, weights_dir: Path):
    """The first model's `Detector`, as the job's actors build it, on its calibrated weights."""
    from job.config import ModelConfig
    from job.detect import Detector

    name = args.models[0]
    return Detector(ModelConfig(name=name, weights=str(weights_dir / f"{name}.pth")), args.threshold,
                    device=args.device)


def end_to_end(args, video: Path, weights_dir: Path, out: Path) -> list[str]:
    if skipped := polars_missing():
        return skipped
    import torch

    from job.config import Decoder, JobConfig, for_device
    from job.decode import nvdec_installed
    from job.discover import discover_videos
    from job.output import OutputDir
    from job.process import process_task
    from job.segments import Task

    name = args.models[0]
    detector = job_detector(args, weights_dir)
    busy = [0.0]
    forward = detector.model.forward

    def measured(images):  # the device's share of the run: time inside the model, synchronised
        started = time.perf_counter()
        result = forward(images)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        busy[0] += time.perf_counter() - started
        return result

    detector.model.forward = measured
    (video_entry,) = discover_videos(str(video))
    lines = ["| model | decoder | frames | frames/s end to end | device busy |", "| --- | --- | --- | --- | --- |"]
    # PyAV handing over YUV planes converted on the device (a GPU's default), PyAV converting to RGB, NVDEC.
    variants = [("pyav, planes converted on the device", {"colour_on_device": True}),
                ("pyav, RGB from the decoder", {"colour_on_device": False})]
    if nvdec_installed() and detector.device.type == "cuda":
        variants.append(("nvdec", {"decoder": Decoder.nvdec}))
    for label, overrides in variants:
        settings = for_device(JobConfig(video_dir=str(video.parent), output_dir=str(out / f"e2e-{len(lines)}"),
                                        **overrides), detector.device.type)
        busy[0] = 0.0
        started = time.perf_counter()
        status = process_task(Task(video_entry), settings, OutputDir(settings.output_dir), detector,
                              decode_threads=args.threads[-1])
        seconds = time.perf_counter() - started
        lines.append(f"| {name} | {label} | {status.frames_processed} | "
                     f"{status.frames_processed / seconds:.1f} | {100 * busy[0] / seconds:.0f}% |")
        print(lines[-1], flush=True)
    return lines


def in_streams(tasks: list) -> tuple[list, float]:
    """Runs each of `tasks` (no arguments) in a thread of its own, all at once: (their results, seconds)."""
    results = []
    threads = [threading.Thread(target=lambda task=task: results.append(task())) for task in tasks]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, time.perf_counter() - started


def end_to_end_streams(args, video: Path, weights_dir: Path, out: Path) -> list[str]:
    """The job's path with several decode streams feeding one model, as a GPU actor runs them: each stream
    a thread running `process_task` on a video of its own, decoding in a child process (the default) or in
    a thread of this process (`decode_processes=false`)."""
    if skipped := polars_missing():
        return skipped
    import os

    from job.config import JobConfig, for_device
    from job.decode_process import DecodeProcess
    from job.discover import discover_videos
    from job.output import OutputDir
    from job.process import process_task
    from job.segments import Task

    name = args.models[0]
    detector = job_detector(args, weights_dir)
    copies = out / "copies"
    copies.mkdir(parents=True)
    for k in range(max(args.job_streams)):  # one video per stream, the same bytes
        os.link(video, copies / f"clip_{k}.mp4")
    videos = discover_videos(str(copies))
    cpus = os.cpu_count() or 1
    lines = ["| model | streams | decoding in | frames | frames/s end to end |", "| --- | --- | --- | --- | --- |"]
    for streams in args.job_streams:
        for children in (True, False):
            settings = for_device(JobConfig(video_dir=str(copies), output_dir=str(out / f"s{streams}-{children}"),
                                            decode_processes=children), detector.device.type)
            output = OutputDir(settings.output_dir)
            decoders = [DecodeProcess(settings.prefetch_batches + 3, pin=detector.device.type == "cuda")
                        for _ in range(streams)] if children else [None] * streams
            for decoder in filter(None, decoders):  # started before the clock, as an actor's are
                decoder.start()
                decoder.wait_until_up()
            statuses, seconds = in_streams(
                [functools.partial(process_task, Task(videos[k]), settings, output, detector,
                                   decode_threads=max(1, cpus // streams), decode_process=decoder)
                 for k, decoder in enumerate(decoders)])
            for decoder in filter(None, decoders):
                decoder.close()
            frames = sum(status.frames_processed for status in statuses)
            assert len(statuses) == streams and all(status.status == "ok" for status in statuses), statuses
            lines.append(f"| {name} | {streams} | {'child processes' if children else 'threads'} | {frames} | "
                         f"{frames / seconds:.1f} |")
            print(lines[-1], flush=True)
    detector.close()
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a check that it runs, not a measurement")
    parser.add_argument("--wheels", type=Path, help="install the wheels in this folder first (PyAV, polars)")
    parser.add_argument("--out", type=Path, help="append the report to this file (benchmarks/gpu.md)")
    args = parser.parse_args()
    if args.wheels:
        install_wheels(args.wheels)
    import torch

    from job.samples import scene, write_video

    if args.device == "cpu":
        torch.set_num_threads(1)  # as the job's CPU actors run the model (detect.CPU_INFERENCE_THREADS)
    quick = args.quick
    args.models = QUICK_MODELS if quick else FULL_MODELS
    args.batch_sizes = [2] if quick else [8, 32, 64]
    args.threads = [1] if quick else [1, 4, 8, 16]
    args.streams = [1, 2] if quick else [1, 4, 8]
    args.job_streams = [2] if quick else [1, 4, 8]
    args.repeat = 1 if quick else 5
    args.threshold = 0.25
    width, height, count = (160, 120, 16) if quick else (1280, 720, 300)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        scratch = Path(scratch)
        video = write_video(scratch / "videos" / "clip.mp4", [scene(i, width, height) for i in range(count)],
                            size=(width, height))
        frames = torch.stack([torch.from_numpy(scene(i, width, height)) for i in range(max(args.batch_sizes))])
        device = torch.cuda.get_device_name(0) if args.device == "cuda" and torch.cuda.is_available() else args.device
        lines = [f"## GPU check: {time.strftime('%Y-%m-%d')}", "",
                 f"Command: `python scripts/gpu_check.py --device {args.device}{' --quick' if quick else ''}`",
                 f"Machine: {device}; torch {torch.__version__}; input {count} frames {width}x{height}"
                 + (" (--quick: sizes too small to mean anything)" if quick else ""), "",
                 "Model only:", "", *model_only(args, frames, scratch), "",
                 "Decoding only (PyAV):", "", *decoding(args, video), "",
                 "Decoding only (NVDEC, frames left on the GPU):", "", *nvdec_decoding(args, video), "",
                 "The job's path (decode -> detect -> commit):", "",
                 *end_to_end(args, video, scratch, scratch / "out"), "",
                 "The job's path with several streams feeding one model (a GPU actor's layout):", "",
                 *end_to_end_streams(args, video, scratch, scratch / "streams"), ""]
    report = "\n".join(lines)
    print(report)
    if args.out:
        with open(args.out, "a") as handle:
            handle.write(report + "\n")


if __name__ == "__main__":
    main()
