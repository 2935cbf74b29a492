"""The results report, checked for real: preview pixels against the source, the timeline's numbers against
the table, every link of the page, and the page in a real headless Chromium."""

from __future__ import annotations

import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import av
import numpy as np
import polars as pl
import pytest
import torch

from job import layout
from job.config import ReportConfig
from job.decode import DecodeProgress, iter_batches, probe, timestamps_for
from job.report import make_report, timeline
from job.run import run
from job.samples import write_video


@pytest.fixture(scope="module")
def report_run(tmp_path_factory, ray_session, weights_path):
    """A run with report=true over a normal, a rotated, an empty (black) and a broken video; then one
    video is moved away and the report made again, as a user would."""
    from conftest import compose_config

    root = tmp_path_factory.mktemp("report")
    videos, out = root / "videos", root / "out"
    videos.mkdir()
    write_video(videos / "street.mp4", 30, size=(320, 240))
    write_video(videos / "phone.mp4", 20, size=(320, 240), rotation=90)
    write_video(videos / "moved.mp4", 12, size=(320, 240))
    write_video(videos / "dark.mp4", [np.zeros((96, 128, 3), np.uint8)] * 6, size=(128, 96))
    (videos / "broken.mp4").write_bytes(b"not a video at all")
    cfg = compose_config([f"video_dir={videos}", f"output_dir={out}", f"model.weights={weights_path}",
                          "score_threshold=0.25", "device=cpu", "ray.num_actors=2", "ray.cpus_per_actor=1",
                          "report=true", "tracker=bytetrack", "+tracker.params.track_activation_threshold=0.3",
                          "+tracker.params.high_conf_det_threshold=0.35"])
    run(cfg)
    assert (out / "report" / "index.html").exists(), "report=true makes the report at the end of the run"
    shutil.move(videos / "moved.mp4", root / "moved-away.mp4")
    make_report(ReportConfig(output_dir=str(out), preview_seconds=0.6))
    return videos, out


def table(out: Path) -> pl.DataFrame:
    return pl.read_parquet(out / "videos.parquet")


def row_of(out: Path, path: str) -> dict:
    return table(out).filter(pl.col("path") == path).row(0, named=True)


def decoded(path: Path) -> tuple[np.ndarray, torch.Tensor]:
    info = probe(str(path))
    batches = list(iter_batches(str(path), info, batch_size=8, progress=DecodeProgress()))
    return np.concatenate([b.timestamps_s for b in batches]), torch.cat([b.frames for b in batches])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["street.mp4", "phone.mp4"])
