"""Annotations in the formats teams keep them, read into one table: which frames of which video were
annotated, and the true boxes in them (displayed-frame pixels, 0-based frame indices, like the job's).

- MOTChallenge: a directory of sequences, `<name>/gt/gt.txt` (frame, id, left, top, width, height, conf,
  class, visibility; frames 1-based), with `<name>/seqinfo.ini`'s seqLength saying how many frames were
  annotated (else up to the last annotated frame). conf 0 marks a box to ignore, as the devkit does.
- CVAT for video 1.1 XML: tracks of boxes (`<track id label><box frame xtl ytl xbr ybr outside keyframe>`),
  the video named by the task's `<source>` (else its `<name>`), `<size>` frames annotated. A box with
  outside="1" marks where the track ends. CVAT writes every frame's box unless the export was asked for
  keyframes only: the file is read as it is, and the notes say when its tracks have gaps between keyframes.
- COCO JSON with videos (TAO-style): `videos` (id, name), `images` (id, video_id, frame_index),
  `annotations` (image_id, bbox [x, y, w, h], category_id, track_id, iscrowd), `categories` (id, name).
  Every listed image is an annotated frame, with or without boxes; iscrowd marks a box to ignore.
"""

from __future__ import annotations

import configparser
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from job.errors import ConfigError

# MOT17/MOT20 class ids (the devkit's), for gt.txt files without names of their own.
MOT_CLASSES = {1: "pedestrian", 2: "person_on_vehicle", 3: "car", 4: "bicycle", 5: "motorbike",
               6: "non_mot_vehicle", 7: "static_person", 8: "distractor", 9: "occluder",
               10: "occluder_on_ground", 11: "occluder_full", 12: "reflection", 13: "crowd"}
BOXES_SCHEMA = {"video": pl.String, "frame_index": pl.Int64, "track_id": pl.Int64, "class_name": pl.String,
                "x1": pl.Float64, "y1": pl.Float64, "x2": pl.Float64, "y2": pl.Float64, "ignore": pl.Boolean}
FRAMES_SCHEMA = {"video": pl.String, "frame_index": pl.Int64}


@dataclass
class GroundTruth:
    boxes: pl.DataFrame  # BOXES_SCHEMA: one row per true box
    frames: pl.DataFrame  # FRAMES_SCHEMA: every annotated frame, boxes or not
    format: str
    digest: str  # of the files read: evaluation is made again when they change
    notes: list[str]  # what the files held that a user should know


def read(path: str) -> GroundTruth:
    """The ground truth at `path`: a MOTChallenge directory or a COCO JSON file."""
    where = Path(path).expanduser()
    if where.is_dir():
        return _read_mot(where)
    if where.suffix.lower() == ".json" and where.is_file():
        return _read_coco(where)
    if where.suffix.lower() == ".xml" and where.is_file():
        return _read_cvat(where)
    raise ConfigError(f"ground_truth={path}: not a MOTChallenge directory (<video>/gt/gt.txt), a CVAT for "
                      f"video XML file or a COCO JSON file with videos and images; pass one of those")


def _read_mot(root: Path) -> GroundTruth:
    files = sorted(root.glob("*/gt/gt.txt"))
    if not files:
        raise ConfigError(f"ground_truth={root}: no <video>/gt/gt.txt under it (MOTChallenge layout)")
    digest, boxes, frames = hashlib.sha256(), [], []
    for gt in files:
        video = gt.parent.parent.name
        digest.update(video.encode() + gt.read_bytes())
        table = pl.read_csv(gt, has_header=False, new_columns=["frame", "id", "left", "top", "width", "height",
                                                                "conf", "class", "visibility"][:_columns(gt)],
                            schema_overrides={"frame": pl.Int64, "id": pl.Int64})
        if "class" not in table.columns:
            table = table.with_columns(pl.lit(1).alias("class"))
        boxes.append(table.select(
            pl.lit(video).alias("video"), (pl.col("frame") - 1).alias("frame_index"), pl.col("id").alias("track_id"),
            pl.col("class").cast(pl.Int64).replace_strict(MOT_CLASSES, default=None, return_dtype=pl.String)
            .fill_null(pl.format("class_{}", pl.col("class"))).alias("class_name"),
            pl.col("left").cast(pl.Float64).alias("x1"), pl.col("top").cast(pl.Float64).alias("y1"),
            (pl.col("left") + pl.col("width")).cast(pl.Float64).alias("x2"),
            (pl.col("top") + pl.col("height")).cast(pl.Float64).alias("y2"),
            (pl.col("conf") == 0).alias("ignore") if "conf" in table.columns else pl.lit(False).alias("ignore"),
        ))
        length = _seq_length(gt.parent.parent / "seqinfo.ini")
        last = length if length is not None else int(table["frame"].max() or 0)
        frames.append(pl.DataFrame({"video": [video] * last, "frame_index": list(range(last))}, schema=FRAMES_SCHEMA))
    return GroundTruth(pl.concat(boxes).cast(BOXES_SCHEMA), pl.concat(frames), "motchallenge",
                       digest.hexdigest(), [])


