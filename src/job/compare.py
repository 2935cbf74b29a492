"""Line up the runs of a sweep side by side: `python -m job.compare OUTPUT_DIR`.

Reads every run (a directory with a manifest.json) directly under OUTPUT_DIR and prints, with polars,
one row per run (settings, frames, detections, frames/s) and detections per class, one column per run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import polars as pl

from job.write import MANIFEST, scan_predictions


def find_runs(sweep_dir: Path) -> list[Path]:
    return sorted(p.parent for p in sweep_dir.glob(f"*/{MANIFEST}"))


def runs_table(sweep_dir: Path) -> pl.DataFrame:
    rows = []
    for run_dir in find_runs(sweep_dir):
        manifest = json.loads((run_dir / MANIFEST).read_text())
        settings, totals = manifest["settings"], manifest["totals"]
        steady = totals.get("processing_seconds") or 0.0
        rows.append({
            "run": run_dir.name, "model": settings["model"], "score_threshold": settings["score_threshold"],
            "frame_stride": settings["frame_stride"], "videos": totals["videos"], "frames": totals["frames"],
            "detections": totals["detections"],
            "frames_per_s": round(totals["frames"] / steady, 2) if steady else None,
        })
    return pl.DataFrame(rows)


def per_class_table(sweep_dir: Path) -> pl.DataFrame:
    counts = [
        scan_predictions(run_dir).group_by("class_name").len().rename({"len": run_dir.name}).collect()
        for run_dir in find_runs(sweep_dir)
        if any((run_dir / "predictions").glob("*/*.parquet"))
    ]
    if not counts:
        return pl.DataFrame({"class_name": []}, schema={"class_name": pl.String})
    table = counts[0]
    for other in counts[1:]:
        table = table.join(other, on="class_name", how="full", coalesce=True)
    return table.fill_null(0).sort("class_name")


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    sweep_dir = Path(argv[0])
    if not find_runs(sweep_dir):
        print(f"no runs (directories with {MANIFEST}) under {sweep_dir}", file=sys.stderr)
        return 1
    with pl.Config(tbl_rows=200, tbl_cols=50, tbl_width_chars=200):
        print(runs_table(sweep_dir))
        print(per_class_table(sweep_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
