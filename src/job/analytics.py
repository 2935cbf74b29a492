"""Lines crossed and zones visited, counted from each finished video's tracks; runs in the driver.

Coordinates are fractions of the displayed frame (the boxes already are in its pixels), so a line drawn
once fits every resolution. Only confirmed tracks count (a null or negative track id is a detection the
tracker did not confirm: counting those as one track is supervision#2578). Each track's anchor point is
followed through the frames it was seen in:

- a line is crossed when the anchor, having been on one side for `min_frames` observations in a row,
  is then on the other side for `min_frames` in a row, and its step across passed between the line's
  two ends (a line is a segment, not an infinite line). `in` is from the line's left to its right,
  walking from `start` to `end` in image coordinates (y down);
- a zone is visited from the first of `min_frames` observations in a row inside it to the first of
  `min_frames` in a row outside; a visit still open when the track was last seen says so (`open`).

supervision's LineZone/PolygonZone take one frame's detections at a time and count an infinite line's
crossings by the anchor's side alone, so the segment rule and debouncing above are done here instead,
vectorised per track with numpy; the polygon test is matplotlib's `Path.contains_points`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import polars as pl
from matplotlib.path import Path as PolygonPath

from job.config import AnalyticsConfig, Anchor, LineConfig, ZoneConfig
from job.layout import tracks_file
from job.output import OutputDir
from job.status import VideoStatus

CROSSINGS_SCHEMA = {"video_id": pl.String, "line": pl.String, "track_id": pl.Int64, "class_name": pl.String,
                    "direction": pl.String, "frame_index": pl.Int64, "timestamp_s": pl.Float64}
VISITS_SCHEMA = {"video_id": pl.String, "zone": pl.String, "track_id": pl.Int64, "class_name": pl.String,
                 "enter_frame_index": pl.Int64, "enter_timestamp_s": pl.Float64, "exit_frame_index": pl.Int64,
                 "exit_timestamp_s": pl.Float64, "dwell_s": pl.Float64, "open": pl.Boolean}
COUNTS_SCHEMA = {"video_id": pl.String, "name": pl.String, "kind": pl.String, "class_name": pl.String,
                 "in": pl.Int64, "out": pl.Int64, "visits": pl.Int64, "mean_dwell_s": pl.Float64,
                 "max_dwell_s": pl.Float64}

# (x, y) of the anchor as fractions of the box: 0 left/top, 1 right/bottom.
ANCHORS = {
    Anchor.center: (0.5, 0.5), Anchor.bottom_center: (0.5, 1.0), Anchor.top_center: (0.5, 0.0),
    Anchor.center_left: (0.0, 0.5), Anchor.center_right: (1.0, 0.5), Anchor.top_left: (0.0, 0.0),
    Anchor.top_right: (1.0, 0.0), Anchor.bottom_left: (0.0, 1.0), Anchor.bottom_right: (1.0, 1.0),
}


@dataclass
class TrackPath:
    """One confirmed track's observations, in frame order."""

    track_id: int
    class_name: str  # the track's majority class
    frame_index: np.ndarray
    timestamp_s: np.ndarray
    boxes: np.ndarray  # (N, 4) x1 y1 x2 y2 in fractions of the displayed frame

    def anchor(self, anchor: Anchor) -> np.ndarray:
        ax, ay = ANCHORS[anchor]
        x = self.boxes[:, 0] + ax * (self.boxes[:, 2] - self.boxes[:, 0])
        y = self.boxes[:, 1] + ay * (self.boxes[:, 3] - self.boxes[:, 1])
        return np.stack([x, y], axis=1)


def track_paths(tracks: pl.DataFrame, width: int, height: int) -> list[TrackPath]:
    """The confirmed tracks of one video's tracks table (`tracks/video_id=<id>/tracks.parquet`)."""
    confirmed = tracks.filter(pl.col("track_id").is_not_null() & (pl.col("track_id") >= 0))
    paths = []
    for (track_id,), rows in confirmed.sort("track_id", "frame_index", "score", descending=[False, False, True]) \
            .group_by("track_id", maintain_order=True):
        rows = rows.unique("frame_index", keep="first", maintain_order=True)  # one box per frame
        majority = rows["class_name"].mode().sort().first()
        boxes = rows.select("x1", "y1", "x2", "y2").to_numpy().astype(np.float64) / [width, height, width, height]
        paths.append(TrackPath(int(track_id), majority, rows["frame_index"].to_numpy(),
                               rows["timestamp_s"].to_numpy(), boxes))
    return paths