def test_preview_draws_the_tables_boxes_and_leaves_the_rest_of_the_frame_alone(report_run, name):
    videos, out = report_run
    row = row_of(out, name)
    preview = out / "report" / row["video_id"] / "preview.mp4"
    with av.open(str(preview)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
        assert (stream.codec_context.width, stream.codec_context.height) == (row["width"], row["height"])
    preview_times, preview_frames = decoded(preview)
    source_times, source_frames = decoded(videos / name)
    shown = source_times < 0.6
    assert len(preview_times) == shown.sum() and np.allclose(preview_times, source_times[shown], atol=1e-3)

    rows = layout.scan_predictions(str(out)).filter(pl.col("video_id") == row["video_id"]).collect()
    assert rows.height > 0
    changed_on_boxes, checked_away = [], 0
    for index in range(len(preview_times)):
        boxes = rows.filter(pl.col("frame_index") == index).select("x1", "y1", "x2", "y2").to_numpy()
        near = np.zeros((row["height"], row["width"]), dtype=bool)
        for x1, y1, x2, y2 in boxes:  # each box, its label (drawn inside it) and 8 px of encoding blur around it
            near[max(0, int(y1) - 8):int(np.ceil(y2)) + 8, max(0, int(x1) - 8):int(np.ceil(x2)) + 8] = True
            top, left, right = int(round(y1)), int(round(x1)), int(round(x2))
            if 0 <= top < row["height"] and right - left > 4:
                ring = (preview_frames[index, top, left:right].float() - source_frames[index, top, left:right].float())
                changed_on_boxes.append(ring.abs().mean().item())
        away = torch.from_numpy(~near)
        if away.sum() > 100:
            difference = (preview_frames[index].float() - source_frames[index].float()).abs()[away]
            assert difference.mean() < 3.0, (index, difference.mean())
            checked_away += 1
    assert checked_away >= len(preview_times) // 2
    assert changed_on_boxes and np.median(changed_on_boxes) > 20, "the boxes' edges must be drawn"


@pytest.mark.slow
def test_the_timeline_plots_the_tables_counts(report_run):
    videos, out = report_run
    row = row_of(out, "street.mp4")
    rows = layout.scan_predictions(str(out)).filter(pl.col("video_id") == row["video_id"]).collect()
    detected_times = timestamps_for(np.arange(row["frame_count"]), probe(str(videos / "street.mp4")))
    data = timeline.timeline_data(rows, detected_times)
    per_class = dict(rows.group_by("class_name").len().iter_rows())
    top = sorted(per_class, key=lambda name: (-per_class[name], name))[: timeline.TOP_CLASSES]
    assert dict(data.group_by("class_name").agg(pl.col("detections").sum()).iter_rows()) == \
        {name: per_class[name] for name in top}
    assert data.filter(pl.col("class_name") == top[0])["frames"].sum() == row["frame_count"]
    figure = timeline.plot(data, "street.mp4")
    axes = figure.axes[0]
    plotted = {line.get_label(): line.get_ydata() for line in axes.get_lines()}
    for name in top:
        bins = data.filter((pl.col("class_name") == name) & (pl.col("frames") > 0))
        assert np.allclose(plotted[name], (bins["detections"] / bins["frames"]).to_numpy())
    assert axes.get_xlabel() and axes.get_ylabel() and axes.get_legend() is not None
    assert (out / "report" / row["video_id"] / "timeline.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "report" / row["video_id"] / "sheet.jpg").read_bytes()[:2] == b"\xff\xd8"


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links, self.ids, self.rows = [], set(), []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.links += [attrs[key] for key in ("src", "href") if key in attrs]
        if "id" in attrs:
            self.ids.add(attrs["id"])


@pytest.mark.slow
def test_every_link_of_the_page_exists_and_every_video_is_listed_with_its_reason(report_run):
    _, out = report_run
    page = (out / "report" / "index.html").read_text()
    parser = Links()
    parser.feed(page)
    assert parser.links
    for link in parser.links:
        assert "://" not in link and not link.startswith("/"), link  # relative only: the folder can be mailed
        if link.startswith("#"):
            assert link[1:] in parser.ids, link
        else:
            assert (out / "report" / link).exists(), link
    for path in table(out)["path"]:
        assert f"<td>{path}</td>" in page
    assert "not a readable video file" in page  # broken.mp4's error
    assert "no detections" in page  # dark.mp4
    assert "cannot be read again: not in video_dir=" in page  # moved.mp4
    moved = row_of(out, "moved.mp4")
    assert not (out / "report" / moved["video_id"] / "preview.mp4").exists() or \
        f'href="#{moved["video_id"]}"' not in page


@pytest.mark.slow
def test_the_page_counts_detections_and_distinct_objects_per_class(report_run):
    _, out = report_run
    page = (out / "report" / "index.html").read_text()
    shown = table(out)["video_id"].to_list()  # counted from the output, the moved video's too
    detections = layout.scan_predictions(str(out)).filter(pl.col("video_id").is_in(shown)).group_by(
        "class_name").len().collect()
    objects = dict(pl.read_parquet(out / "track_summary.parquet").filter(pl.col("video_id").is_in(shown))
                   .group_by("class_name").len().iter_rows())
    assert sum(objects.values()) > 0
    classes = page.split('<table id="classes">', 1)[1].split("</table>", 1)[0]
    for name, count in detections.iter_rows():
        assert f"<tr><td>{name}</td><td class=number>{count}</td><td class=number>{objects.get(name, 0)}</td></tr>" \
            in classes, name


@pytest.mark.slow
def test_the_page_renders_in_headless_chromium_with_the_videos_table(report_run, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no Chromium on this machine (.ci/run installs Debian's chromium where it can)")
    _, out = report_run
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,1400"]
    url = (out / "report" / "index.html").as_uri()
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    assert '<table id="videos">' in dom and "street.mp4" in dom and "broken.mp4" in dom
    shot = tmp_path / "page.png"
    subprocess.run([*flags, f"--screenshot={shot}", url], capture_output=True, timeout=120)
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.shape == (1400, 1200)
    dark = pixels < 128  # text and table borders on the white page
    assert dark.mean() > 0.005, "the screenshot is blank"
    rows_with_text = np.flatnonzero(dark.any(axis=1))
    assert rows_with_text.max() - rows_with_text.min() > 400  # headings, totals and the table, not one line


def test_report_without_a_finished_run_is_one_line_and_exit_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "job.report", f"output_dir={tmp_path / 'nothing'}",
                             f"hydra.run.dir={tmp_path / 'hydra'}"], capture_output=True, text=True, timeout=120)
    said = result.stdout + result.stderr
    assert result.returncode == 2, said
    assert "pass the output_dir of a run that finished" in said and "Traceback" not in said


def test_frames_the_detector_skipped_show_the_boxes_of_the_last_frame_it_saw(tmp_path):
    """frame_stride=2: frame 1 shows frame 0's box; frame 2 was seen and had nothing, so shows none."""
    from job.report import pictures

    source = write_video(tmp_path / "clip.mp4", 4, size=(160, 120))
    info = probe(str(source))
    rows = pl.DataFrame([{"frame_index": 0, "timestamp_s": 0.0, "class_id": 1, "class_name": "car", "score": 0.9,
                          "x1": 20.0, "y1": 20.0, "x2": 120.0, "y2": 100.0}], schema=layout.PREDICTION_SCHEMA)
    preview = tmp_path / "preview.mp4"
    pictures.render(str(source), info, rows, 2, None, [], str(preview))
    _, drawn = decoded(preview)
    _, plain = decoded(source)
    edge = (slice(19, 23), slice(20, 120))  # the box's top edge, 3 px wide

    def on_edge(index):
        return (drawn[index][edge].float() - plain[index][edge].float()).abs().mean().item()

    assert on_edge(0) > 20 and on_edge(1) > 20
    assert on_edge(2) < 3 and on_edge(3) < 3
