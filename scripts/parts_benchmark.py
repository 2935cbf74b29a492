"""How readers cope with many small parts: the same detections as N parts, or compacted into fewer files.

    pip install -e ".[bench]"   # Ray Data needs pandas
    python scripts/parts_benchmark.py --rows 1000000 --files 100000 10000 1000 --out benchmarks/parts.md

Writes the output layout's `predictions/video_id=<id>/part-*.parquet` tree on local disk, the same rows
each time, split into each number of files (one video per file at the most files, as a bucket of tiny clips
gives; a few videos' parts merged at the fewest), then times what users run on it: polars'
`scan_parquet("predictions/**")` (a count, and a filter on one class), and Ray Data's `read_parquet` (a
count). Prints seconds per reader and file count.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from report import header, publish  # noqa: E402

from job.layout import PREDICTION_SCHEMA, part, scan_predictions  # noqa: E402


def rows(n: int, seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    return pl.DataFrame({
        "frame_index": np.arange(n) % 10, "timestamp_s": (np.arange(n) % 10) / 30.0,
        "class_id": rng.integers(1, 10, n), "class_name": "person", "score": rng.random(n, dtype=np.float32),
        "x1": rng.random(n, dtype=np.float32), "y1": rng.random(n, dtype=np.float32),
        "x2": rng.random(n, dtype=np.float32), "y2": rng.random(n, dtype=np.float32),
    }, schema=PREDICTION_SCHEMA)


def write_tree(root: Path, table: pl.DataFrame, files: int) -> None:
    """`files` parts of equal size; the bytes of one are reused where their rows are alike (speed only)."""
    per_file = table.height // files
    first = root / "template.parquet"
    table.slice(0, per_file).write_parquet(first, compression="zstd", statistics=True)
    for i in range(files):
        target = root / part(f"v{i:06d}-0000000000", 0, 10)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(first, target)
    first.unlink()


def timed(call) -> tuple[float, object]:
    started = time.perf_counter()
    value = call()
    return time.perf_counter() - started, value


def measure(root: Path, ray_too: bool) -> tuple[int, float, float, float | None]:
    """(rows, polars count s, polars filter s, Ray Data count s) on the tree under `root`."""
    count_s, count = timed(lambda: scan_predictions(str(root)).select(pl.len()).collect().item())
    filter_s, _ = timed(lambda: scan_predictions(str(root)).filter(pl.col("class_id") == 3).collect())
    ray_s = None
    if ray_too:
        import ray

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        ray_s, _ = timed(lambda: ray.data.read_parquet(str(root / "predictions")).count())
        ray.shutdown()
    return count, count_s, filter_s, ray_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--files", type=int, nargs="+", default=[100_000, 1_000, 100])
    parser.add_argument("--skip-ray", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    table = rows(args.rows)
    results = []
    for files in args.files:
        root = Path(tempfile.mkdtemp(prefix="job-parts-"))
        write_tree(root, table, files)
        results.append((files, *measure(root, ray_too=not args.skip_ray)))
        print(results[-1], flush=True)
        shutil.rmtree(root)
    lines = [*header("Many parts", args, f"{args.rows:,} detection rows in each number of files, local disk"), "",
             "| files | rows | polars count (s) | polars filter on a class (s) | Ray Data count (s) |",
             "| --- | --- | --- | --- | --- |"]
    for files, count, count_s, filter_s, ray_s in results:
        lines.append(f"| {files:,} | {count:,} | {count_s:.2f} | {filter_s:.2f} | "
                     f"{'' if ray_s is None else f'{ray_s:.1f}'} |")
    lines.append("")
    publish(lines, args.out)


if __name__ == "__main__":
    main()