def _columns(gt: Path) -> int:
    with open(gt, encoding="utf-8") as handle:
        first = handle.readline()
    return min(9, len(first.split(",")))


def _seq_length(ini: Path) -> int | None:
    if not ini.is_file():
        return None
    parser = configparser.ConfigParser()
    parser.read(ini)
    value = parser.get("Sequence", "seqLength", fallback=None)
    return int(value) if value else None


def _read_coco(path: Path) -> GroundTruth:
    data = path.read_bytes()
    document = json.loads(data)
    if "videos" not in document or "images" not in document:
        raise ConfigError(f"ground_truth={path}: a COCO file without videos and images (TAO-style: images with "
                          f"video_id and frame_index) cannot say which frame of which video a box is on")
    videos = {v["id"]: v.get("name") or v.get("file_name") for v in document["videos"]}
    categories = {c["id"]: c["name"] for c in document.get("categories", [])}
    images = {}
    for image in document["images"]:
        index = image.get("frame_index", image.get("frame_id"))
        if index is None:
            raise ConfigError(f"ground_truth={path}: image {image.get('id')} has no frame_index")
        images[image["id"]] = (videos[image["video_id"]], int(index))
    rows = []
    for a in document.get("annotations", []):
        video, index = images[a["image_id"]]
        x, y, w, h = a["bbox"]
        rows.append((video, index, a.get("track_id", a.get("instance_id")),
                     categories.get(a["category_id"], f"class_{a['category_id']}"), float(x), float(y),
                     float(x + w), float(y + h), bool(a.get("iscrowd", 0) or a.get("ignore", 0))))
    frames = pl.DataFrame(list(images.values()), schema=FRAMES_SCHEMA, orient="row").unique().sort("video",
                                                                                                  "frame_index")
    return GroundTruth(pl.DataFrame(rows, schema=BOXES_SCHEMA, orient="row"), frames, "coco",
                       hashlib.sha256(data).hexdigest(), [])


def _read_cvat(path: Path) -> GroundTruth:
    import xml.etree.ElementTree as ElementTree

    data = path.read_bytes()
    try:
        root = ElementTree.fromstring(data)
    except ElementTree.ParseError as exc:
        raise ConfigError(f"ground_truth={path}: not readable XML ({exc})") from None
    meta = next((m for m in (root.find("meta/task"), root.find("meta/job"), root.find("meta/project/tasks/task"))
                 if m is not None), None)
    if root.tag != "annotations" or meta is None or root.find("track") is None and root.find("image") is not None:
        raise ConfigError(f"ground_truth={path}: not a CVAT for video 1.1 export (annotations with meta and tracks)")
    video = (meta.findtext("source") or meta.findtext("name") or path.stem).strip()
    size = int(meta.findtext("size") or 0)
    rows, gappy = [], 0
    for track in root.iter("track"):
        boxes = [b for b in track.iter("box") if b.get("outside", "0") == "0"]
        frames = sorted(int(b.get("frame")) for b in boxes)
        if frames and len(frames) < frames[-1] - frames[0] + 1 and all(b.get("keyframe") == "1" for b in boxes):
            gappy += 1
        for box in boxes:
            rows.append((video, int(box.get("frame")), int(track.get("id")), track.get("label"),
                         float(box.get("xtl")), float(box.get("ytl")), float(box.get("xbr")), float(box.get("ybr")),
                         False))
    boxes_table = pl.DataFrame(rows, schema=BOXES_SCHEMA, orient="row")
    last = size or (int(boxes_table["frame_index"].max()) + 1 if rows else 0)
    notes = []
    if gappy:
        notes.append(f"{gappy} tracks of {path.name} hold boxes on keyframes only, with frames between them "
                     f"unannotated (CVAT exports interpolated boxes only when asked): those frames count as "
                     f"having no box of theirs; export with interpolation to evaluate every frame")
    frames_table = pl.DataFrame({"video": [video] * last, "frame_index": list(range(last))}, schema=FRAMES_SCHEMA)
    return GroundTruth(boxes_table, frames_table, "cvat", hashlib.sha256(data).hexdigest(), notes)


def match_videos(names: list[str], videos: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """({annotated video name: video_id}, names matched to no video): by relative path, else by a stem
    that only one video of the run has. `videos` maps each run video's relative path to its id."""
    by_stem: dict[str, list[str]] = {}
    for relative, video_id in videos.items():
        by_stem.setdefault(Path(relative).stem, []).append(video_id)
    matched, unmatched = {}, []
    for name in names:
        if name in videos:
            matched[name] = videos[name]
        elif len(by_stem.get(Path(name).stem, [])) == 1:
            matched[name] = by_stem[Path(name).stem][0]
        else:
            unmatched.append(name)
    return matched, unmatched
