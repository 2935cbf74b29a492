"""plan: actor layout from declared resources, and what a rerun still has to do. No Ray."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from job.config import Device, RayConfig
from job.errors import ConfigError, OutputNotOursError, SettingsMismatchError
from job.output import OutputDir
from job.plan import ActorLayout, actor_layout, make_plan
from job.samples import write_video
from job.status import VideoStatus
from job.storage import fingerprint


def plan_of(cfg, output):
    """A plan whose settings are recorded and whose lease is released at once, as run() does."""
    plan = make_plan(cfg, output)
    plan.record_settings(output)
    plan.lease.release()
    return plan


def layout(resources, device=Device.auto, videos=100, **ray):
    return actor_layout(RayConfig(**{"cpus_per_actor": 2, **ray}), device, resources, videos)


def test_actor_layout_follows_declared_resources():
    assert layout({"CPU": 16.0, "GPU": 4.0}) == ActorLayout(4, 2, 1.0, streams=2)
    assert layout({"CPU": 16.0, "GPU": 4.0}, gpus_per_actor=0.5) == ActorLayout(8, 2, 0.5, streams=2)
    assert layout({"CPU": 4.0, "GPU": 4.0}) == ActorLayout(4, 1.0, 1.0)  # CPUs shared, never over-asked
    assert layout({"CPU": 16.0, "GPU": 4.0}, Device.cpu) == ActorLayout(8, 2, 0.0)
    assert layout({"CPU": 2.0}) == ActorLayout(1, 2, 0.0)
    assert layout({"CPU": 16.0}, videos=3) == ActorLayout(3, 2, 0.0)  # no idle actors for a short list
    # The defaults: 2 CPUs per GPU actor; on CPUs only, one actor per CPU, or fewer sharing them all.
    # GPU actors share their node's CPUs and decode a stream per CPU; the node with fewest CPUs per GPU sets it.
    assert layout({"CPU": 16.0, "GPU": 4.0}, cpus_per_actor=None) == ActorLayout(4, 4.0, 1.0, streams=4)
    nodes = [{"CPU": 16.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 2.0}, {"CPU": 4.0}]
    assert actor_layout(RayConfig(), Device.auto, {"CPU": 28.0, "GPU": 3.0}, 100, nodes) == ActorLayout(3, 4.0, 1.0, 4)
    assert actor_layout(RayConfig(decode_streams=2), Device.auto, {"CPU": 6.0, "GPU": 1.0}, 100) == ActorLayout(
        1, 6.0, 1.0, streams=2)
    assert ActorLayout(1, 6.0, 1.0, streams=2).decode_threads == 3 and ActorLayout(1, 2.0, 0.0).decode_threads == 2
    assert layout({"CPU": 2.0}, cpus_per_actor=None) == ActorLayout(2, 1.0, 0.0)
    assert layout({"CPU": 8.0}, videos=3, cpus_per_actor=None) == ActorLayout(3, 8 / 3, 0.0)
    assert layout({"CPU": 2.0}, videos=1, cpus_per_actor=None) == ActorLayout(1, 2.0, 0.0)
    with pytest.raises(ConfigError, match="no GPUs"):
        layout({"CPU": 8.0}, Device.cuda)
    with pytest.raises(ConfigError, match="more than the cluster's 2 GPUs"):
        layout({"CPU": 8.0, "GPU": 2.0}, num_actors=3)


def test_plan_skips_final_statuses_and_retries_retryable_ones(tmp_path, make_cfg):
    for name in ("a.mp4", "b.mp4", "c.mp4"):
        write_video(tmp_path / "in" / name, 2, size=(64, 48))
    cfg = make_cfg(tmp_path / "in")
    output = OutputDir(cfg.output_dir)
    first = plan_of(cfg, output)
    assert sorted(v.relative_path for v in first.todo) == ["a.mp4", "b.mp4", "c.mp4"] and not first.finished
    a, b, c = first.videos
    output.statuses.write(VideoStatus(video_id=a.video_id, path=a.relative_path, status="ok",
                                    fingerprint=fingerprint(a.path)))
    output.statuses.write(VideoStatus(video_id=b.video_id, path=b.relative_path, retryable=True,
                                    fingerprint=fingerprint(b.path)))
    again = plan_of(cfg, output)
    assert sorted(v.relative_path for v in again.todo) == ["b.mp4", "c.mp4"]
    assert list(again.finished) == [a.video_id]
    # A finished video whose file was replaced is done again; so is a failed one (e.g. copied in since).
    output.statuses.write(VideoStatus(video_id=c.video_id, path=c.relative_path, fingerprint=fingerprint(c.path)))
    write_video(tmp_path / "in" / "a.mp4", 3, size=(64, 48))
    with open(tmp_path / "in" / "c.mp4", "ab") as grown:
        grown.write(b"the rest of a file still being copied")
    assert sorted(v.relative_path for v in plan_of(cfg, output).todo) == ["a.mp4", "b.mp4", "c.mp4"]


def test_the_longest_videos_are_queued_first(tmp_path, make_cfg):
    """So that a batch does not end with one long video running alone."""
    for name, frames in (("a.mp4", 3), ("b.mp4", 40), ("c.mp4", 12)):
        write_video(tmp_path / "in" / name, frames, size=(64, 48))
    plan = plan_of(make_cfg(tmp_path / "in"), OutputDir(tmp_path / "out"))
    assert [v.relative_path for v in plan.todo] == ["b.mp4", "c.mp4", "a.mp4"]


def test_plan_refuses_other_detection_settings(tmp_path, make_cfg):
    write_video(tmp_path / "in" / "a.mp4", 2, size=(64, 48))
    plan = plan_of(make_cfg(tmp_path / "in"), OutputDir(tmp_path / "out"))
    OutputDir(tmp_path / "out").statuses.write(VideoStatus(video_id=plan.videos[0].video_id, path="a.mp4"))
    with pytest.raises(SettingsMismatchError, match="frame_stride: stored 1, now 2"):
        plan_of(make_cfg(tmp_path / "in", "frame_stride=2"), OutputDir(tmp_path / "out"))


def test_a_directory_with_someone_elses_files_is_refused_and_left_alone(tmp_path, make_cfg):
    write_video(tmp_path / "in" / "a.mp4", 2, size=(64, 48))
    theirs = tmp_path / "out"
    theirs.mkdir()
    (theirs / "videos.parquet").write_bytes(b"a table the user made")
    with pytest.raises(OutputNotOursError, match=r"already holds files this job did not write \(videos.parquet\)"):
        plan_of(make_cfg(tmp_path / "in"), OutputDir(theirs))
    assert sorted(p.name for p in theirs.iterdir()) == ["videos.parquet"]
    assert (theirs / "videos.parquet").read_bytes() == b"a table the user made"


def test_videos_whose_files_are_gone_are_kept_as_missing_or_pruned(tmp_path, make_cfg):
    from job.parts import detections_frame

    for name in ("a.mp4", "b.mp4"):
        write_video(tmp_path / "in" / name, 2, size=(64, 48))
    cfg = make_cfg(tmp_path / "in")
    output = OutputDir(cfg.output_dir)
    a, b = plan_of(cfg, output).videos
    for video in (a, b):  # a finished video, and b: started (one part) but never finished
        output.parts.resume_point(video.video_id, fingerprint(video.path), video.relative_path)
        output.parts.commit(video.video_id, 0, 1, detections_frame([0], [0.0], [np.zeros((1, 4), np.float32)],
                                                                   [np.ones(1, np.float32)], [np.ones(1, int)], ["x"]),
                           "zstd")
    output.statuses.write(VideoStatus(video_id=a.video_id, path="a.mp4", status="ok", detections=1,
                                    fingerprint=fingerprint(a.path)))
    (tmp_path / "in" / "a.mp4").rename(tmp_path / "in" / "renamed.mp4")
    (tmp_path / "in" / "b.mp4").unlink()
    plan = plan_of(cfg, output)
    assert [v.relative_path for v in plan.todo] == ["renamed.mp4"]
    gone = {s.path: s for s in plan.missing}
    assert set(gone) == {"a.mp4", "b.mp4"} and {s.status for s in gone.values()} == {"missing"}
    assert gone["a.mp4"].detections == 1 and gone["b.mp4"].detections == 1
    assert "prune=true" in gone["a.mp4"].error
    assert (tmp_path / "out" / "predictions" / f"video_id={a.video_id}").exists(), "kept unless pruned"

    pruned = plan_of(make_cfg(tmp_path / "in", "prune=true"), output)
    assert pruned.missing == [] and pruned.to_prune == sorted([a.video_id, b.video_id])
    assert output.recorded_video_ids() == {a.video_id, b.video_id}, "planning removes nothing"
    for video_id in pruned.to_prune:  # what run() does with them
        output.remove_video(video_id)
    assert output.recorded_video_ids() == set()
    assert not (tmp_path / "out" / "predictions" / f"video_id={a.video_id}").exists()


def test_one_writer_per_output_dir(tmp_path, make_cfg, caplog):
    from job.errors import OutputBusyError
    from job.lease import LEASE

    write_video(tmp_path / "in" / "a.mp4", 2, size=(64, 48))
    cfg = make_cfg(tmp_path / "in")
    first = make_plan(cfg, OutputDir(cfg.output_dir))
    with pytest.raises(OutputBusyError, match=r"is being written by another run \(host .*, pid \d+, since "):
        make_plan(cfg, OutputDir(cfg.output_dir))
    first.lease.release()
    assert not (tmp_path / "out" / LEASE).exists()
    # A lease left by a run that was killed (its process is gone) is taken over with a warning.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    held = json.loads(plan_of(cfg, OutputDir(cfg.output_dir)).lease._record())
    (tmp_path / "out" / LEASE).write_text(json.dumps({**held, "pid": int(dead.stdout), "run": "killed"}))
    plan_of(cfg, OutputDir(cfg.output_dir))
    assert "taking over the lease of a run that is gone" in caplog.text
    # So is one on another host that stopped renewing it.
    (tmp_path / "out" / LEASE).write_text(json.dumps({**held, "host": "elsewhere", "renewed": 0, "run": "old"}))
    plan_of(cfg, OutputDir(cfg.output_dir))
    (tmp_path / "out" / LEASE).write_text(json.dumps({**held, "host": "elsewhere", "run": "live"}))
    with pytest.raises(OutputBusyError, match="host elsewhere"):
        plan_of(cfg, OutputDir(cfg.output_dir))


def test_the_frame_total_and_the_units_of_work_are_known_up_front_where_containers_record_them(tmp_path, make_cfg):
    from job.parts import detections_frame
    from job.plan import estimate_work

    def frames_to_detect(videos, stride, output):
        return estimate_work(videos, stride, None, output).frames

    write_video(tmp_path / "in" / "a.mp4", 10, size=(64, 48))
    write_video(tmp_path / "in" / "b.mp4", 7, size=(96, 64))
    (tmp_path / "in" / "bad.mp4").write_bytes(b"not a video")
    cfg = make_cfg(tmp_path / "in")
    output = OutputDir(cfg.output_dir)
    plan = plan_of(cfg, output)
    assert frames_to_detect(plan.todo, 1, output) == 17
    assert frames_to_detect(plan.todo, 3, output) == 4 + 3
    pixels = estimate_work(plan.todo, 1, None, output).pixels_by_video  # what the pool's mixer goes by
    assert {v.relative_path: pixels.get(v.video_id) for v in plan.todo} == {"a.mp4": 64 * 48, "b.mp4": 96 * 64,
                                                                           "bad.mp4": None}
    started = next(v for v in plan.videos if v.relative_path == "a.mp4")
    output.parts.commit(started.video_id, 0, 4, detections_frame([], [], [], [], [], []), "zstd")
    assert frames_to_detect(plan.todo, 1, output) == 7  # a resumed video's remainder comes from its worker
    # Units: each video one, and a long one its segments (b: 7 frames in segments of 3 = two units).
    assert estimate_work(plan.todo, 1, 3, output).units == 3 + 1
    assert estimate_work(plan.todo, 1, None, output).units == 3


def test_the_headers_are_read_while_ray_starts_and_only_a_short_list_waits_for_them(tmp_path, make_cfg,
                                                                                 monkeypatch):
    import threading

    from job import plan as plan_module
    from job.plan import HeaderRead, estimate_work

    for name, frames in (("a", 10), ("b", 7)):
        write_video(tmp_path / "in" / f"{name}.mp4", frames, size=(64, 48))
    (tmp_path / "in" / "bad.mp4").write_bytes(b"not a video")
    cfg = make_cfg(tmp_path / "in")
    output = OutputDir(cfg.output_dir)
    todo = plan_of(cfg, output).todo
    headers = HeaderRead(todo, 1, 3, output)
    # Fewer videos than actors could run: waits for every header (a: 10 frames in segments of 3, 3 units; b 2).
    assert headers.units(enough=8) == 3 + 2 + 1
    assert headers.estimate == estimate_work(todo, 1, 3, output)
    assert headers.estimate.frames == 17

    release = threading.Event()
    count = plan_module._count_header
    monkeypatch.setattr(plan_module, "_count_header", lambda *args: release.wait(10) and count(*args))
    headers = HeaderRead(todo, 1, 3, output)
    assert headers.units(enough=3) == 3 and headers.estimate.frames == 0  # enough videos: no header awaited
    release.set()
    assert headers.units(enough=8) == 6 and headers.estimate.frames == 17
