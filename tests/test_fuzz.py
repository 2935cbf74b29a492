"""Fuzzed input: a few hundred mutated copies of real videos in one run. Every file gets exactly one row,
every row that is not `ok` says why in words, the run ends (bounded), and the untouched originals'
detections equal a run of the originals alone."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from job import layout
from job.run import run
from job.samples import scene, write_video

pytestmark = pytest.mark.slow
ORIGINALS = {"a.mp4": {}, "b.mkv": {}, "c.webm": {"codec": "libvpx-vp9"}}
MUTATIONS = ("flip", "zero", "truncate", "header", "repeat")
# "ValueError: ...", "internal error: ...": an exception the job did not expect, not a reason.
BUG = re.compile(r"^(internal error: )?[A-Z]\w*(Error|Exception)\b|codec can't decode")


def mutate(data: bytes, kind: str, rng: np.random.Generator) -> bytes:
    raw = bytearray(data)
    size = len(raw)
    if kind == "flip":  # a few bits flipped anywhere
        for at in rng.integers(0, size, rng.integers(1, 16)):
            raw[at] ^= 1 << int(rng.integers(0, 8))
    elif kind == "zero":  # a block zeroed
        start = int(rng.integers(0, size))
        end = min(size, start + int(rng.integers(16, 4096)))
        raw[start:end] = bytes(end - start)
    elif kind == "truncate":
        raw = raw[:int(rng.integers(0, size))]
    elif kind == "header":  # garbage over the first bytes (the container's header)
        count = int(rng.integers(4, 256))
        raw[:count] = rng.integers(0, 256, count, dtype=np.uint8).tobytes()
    elif kind == "repeat":  # a block repeated in place
        start, length = int(rng.integers(0, size)), int(rng.integers(64, 8192))
        block = raw[start:start + length]
        raw[start:start] = block
    return bytes(raw)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    originals = tmp_path_factory.mktemp("originals")
    for name, options in ORIGINALS.items():
        write_video(originals / name, [scene(i, 320, 240, seed=len(name)) for i in range(12)], size=(320, 240),
                    **options)
    fuzzed = tmp_path_factory.mktemp("fuzzed")
    rng = np.random.default_rng(20261201)
    for name in ORIGINALS:
        shutil.copy(originals / name, fuzzed / name)
        data = (originals / name).read_bytes()
        for k in range(80):
            kind = MUTATIONS[k % len(MUTATIONS)]
            (fuzzed / f"{Path(name).stem}-{k:02d}-{kind}{Path(name).suffix}").write_bytes(mutate(data, kind, rng))
    return originals, fuzzed


def test_a_fuzzed_corpus_gives_one_row_per_file_with_reasons_and_leaves_the_originals_alone(
        ray_session, corpus, make_cfg, tmp_path):
    originals, fuzzed = corpus
    files = sorted(p.name for p in fuzzed.iterdir())
    assert len(files) == 243
    # Bounded: a decoder stuck on a file is killed after 60 s of silence and its file retried, then failed.
    summary = run(make_cfg(fuzzed, "frame_stride=4", "ray.stall_timeout_s=60", output_dir=tmp_path / "fuzzed"))
    table = pl.read_parquet(tmp_path / "fuzzed" / "videos.parquet")
    assert sorted(table["path"]) == files, "exactly one row per file"
    assert summary.videos == len(files)
    for row in table.filter(pl.col("status") != "ok").iter_rows(named=True):
        assert row["error"] and len(row["error"]) > 10, row
        assert not BUG.match(row["error"]), f"{row['path']}: an unexpected exception, not a reason: {row['error']}"
    statuses = dict(table.group_by("status").len().iter_rows())
    assert statuses.get("failed", 0) > 20 and statuses.get("partial", 0) + statuses.get("ok", 0) > 20, statuses

    run(make_cfg(originals, "frame_stride=4", output_dir=tmp_path / "originals"))
    ids = pl.read_parquet(tmp_path / "originals" / "videos.parquet")["video_id"].to_list()
    alone = layout.scan_predictions(str(tmp_path / "originals")).collect().sort("video_id", "frame_index", "x1")
    among = (layout.scan_predictions(str(tmp_path / "fuzzed")).filter(pl.col("video_id").is_in(ids)).collect()
             .sort("video_id", "frame_index", "x1"))
    assert alone.height > 0 and among.equals(alone)
