"""index.html: one static page (no scripts, fonts or links outside the report folder) that can be zipped and mailed."""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

import polars as pl

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
td.number { text-align: right; }
.ok { color: #176317; } .partial { color: #a36200; } .failed, .missing { color: #b00020; }
section { margin: 2em 0; border-top: 1px solid #ddd; }
video, img { max-width: 100%; display: block; margin: 0.5em 0; }
.note { color: #666; }
"""
VIDEO_COLUMNS = ["path", "status", "error", "frame_count", "fps", "detections", "tracks", "seconds"]


@dataclass
class VideoEntry:
    row: dict[str, Any]  # its videos.parquet row
    pictures: str | None = None  # the folder (relative to the page) holding its pictures
    note: str | None = None  # why it has no pictures


def render(output_dir: str, manifest: dict[str, Any], entries: list[VideoEntry], classes: pl.DataFrame,
           evaluation: pl.DataFrame | None = None, pr_curves: str | None = None) -> str:
    """The page; `classes`: detections per class (and distinct objects, with tracks) over the videos shown;
    `evaluation`: the metrics per class at the run's threshold, with `pr_curves` the picture's file name."""
    config = manifest.get("config", {})
    rows = [entry.row for entry in entries]
    totals = {"videos": len(rows), **{status: sum(r["status"] == status for r in rows)
                                      for status in ("ok", "partial", "failed", "missing")},
              "frames detected": sum(r["frames_processed"] or 0 for r in rows),
              "detections": sum(r["detections"] or 0 for r in rows)}
    if any(r.get("tracks") is not None for r in rows):
        totals["tracks"] = sum(r.get("tracks") or 0 for r in rows)
    settings = {
        "video_dir": config.get("video_dir"), "model": manifest.get("settings", {}).get("model"),
        "weights": config.get("model", {}).get("weights"), "score_threshold": config.get("score_threshold"),
        "frame_stride": config.get("frame_stride"), "tracker": (config.get("tracker") or {}).get("name"),
        "started": manifest.get("started_at"), "finished": manifest.get("finished_at"),
        "job": manifest.get("job_version"),
        **{f"{name} version": value for name, value in manifest.get("versions", {}).items()},
    }
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Detections: {_e(output_dir)}</title><style>{STYLE}</style></head><body>",
        f"<h1>Detections in {_e(output_dir)}</h1>",
        "<h2>Totals</h2>", _key_values(totals),
        "<h2>Videos</h2>", _videos_table(entries),
        "<h2>Classes</h2>", _frame_table(classes, "classes"),
        "<h2>Run</h2>", _key_values(settings),
    ]
    if evaluation is not None:
        parts += ["<h2>Against the ground truth</h2>", _frame_table(evaluation, "evaluation")]
        if pr_curves:
            parts.append(f'<img alt="precision against recall per class" src="{_e(pr_curves)}">')
    for entry in entries:
        if entry.pictures is None:
            continue
        folder = _e(entry.pictures)
        parts += [
            f'<section id="{_e(entry.row["video_id"])}"><h2>{_e(entry.row["path"])}</h2>',
            f'<video controls muted preload="metadata" src="{folder}/preview.mp4"></video>',
            f'<img alt="detections per class over time" src="{folder}/timeline.png">',
            f'<img alt="frames with the most detections" src="{folder}/sheet.jpg">',
            "</section>",
        ]
    parts.append("</body></html>")
    return "\n".join(parts)


def _videos_table(entries: list[VideoEntry]) -> str:
    header = "".join(f"<th>{_e(column)}</th>" for column in [*VIDEO_COLUMNS, "pictures"])
    lines = [f'<table id="videos"><thead><tr>{header}</tr></thead><tbody>']
    for entry in entries:
        cells = []
        for column in VIDEO_COLUMNS:
            value = entry.row.get(column)
            css = f' class="{_e(value)}"' if column == "status" else (
                ' class="number"' if isinstance(value, (int, float)) else "")
            cells.append(f"<td{css}>{'' if value is None else _e(_format(value))}</td>")
        if entry.pictures is not None:
            cells.append(f'<td><a href="#{_e(entry.row["video_id"])}">pictures</a></td>')
        else:
            cells.append(f'<td class="note">{_e(entry.note or "")}</td>')
        lines.append(f"<tr>{''.join(cells)}</tr>")
    lines.append("</tbody></table>")
    return "\n".join(lines)


def _frame_table(frame: pl.DataFrame, table_id: str) -> str:
    header = "".join(f"<th>{_e(column)}</th>" for column in frame.columns)
    body = "".join("<tr>" + "".join(f'<td{" class=number" if isinstance(v, (int, float)) else ""}>{_e(_format(v))}</td>'
                                    for v in row) + "</tr>" for row in frame.iter_rows())
    return f'<table id="{table_id}"><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table>'


def _key_values(values: dict[str, Any]) -> str:
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(_format(v))}</td></tr>" for k, v in values.items() if v is not None)
    return f"<table>{rows}</table>"


def _format(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)
