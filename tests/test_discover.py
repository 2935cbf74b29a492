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


def test_video_dir_may_be_one_video_file_or_a_list_of_paths(tmp_path):
    (tmp_path / "clips").mkdir()
    for name in ("a.mp4", "b.mkv"):
        (tmp_path / "clips" / name).write_bytes(b"x")
    (one,) = discover_videos(tmp_path / "clips" / "a.mp4")
    assert (one.relative_path, one.path) == ("a.mp4", str(tmp_path / "clips" / "a.mp4"))
    listing = tmp_path / "todo.txt"
    listing.write_text(f"# tonight's batch\nclips/b.mkv\n\n{tmp_path / 'clips' / 'a.mp4'}\ns3://bucket/c.mp4\n")
    found = discover_videos(listing)
    assert [v.path for v in found] == [str(tmp_path / "clips" / "b.mkv"), str(tmp_path / "clips" / "a.mp4"),
                                       "s3://bucket/c.mp4"]
    assert len({v.video_id for v in found}) == 3


def test_a_directory_without_videos_says_what_was_looked_for(tmp_path):
    (tmp_path / "notes.txt").write_text("no")
    with pytest.raises(VideoDirError, match=r"no videos found under video_dir=.*looked for .*\.mkv"):
        discover_videos(tmp_path)


def test_a_symlink_loop_and_a_non_utf8_name_do_not_stop_discovery(tmp_path):
    import os

    (tmp_path / "good.mp4").write_bytes(b"x")
    os.symlink("loop.mp4", tmp_path / "loop.mp4")  # points at itself
    os.close(os.open(os.fsencode(tmp_path) + b"/caf\xe9.mp4", os.O_CREAT | os.O_WRONLY))  # Latin-1 name
    found = {v.relative_path: v for v in discover_videos(tmp_path)}
    assert set(found) == {"good.mp4", "loop.mp4", "caf\ufffd.mp4"}
    assert os.path.exists(os.fsencode(found["caf\ufffd.mp4"].path.encode("utf-8", "surrogateescape")))
