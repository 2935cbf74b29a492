"""video_dir -> the list of videos to process, each with an id that is stable across reruns."""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from job.errors import VideoDirError
from job.storage import filesystem_for, is_uri, s3_client, s3_fingerprint

log = logging.getLogger(__name__)

# A video_dir with one of these suffixes is a list of paths or URIs, one per line.
LIST_EXTENSIONS = frozenset({".txt", ".list"})
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
    # The content's identity where the listing already says it (S3: size and ETag), so that nobody
    # reads the object to tell whether it changed; None: `storage.fingerprint` reads it.
    fingerprint: str | None = None


def video_id_for(relative_path: str) -> str:
    """A readable, stable id: the file's stem made filename-safe plus a hash of its relative path.

    The hash keeps ids unique (a/x.mp4 vs b/x.mp4); the stem lets a person find the partition;
    the dash keeps Hive partitioning from mistaking the id for a number.
    """
    stem = Path(relative_path).stem
    slug = re.sub(r"[^A-Za-z0-9_]+", "_", stem).strip("_")[:40] or "video"
    digest = hashlib.sha1(relative_path.encode("utf-8", "surrogateescape")).hexdigest()[:10]
    return f"{slug}-{digest}"


def discover_videos(video_dir: str | os.PathLike) -> list[Video]:
    """Every video under a directory or object-store prefix; or one video file; or a list file's entries.

    An entry that cannot be read (a symlink loop, no permission) is still listed, so it gets a
    `failed` row with the reason instead of stopping the run.
    """
    text = str(video_dir)
    if is_uri(text):
        videos = _discover_remote(text)
    elif Path(text).is_file() and Path(text).suffix.lower() in LIST_EXTENSIONS:
        videos = _listed(Path(text))
    elif Path(text).is_file():
        videos = [_video(Path(text).name, str(Path(text).absolute()))]
    elif Path(text).is_dir():
        videos = _walk(Path(text))
    else:
        raise VideoDirError(f"video_dir={text} does not exist; pass video_dir=/path/to/videos (a directory, a "
                            f"video file, a .txt list of paths, or an s3:// or gs:// prefix)")
    if not videos:
        raise VideoDirError(f"no videos found under video_dir={text}; looked for "
                            f"{' '.join(sorted(VIDEO_EXTENSIONS))} (any case)")
    return videos


def _walk(root: Path) -> list[Video]:
    videos = []

    def unreadable(error: OSError) -> None:
        log.warning("skipping %s: %s", error.filename, error.strerror or error)

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):
        dirnames.sort()
        for name in sorted(filenames):
            if Path(name).suffix.lower() not in VIDEO_EXTENSIONS:
                continue
            absolute = Path(dirpath) / name  # not resolved: a symlink loop must not stop discovery
            videos.append(_video(absolute.relative_to(root).as_posix(), str(absolute.absolute())))
    return videos


def _listed(list_file: Path) -> list[Video]:
    """A text file of paths or URIs, one per line (blank lines and # comments skipped)."""
    entries = [line.strip() for line in list_file.read_text(encoding="utf-8").splitlines()]
    entries = [e for e in entries if e and not e.startswith("#")]
    return [_video(entry, entry if is_uri(entry) else str((list_file.parent / os.path.expanduser(entry)).absolute()))
            for entry in entries]


def _video(relative: str, path: str) -> Video:
    # File names need not be UTF-8; the tables get a readable form, the decoders the real name.
    shown = relative.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return Video(video_id_for(relative), path, shown)


def _discover_remote(video_dir: str) -> list[Video]:
    """Videos under an object-store prefix; `path` stays a URI that workers fetch themselves."""
    scheme = video_dir.split("://", 1)[0]
    if scheme == "s3" and (client := s3_client()) is not None:
        return _discover_s3(client, video_dir)
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


def _discover_s3(client, video_dir: str) -> list[Video]:
    """One LIST request per 1,000 objects, each video with its fingerprint (size, ETag) from the listing."""
    bucket, _, prefix = video_dir.removeprefix("s3://").partition("/")
    prefix = prefix.rstrip("/") + "/" if prefix.strip("/") else ""
    videos = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                key = item["Key"]
                if key.endswith("/") or Path(key).suffix.lower() not in VIDEO_EXTENSIONS:
                    continue
                relative = key[len(prefix):]
                videos.append(Video(video_id_for(relative), f"s3://{bucket}/{key}", relative,
                                    s3_fingerprint(item["Size"], item["ETag"])))
    except Exception as exc:  # noqa: BLE001 - botocore's errors: no such bucket, no access
        raise VideoDirError(f"video_dir={video_dir} cannot be listed ({exc}); pass a prefix you can read") from None
    if not videos and not client.list_objects_v2(Bucket=bucket, Prefix=prefix.rstrip("/"), MaxKeys=1).get("KeyCount"):
        raise VideoDirError(f"video_dir={video_dir} does not exist; pass video_dir=URI_OR_PATH")
    return sorted(videos, key=lambda v: v.path)
