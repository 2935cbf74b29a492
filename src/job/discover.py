"""video_dir -> the list of videos to process, each with an id that is stable across reruns."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from job.errors import VideoDirError
from job.storage import filesystem_for, is_uri

# Containers users hand us in practice; matched case-insensitively.
VIDEO_EXTENSIONS = frozenset(
    {
        ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".wmv", ".flv", ".mpg", ".mpeg",
        ".m2ts", ".mts", ".ts", ".3gp", ".ogv", ".mxf",
    }
)


@dataclass(frozen=True)
class Video:
    video_id: str
    path: str  # absolute local path, or the object's URI (s3://...)
    relative_path: str  # relative to video_dir, "/"-separated, exactly as on disk


def video_id_for(relative_path: str) -> str:
    """A readable, stable id: the file's stem made filename-safe plus a hash of its relative path.

    The hash keeps ids unique (a/x.mp4 vs b/x.mp4); the stem lets a person find the partition;
    the dash keeps Hive partitioning from mistaking the id for a number.
    """
    stem = Path(relative_path).stem
    slug = re.sub(r"[^A-Za-z0-9_]+", "_", stem).strip("_")[:40] or "video"
    digest = hashlib.sha1(relative_path.encode("utf-8")).hexdigest()[:10]
    return f"{slug}-{digest}"


def discover_videos(video_dir: str | os.PathLike) -> list[Video]:
    if is_uri(video_dir):
        return _discover_remote(str(video_dir))
    root = Path(video_dir)
    if not root.is_dir():
        raise VideoDirError(f"video_dir={video_dir!s} is not a directory; pass video_dir=/path/to/videos")
    videos = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if Path(name).suffix.lower() not in VIDEO_EXTENSIONS:
                continue
            absolute = Path(dirpath) / name
            relative = absolute.relative_to(root).as_posix()
            videos.append(Video(video_id_for(relative), str(absolute.resolve()), relative))
    return videos


def _discover_remote(video_dir: str) -> list[Video]:
    """Videos under an object-store prefix; `path` stays a URI that workers fetch themselves."""
    scheme = video_dir.split("://", 1)[0]
    fs, root = filesystem_for(video_dir)
    root = root.rstrip("/")
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    except FileNotFoundError:
        raise VideoDirError(f"video_dir={video_dir} does not exist; pass video_dir=URI_OR_PATH") from None
    videos = []
    for info in sorted(infos, key=lambda i: i.path):
        if info.type == pafs.FileType.File and Path(info.base_name).suffix.lower() in VIDEO_EXTENSIONS:
            relative = info.path[len(root):].lstrip("/")
            videos.append(Video(video_id_for(relative), f"{scheme}://{info.path}", relative))
    return videos
