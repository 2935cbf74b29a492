"""compare: runs side by side from their manifests and parts, failed runs shown, one run accepted."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import polars as pl

from job.compare import per_class_table, runs_table
from job.output import OutputDir
from job.parts import detections_frame
from job.track import write_track_summary


def make_run(directory, threshold, labels):
    out = OutputDir(directory)
    n = len(labels)
    rows = detections_frame(range(n), [0.04 * i for i in range(n)], [np.array([[1, 2, 3, 4]], dtype=np.float32)] * n,
                            [np.array([0.9], dtype=np.float32)] * n, [np.array([label]) for label in labels],
                            ["person", "car"])
    out.parts.commit("v-1", 0, n, rows, "zstd")
    out.write_manifest({"settings": {"model": "m", "score_threshold": threshold, "frame_stride": 1},
                        "totals": {"videos": 1, "frames": n, "detections": n, "processing_seconds": 2.0}})


def test_runs_get_short_labels_and_a_failed_run_is_listed(tmp_path):
    make_run(tmp_path / "model=m,score_threshold=0.3", 0.3, [1, 1, 2])
    make_run(tmp_path / "model=m,score_threshold=0.5", 0.5, [1])
    (tmp_path / "model=m,score_threshold=0.9" / "_state").mkdir(parents=True)  # started, never finished
    runs = runs_table(tmp_path)
    assert runs["label"].to_list() == ["run1", "run2", "run3"]
    assert runs["detections"].to_list() == [3, 1, None]
    assert runs["status"][2].startswith("failed or unfinished")
    per_class = per_class_table(tmp_path)
    assert per_class.columns == ["class_name", "run1", "run2"]
    assert per_class.rows() == [("car", 1, 0), ("person", 2, 1)]


def test_distinct_objects_per_class_stand_beside_detections_for_a_tracked_run(tmp_path):
    make_run(tmp_path / "tracked", 0.3, [1, 1, 2])
    out = OutputDir(tmp_path / "tracked")
    tracked = out.parts.read("v-1").with_columns(pl.Series("track_id", [7, None, 8], dtype=pl.Int64))
    out.write_tracks("v-1", tracked, {})
    write_track_summary(out)
    make_run(tmp_path / "untracked", 0.5, [1])
    per_class = per_class_table(tmp_path)
    assert per_class.columns == ["class_name", "run1", "run1 objects", "run2"]
    assert per_class.rows() == [("car", 1, 1, 0), ("person", 2, 1, 1)]


def test_one_run_folder_and_help(tmp_path):
    make_run(tmp_path / "single", 0.3, [2])
    assert runs_table(tmp_path / "single")["run"].to_list() == ["single"]
    done = subprocess.run([sys.executable, "-m", "job.compare", str(tmp_path / "single")], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and "run1" in done.stdout and "car" in done.stdout, done.stderr
    helped = subprocess.run([sys.executable, "-m", "job.compare", "--help"], capture_output=True, text=True,
                            timeout=60)
    assert helped.returncode == 0 and helped.stdout.startswith("Line up the runs")
    missing = subprocess.run([sys.executable, "-m", "job.compare", str(tmp_path / "nothing")], capture_output=True,
                             text=True, timeout=60)
    assert missing.returncode == 2 and "no runs" in missing.stderr
