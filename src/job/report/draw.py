"""Boxes drawn on frames (torchvision's draw_bounding_boxes), one stable colour per class; counting lines
and zones with their counts (PIL)."""

from __future__ import annotations

import fnmatch
import hashlib
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch
from PIL import Image, ImageDraw
from torchvision.utils import draw_bounding_boxes

# Distinct, saturated colours that stand out on most footage; a class keeps its colour across videos and runs.
PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255)]
BOX_WIDTH = 3


def colour_of(class_name: str) -> tuple[int, int, int]:
    digest = hashlib.sha1(class_name.encode()).digest()
    return PALETTE[digest[0] % len(PALETTE)]


def annotate(frame: torch.Tensor, boxes: pl.DataFrame) -> torch.Tensor:
    """`frame` (H, W, 3 uint8) with `boxes` (rows of class_name, score, x1..y2) drawn on it, labelled."""
    if boxes.height == 0:
        return frame
    image = frame.permute(2, 0, 1)
    xyxy = torch.from_numpy(boxes.select("x1", "y1", "x2", "y2").to_numpy().astype(np.float32))
    labels = [f"{name} {score:.2f}" for name, score in zip(boxes["class_name"], boxes["score"], strict=True)]
    colours = [colour_of(name) for name in boxes["class_name"]]
    drawn = draw_bounding_boxes(image, xyxy, labels=labels, colors=colours, width=BOX_WIDTH)
    return drawn.permute(1, 2, 0).contiguous()


@dataclass
class Overlay:
    """A counting line (two points) or zone (a polygon) in pixels of the displayed frame, with its label."""

    points: list[tuple[float, float]]
    closed: bool
    label: str


LINE_COLOUR, ZONE_COLOUR = (255, 255, 0), (0, 200, 255)


def overlays_for(analytics: dict, relative_path: str, counts: pl.DataFrame, width: int, height: int) -> list[Overlay]:
    """The lines and zones of a run's settings (`manifest.json`'s config) that apply to this video, each
    labelled with what it counted in it (`analytics/counts.parquet`'s rows for the video)."""
    found = []
    for kind, items in (("line", analytics.get("lines") or []), ("zone", analytics.get("zones") or [])):
        for item in items:
            if item.get("videos") and not fnmatch.fnmatchcase(relative_path, item["videos"]):
                continue
            mine = counts.filter((pl.col("name") == item["name"]) & (pl.col("kind") == kind))
            if kind == "line":
                points = [item["start"], item["end"]]
                label = f"{item['name']}: in {int(mine['in'].sum())}, out {int(mine['out'].sum())}"
            else:
                points = item["polygon"]
                label = f"{item['name']}: {int(mine['visits'].sum())} visits"
            found.append(Overlay([(x * width, y * height) for x, y in points], kind == "zone", label))
    return found


def draw_overlays(frame: torch.Tensor, overlays: list[Overlay]) -> torch.Tensor:
    """`frame` (H, W, 3 uint8) with the lines and zones drawn on it, each with its label and counts."""
    if not overlays:
        return frame
    image = Image.fromarray(frame.numpy())
    draw = ImageDraw.Draw(image)
    for overlay in overlays:
        colour = ZONE_COLOUR if overlay.closed else LINE_COLOUR
        points = overlay.points + overlay.points[:1] if overlay.closed else overlay.points
        draw.line(points, fill=colour, width=BOX_WIDTH)
        x, y = min(points, key=lambda p: (p[1], p[0]))
        x, y = min(max(x, 0), image.width - 8 * len(overlay.label)), min(max(y, 0), image.height - 14)
        draw.rectangle((x, y, x + 6 * len(overlay.label) + 6, y + 13), fill=(0, 0, 0))
        draw.text((x + 3, y + 1), overlay.label, fill=colour)
    return torch.from_numpy(np.array(image))
