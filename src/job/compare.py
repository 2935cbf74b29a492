"""Line up the runs of a sweep side by side: `python -m job.compare OUTPUT_DIR [--by map|f1|hota]`.

OUTPUT_DIR is a sweep's output_dir (its runs are the directories under it) or one run's output_dir.
Prints, with polars, one row per run (a short label, its settings, frames, detections, frames/s;
a run without a manifest is listed as failed or unfinished) and detections per class, one column
per run label, with distinct objects (tracks) per class beside it for runs made with a tracker.
Evaluated runs (python -m job.evaluate) show map, f1 and hota; `--by` ranks them and names the best.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import polars as pl

from job.layout import (
    ANALYTICS_COUNTS,
    EVALUATION_DETECTION,
    EVALUATION_TRACKING,
    MANIFEST,
    STATE,
    TRACK_SUMMARY,
    scan_predictions,
)


def find_runs(output_dir: Path) -> list[Path]:
    """The run directories: OUTPUT_DIR itself if it is one, else those directly under it."""
    if (output_dir / MANIFEST).exists() or (output_dir / STATE).exists():
        return [output_dir]
    return sorted(p for p in output_dir.iterdir() if p.is_dir() and ((p / MANIFEST).exists() or (p / STATE).exists()))


def _label(index: int) -> str:
    return f"run{index + 1}"


def runs_table(output_dir: Path) -> pl.DataFrame:
    rows = []
    for index, run_dir in enumerate(find_runs(output_dir)):
        row = {"label": _label(index), "run": run_dir.name, "status": "done", "model": None, "score_threshold": None,
               "frame_stride": None, "videos": None, "frames": None, "detections": None, "frames_per_s": None}
        if not (run_dir / MANIFEST).exists():
            row["status"] = "failed or unfinished: no manifest.json (see its log under .hydra_logs/)"
            rows.append(row)
            continue
        manifest = json.loads((run_dir / MANIFEST).read_text())
        settings, totals = manifest["settings"], manifest["totals"]
        steady = totals.get("processing_seconds") or 0.0
        row.update(model=settings["model"], score_threshold=settings["score_threshold"],
                   frame_stride=settings["frame_stride"], videos=totals["videos"], frames=totals["frames"],
                   detections=totals["detections"],
                   frames_per_s=round(totals["frames"] / steady, 2) if steady else None)
        row.update(_analytics_totals(run_dir))
        row.update(_evaluation_scores(run_dir))
        rows.append(row)
    table = pl.DataFrame(rows, schema_overrides={"score_threshold": pl.Float64, "frames_per_s": pl.Float64,
                                                 "line_crossings": pl.Int64, "zone_visits": pl.Int64,
                                                 **dict.fromkeys(RANKINGS, pl.Float64)})
    return table.drop([c for c in ("line_crossings", "zone_visits", *RANKINGS) if c in table.columns
                       and table[c].null_count() == table.height])


# What `--by` ranks runs by: mAP, F1 (at the run's score threshold) and HOTA over all videos and classes.
RANKINGS = ("map", "f1", "hota")


def _evaluation_scores(run_dir: Path) -> dict[str, float | None]:
    scores: dict[str, float | None] = dict.fromkeys(RANKINGS)
    detection = run_dir / EVALUATION_DETECTION
    if detection.exists():
        overall = pl.read_parquet(detection).filter(pl.col("video_id").is_null() & pl.col("class_name").is_null())
        first = overall.sort("score_threshold").row(0, named=True)
        scores["map"], scores["f1"] = first["ap"], first["f1"]
    tracking = run_dir / EVALUATION_TRACKING
    if tracking.exists():
        scores["hota"] = pl.read_parquet(tracking).filter(pl.col("class_name").is_null() &
                                                          pl.col("video_id").is_null())["hota"].item()
    return scores


def _analytics_totals(run_dir: Path) -> dict[str, int | None]:
    """Crossings of all lines and visits of all zones, for runs with analytics (null otherwise)."""
    totals: dict[str, int | None] = {"line_crossings": None, "zone_visits": None}
    if (run_dir / ANALYTICS_COUNTS).exists():
        counts = pl.read_parquet(run_dir / ANALYTICS_COUNTS)
        lines, zones = counts.filter(pl.col("kind") == "line"), counts.filter(pl.col("kind") == "zone")
        totals["line_crossings"] = int(lines["in"].sum() + lines["out"].sum())
        totals["zone_visits"] = int(zones["visits"].sum())
    return totals


def per_class_table(output_dir: Path) -> pl.DataFrame:
    """Detections per class, one column per run label (`runs_table` says which run a label is), and
    "<label> objects" (distinct tracks) beside it when the run has tracks."""
    counts = []
    for index, run_dir in enumerate(find_runs(output_dir)):
        if not any((run_dir / "predictions").glob("*/*.parquet")):
            continue
        counts.append(scan_predictions(str(run_dir)).group_by("class_name").len()
                      .rename({"len": _label(index)}).collect())
        if (run_dir / TRACK_SUMMARY).exists():
            counts.append(pl.read_parquet(run_dir / TRACK_SUMMARY).group_by("class_name").len()
                          .rename({"len": f"{_label(index)} objects"}))
    if not counts:
        return pl.DataFrame({"class_name": []}, schema={"class_name": pl.String})
    table = counts[0]
    for other in counts[1:]:
        table = table.join(other, on="class_name", how="full", coalesce=True)
    return table.fill_null(0).sort("class_name")


def main(argv: list[str]) -> int:
    by = None
    if len(argv) == 3 and argv[1] == "--by":
        argv, by = argv[:1], argv[2]
        if by not in RANKINGS:
            print(f"--by {by}: rank by one of {', '.join(RANKINGS)}", file=sys.stderr)
            return 2
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr if len(argv) != 1 else sys.stdout)
        return 0 if argv in (["-h"], ["--help"]) else 2
    output_dir = Path(argv[0])
    if not output_dir.is_dir() or not find_runs(output_dir):
        print(f"no runs (directories with {MANIFEST} or {STATE}/) at or under {output_dir}", file=sys.stderr)
        return 2
    with pl.Config(tbl_rows=200, tbl_cols=50, tbl_width_chars=250, fmt_str_lengths=120):
        runs = runs_table(output_dir)
        if by is not None:
            if by not in runs.columns:
                print(f"--by {by}: no run here has been evaluated for it (python -m job.evaluate, or "
                      f"evaluate.ground_truth= on the job{'; and a tracker for hota' if by == 'hota' else ''})",
                      file=sys.stderr)
                return 2
            runs = runs.sort(by, descending=True, nulls_last=True)
        print(runs)
        print(per_class_table(output_dir))
        if by is not None:
            best = runs.row(0, named=True)
            print(f"best by {by}: {best['run']} ({by} {best[by]:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
