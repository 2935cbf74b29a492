"""discover: recursive, case-insensitive, unicode-safe, stable ids."""

from __future__ import annotations

import pytest

from job.discover import discover_videos, video_id_for
from job.errors import VideoDirError


def test_finds_videos_recursively_by_extension_any_case(tmp_path):
    for rel in ["a.mp4", "B.MOV", "sub dir/c.Mkv", "sub dir/deeper/d.webm", "e.avi", "f.m4v", "ünï/ça va.mp4"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("no")
    (tmp_path / "image.jpg").write_bytes(b"no")
    found = discover_videos(tmp_path)
    assert sorted(v.relative_path for v in found) == sorted(
        ["a.mp4", "B.MOV", "sub dir/c.Mkv", "sub dir/deeper/d.webm", "e.avi", "f.m4v", "ünï/ça va.mp4"]
    )
    for video in found:
        assert (tmp_path / video.relative_path).exists()


def test_ids_are_stable_unique_and_never_numeric():
    assert video_id_for("a/x.mp4") == video_id_for("a/x.mp4")
    assert video_id_for("a/x.mp4") != video_id_for("b/x.mp4")
    for rel in ["123.mp4", "2024-01-01.mp4", "ça va.mov", "....mp4"]:
        vid = video_id_for(rel)
        with pytest.raises(ValueError):
            float(vid)
        assert "/" not in vid and " " not in vid and "=" not in vid


def test_missing_video_dir_says_what_to_pass(tmp_path):
    with pytest.raises(VideoDirError, match="video_dir="):
        discover_videos(tmp_path / "nope")
