"""Same input, same settings, same bytes: a video's detections do not depend on the actor layout, the
other videos of the run, splitting or the batch size (CPU; the model runs on a fixed thread count)."""

from __future__ import annotations

import shutil
from pathlib import Path

import polars as pl
import pytest

from job import layout
from job.run import run
from job.samples import scene, write_video

pytestmark = pytest.mark.slow


def detections(out: Path, video_id: str) -> pl.DataFrame:
    return (layout.scan_predictions(str(out)).filter(pl.col("video_id") == video_id).collect()
            .sort("frame_index", "class_id", "score", "x1", "y1", "x2", "y2"))


def test_a_videos_detections_are_the_same_bytes_whatever_the_layout_and_the_company(ray_session, make_cfg,
                                                                                    tmp_path):
    alone, crowd = tmp_path / "alone", tmp_path / "crowd"
    write_video(alone / "street.mp4", [scene(i, 320, 240) for i in range(48)])
    crowd.mkdir()
    shutil.copy(alone / "street.mp4", crowd / "street.mp4")
    for seed in (1, 2):
        write_video(crowd / f"other{seed}.mp4", [scene(i, 320, 240, seed=seed) for i in range(16)])

    runs = {
        # One actor with both CPUs: before the fix its model ran on 2 threads and the others' on 1.
        "one actor x 2 CPUs": make_cfg(alone, "ray.num_actors=1", "ray.cpus_per_actor=2",
                                       output_dir=tmp_path / "a"),
        "default layout, other videos, split into 3, batches of 3": make_cfg(
            crowd, "ray.num_actors=null", "ray.cpus_per_actor=null", "ray.segment_frames=16", "batch_size=3",
            output_dir=tmp_path / "b"),
        "two 1-CPU actors, batches of 1": make_cfg(alone, "batch_size=1", output_dir=tmp_path / "c"),
    }
    tables = {}
    for name, cfg in runs.items():
        run(cfg)
        (video_id,) = pl.read_parquet(Path(cfg.output_dir) / "videos.parquet").filter(
            pl.col("path") == "street.mp4")["video_id"]
        tables[name] = detections(Path(cfg.output_dir), video_id)
    assert len(list((tmp_path / "b" / "predictions").glob("video_id=street-*/part-*.parquet"))) == 3, "split"
    first = next(iter(tables.values()))
    assert first.height > 48, "the test model must find something in most frames"
    for name, table in tables.items():
        assert table.equals(first), f"{name}: differs from {next(iter(tables))}"
