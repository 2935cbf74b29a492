"""The report's evaluation section: precision against recall per class over the score thresholds
evaluated (matplotlib), and the metrics at the run's own threshold, from evaluation/detection.parquet."""

from __future__ import annotations

import polars as pl


def overall_per_class(detection: pl.DataFrame) -> pl.DataFrame:
    """All videos, each class and all classes, at the run's own (lowest evaluated) threshold."""
    rows = detection.filter(pl.col("video_id").is_null())
    lowest = rows["score_threshold"].min()
    return (rows.filter(pl.col("score_threshold") == lowest)
            .select("class_name", "ap", "ap50", "ap75", "ar100", "score_threshold", "precision", "recall", "f1",
                    "true_positives", "false_positives", "false_negatives")
            .with_columns(pl.col("class_name").fill_null("(all classes)"))
            .sort(pl.col("class_name") == "(all classes)", "class_name"))


def pr_curves(detection: pl.DataFrame):
    """The figure: one precision-recall line per class (and all classes), a point per threshold."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4.2), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    rows = detection.filter(pl.col("video_id").is_null() & pl.col("precision").is_not_null() &
                            pl.col("recall").is_not_null()).sort("score_threshold")
    for (name,), group in rows.group_by("class_name", maintain_order=True):
        axes.plot(group["recall"].to_numpy(), group["precision"].to_numpy(), marker="o", markersize=3,
                  label=name if name is not None else "all classes", linewidth=2 if name is None else 1.2)
    axes.set_xlabel("recall")
    axes.set_ylabel("precision")
    axes.set_xlim(0, 1.02)
    axes.set_ylim(0, 1.02)
    axes.set_title("over the score thresholds evaluated (the run's and above)", fontsize=9)
    axes.grid(alpha=0.3)
    if rows.height:
        axes.legend(fontsize=8, frameon=False, loc="lower left")
    return figure
