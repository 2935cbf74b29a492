"""Detections per class over time: the numbers (from the table) and the plot drawn from them (matplotlib)."""

from __future__ import annotations

import io

import numpy as np
import polars as pl

TOP_CLASSES = 8
MAX_BINS = 120


def timeline_data(rows: pl.DataFrame, detected_times_s: np.ndarray) -> pl.DataFrame:
    """Per time bin and class: the detected frames in the bin and the detections on them.

    `detected_times_s`: the time of every frame the detector saw, with or without detections, so a
    bin's mean is per frame looked at, not per frame where something was found.
    """
    end = float(detected_times_s.max()) if len(detected_times_s) else 0.0
    edges = np.linspace(0.0, end, min(MAX_BINS, max(1, len(detected_times_s))) + 1)
    edges[-1] = np.nextafter(end, np.inf)  # the last frame falls in the last bin
    frames, _ = np.histogram(detected_times_s, edges)
    totals = rows.group_by("class_name").len().sort(["len", "class_name"], descending=[True, False])
    top = totals["class_name"].head(TOP_CLASSES).to_list()
    tables = []
    for name in top:
        counts, _ = np.histogram(rows.filter(pl.col("class_name") == name)["timestamp_s"].to_numpy(), edges)
        tables.append(pl.DataFrame({"bin_start_s": edges[:-1], "bin_end_s": edges[1:], "frames": frames,
                                    "class_name": name, "detections": counts}))
    if not tables:
        return pl.DataFrame(schema={"bin_start_s": pl.Float64, "bin_end_s": pl.Float64, "frames": pl.Int64,
                                    "class_name": pl.String, "detections": pl.Int64})
    return pl.concat(tables).with_columns(pl.col("frames", "detections").cast(pl.Int64))


def plot(data: pl.DataFrame, title: str):
    """The figure: one line per class, detections per detected frame at each bin's middle."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 3.2), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    for name, group in data.filter(pl.col("frames") > 0).group_by("class_name", maintain_order=True):
        middle = (group["bin_start_s"] + group["bin_end_s"]) / 2
        axes.plot(middle.to_numpy(), (group["detections"] / group["frames"]).to_numpy(), label=name[0],
                  linewidth=1.5)
    axes.set_xlabel("time in the video (s)")
    axes.set_ylabel("detections per frame")
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    if data.height:
        axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return figure


def png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