def applies(item: LineConfig | ZoneConfig, relative_path: str, class_name: str | None = None) -> bool:
    if item.videos is not None and not fnmatch.fnmatch(relative_path, item.videos):
        return False
    return class_name is None or item.classes is None or class_name in item.classes


def _debounced(states: np.ndarray, min_frames: int) -> list[tuple[int, int]]:
    """(index, state) where a state (non-zero) starts that holds for `min_frames` observations in a row,
    each a change from the last such state: what the anchor settled into, and when it got there."""
    settled, changes = 0, []
    run_start, run_state, run_length = 0, 0, 0
    for i, state in enumerate(states):
        if state == 0:  # exactly on the line: no side
            continue
        if state != run_state:
            run_start, run_state, run_length = i, state, 0
        run_length += 1
        if run_length == min_frames and state != settled:
            changes.append((run_start, int(state)))
            settled = state
    return changes


def line_crossings(path: TrackPath, line: LineConfig) -> list[tuple[str, int]]:
    """(direction, observation index) of each crossing of `line` by the track."""
    points = path.anchor(line.anchor)
    start, end = np.asarray(line.start, dtype=np.float64), np.asarray(line.end, dtype=np.float64)
    along = end - start
    side = np.sign(along[0] * (points[:, 1] - start[1]) - along[1] * (points[:, 0] - start[0]))
    crossings = []
    changes = _debounced(side, line.min_frames)
    for (_, before), (at, after) in zip(changes, changes[1:]):
        # The step across: from the last observation on the old side to the first on the new one.
        previous = max(i for i in range(at) if side[i] == before)
        if _segments_meet(points[previous], points[at], start, end):
            crossings.append(("in" if before < 0 < after else "out", at))
    return crossings


def _segments_meet(p: np.ndarray, q: np.ndarray, a: np.ndarray, b: np.ndarray) -> bool:
    """Whether the step p -> q passes through the segment a-b (p and q on its two sides)."""
    step, along = q - p, b - a
    denominator = step[0] * along[1] - step[1] * along[0]
    if denominator == 0:
        return False
    t = ((a[0] - p[0]) * along[1] - (a[1] - p[1]) * along[0]) / denominator  # where on the step
    u = ((a[0] - p[0]) * step[1] - (a[1] - p[1]) * step[0]) / denominator  # where on the line
    return 0.0 <= t <= 1.0 and 0.0 <= u <= 1.0


def zone_visits(path: TrackPath, zone: ZoneConfig) -> list[tuple[int, int | None, int]]:
    """(enter index, exit index or None while still inside when last seen, last index inside) per visit."""
    inside = PolygonPath(np.asarray(zone.polygon, dtype=np.float64)).contains_points(path.anchor(zone.anchor))
    states = np.where(inside, 1, -1)
    visits, entered = [], None
    for at, state in _debounced(states, zone.min_frames):
        if state == 1:
            entered = at
        elif entered is not None:
            visits.append((entered, at, at - 1))
            entered = None
    if entered is not None:
        last_inside = int(np.flatnonzero(inside)[-1])
        visits.append((entered, None, last_inside))
    return visits


