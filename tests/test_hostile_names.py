"""File, directory and class names are data: never markup in the report or compare, never paths."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from cli import run_cli
from plugins import HOSTILE_CLASS

from job.samples import write_video

pytestmark = pytest.mark.slow
TESTS = Path(__file__).resolve().parent
HOSTILE_FILES = ["<img src=x onerror=alert(1)>.mp4", "\"';--.mp4", "<b>dir</b>/&amp; x.mp4"]


def squares(count: int = 8, size=(160, 120)) -> list[np.ndarray]:
    frames = []
    for i in range(count):
        image = np.zeros((size[1], size[0], 3), dtype=np.uint8)
        image[40:60, 10 + 6 * i:30 + 6 * i] = 255
        frames.append(image)
    return frames


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def test_hostile_file_and_class_names_are_text_in_the_report_and_compare_and_never_paths(tmp_path):
    videos, out = tmp_path / "videos", tmp_path / "out"
    for name in HOSTILE_FILES:
        write_video(videos / name, squares(), size=(160, 120))
    before = files_under(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    result = run_cli(f"video_dir={videos}", f"output_dir={out}", "model._target_=plugins.build_hostile",
                     "device=cpu", "ray.num_cpus=2", "ray.num_actors=1", "report=true",
                     f"hydra.run.dir={tmp_path / 'hydra'}", env=env, timeout=600)
    assert result.returncode == 0, result.output[-3000:]
    table = pl.read_parquet(out / "videos.parquet")
    assert sorted(table["path"]) == sorted(HOSTILE_FILES) and set(table["status"]) == {"ok"}
    assert set(pl.read_parquet(out / "predictions")["class_name"]) == {HOSTILE_CLASS}
    # Nothing written outside output_dir (and Hydra's log dir) by any name.
    written = files_under(tmp_path) - before
    assert {p for p in written if out not in p.parents and (tmp_path / "hydra") not in p.parents
            and p not in (out, tmp_path / "hydra")} == set()
    assert not list(tmp_path.rglob("escaped*")) and not list(Path("/").glob("escaped*"))

    compare = run_cli(str(out), module="job.compare")
    assert compare.returncode == 0, compare.output
    assert "<script>alert('class')</script>" in compare.output  # shown as the text it is

    page = (out / "report" / "index.html").read_text()
    assert "<script" not in page.lower() and "<img src=x" not in page and "<b>dir</b>" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;.mp4" in page and "&lt;script&gt;" in page
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no Chromium on this machine (.ci/run installs Debian's chromium where it can)")
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*flags, "--dump-dom", (out / "report" / "index.html").as_uri()], capture_output=True,
                         text=True, timeout=120).stdout
    assert '<table id="videos">' in dom
    # The browser parsed the names as text: no element was made of them, and the text reads as the name.
    assert "<img src=\"x\"" not in dom and 'onerror="' not in dom
    assert "<script>" not in dom and "<b>dir</b>" not in dom
    assert "&lt;img src=x onerror=alert(1)&gt;.mp4" in dom
    assert "&lt;script&gt;alert('class')&lt;/script&gt; &amp; \"q\" ../../../escaped" in dom
