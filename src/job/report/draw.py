"""Boxes drawn on frames (torchvision's draw_bounding_boxes), one stable colour per class."""

from __future__ import annotations

import hashlib

import numpy as np
import polars as pl
import torch
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