def video_analytics(video_id: str, relative_path: str, tracks: pl.DataFrame, width: int, height: int,
                    settings: AnalyticsConfig) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(line crossings, zone visits) of one video."""
    paths = track_paths(tracks, width, height)
    crossings, visits = [], []
    for line in settings.lines:
        for path in paths:
            if not applies(line, relative_path, path.class_name):
                continue
            for direction, at in line_crossings(path, line):
                crossings.append((video_id, line.name, path.track_id, path.class_name, direction,
                                  int(path.frame_index[at]), float(path.timestamp_s[at])))
    for zone in settings.zones:
        for path in paths:
            if not applies(zone, relative_path, path.class_name):
                continue
            for enter, leave, last_inside in zone_visits(path, zone):
                enter_s = float(path.timestamp_s[enter])
                exit_frame = None if leave is None else int(path.frame_index[leave])
                exit_s = None if leave is None else float(path.timestamp_s[leave])
                dwell = (exit_s if exit_s is not None else float(path.timestamp_s[last_inside])) - enter_s
                visits.append((video_id, zone.name, path.track_id, path.class_name, int(path.frame_index[enter]),
                               enter_s, exit_frame, exit_s, dwell, leave is None))
    return (pl.DataFrame(crossings, schema=CROSSINGS_SCHEMA, orient="row"),
            pl.DataFrame(visits, schema=VISITS_SCHEMA, orient="row"))


def counts(crossings: pl.DataFrame, visits: pl.DataFrame) -> pl.DataFrame:
    """One row per video x line or zone x class: in and out for lines, visits and dwell for zones."""
    lines = crossings.group_by("video_id", "line", "class_name").agg(
        (pl.col("direction") == "in").sum().cast(pl.Int64).alias("in"),
        (pl.col("direction") == "out").sum().cast(pl.Int64).alias("out"),
    ).rename({"line": "name"}).with_columns(kind=pl.lit("line"), visits=pl.lit(None, pl.Int64),
                                            mean_dwell_s=pl.lit(None, pl.Float64),
                                            max_dwell_s=pl.lit(None, pl.Float64))
    zones = visits.group_by("video_id", "zone", "class_name").agg(
        pl.len().cast(pl.Int64).alias("visits"), pl.col("dwell_s").mean().alias("mean_dwell_s"),
        pl.col("dwell_s").max().alias("max_dwell_s"),
    ).rename({"zone": "name"}).with_columns(kind=pl.lit("zone"), **{"in": pl.lit(None, pl.Int64),
                                                                     "out": pl.lit(None, pl.Int64)})
    both = pl.concat([lines.select(list(COUNTS_SCHEMA)), zones.select(list(COUNTS_SCHEMA))])
    return both.cast(COUNTS_SCHEMA).sort("video_id", "kind", "name", "class_name")


def update_analytics(output: OutputDir, settings: AnalyticsConfig, videos: Iterable[VideoStatus]) -> None:
    """Makes analytics/ from the tracks of `videos` (each with its display size), unless it was made from
    these very tracks and settings; fills each status's line_crossings and zone_visits totals."""
    videos = [v for v in videos if output.tracks_state(v.video_id) is not None and v.width and v.height]
    record = {"settings": _plain(settings),
              "tracks": {v.video_id: [v.path, output.tracks_state(v.video_id)] for v in videos}}
    if output.analytics_record() != record:
        crossings, visits = [], []
        for video in videos:
            tracks = pl.read_parquet(output.store.get(tracks_file(video.video_id)))
            found = video_analytics(video.video_id, video.path, tracks, video.width, video.height, settings)
            crossings.append(found[0])
            visits.append(found[1])
        crossed = pl.concat([pl.DataFrame(schema=CROSSINGS_SCHEMA), *crossings]).sort("video_id", "line",
                                                                                         "frame_index", "track_id")
        visited = pl.concat([pl.DataFrame(schema=VISITS_SCHEMA), *visits]).sort("video_id", "zone",
                                                                                  "enter_frame_index", "track_id")
        output.write_analytics(crossed, visited, counts(crossed, visited), record)
    crossed, visited = output.analytics_tables()
    per_video_crossings = dict(crossed.group_by("video_id").len().iter_rows())
    per_video_visits = dict(visited.group_by("video_id").len().iter_rows())
    for video in videos:
        video.line_crossings = per_video_crossings.get(video.video_id, 0) if settings.lines else None
        video.zone_visits = per_video_visits.get(video.video_id, 0) if settings.zones else None


def _plain(settings: AnalyticsConfig) -> dict:
    return json_ready(dataclasses.asdict(settings))


def json_ready(value):
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    return value.value if isinstance(value, Anchor) else value
