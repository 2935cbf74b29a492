"""balance: only the last videos are cut, so that the actors finish together."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from job.balance import MIN_SEGMENT_FRAMES, TailSizer, last_video_cuts, tail_segment_frames
from job.discover import Video
from job.segments import Task, cut_points
from job.status import VideoStatus


def test_only_the_last_videos_are_cut_shorter_so_that_the_actors_finish_together():
    # 5 x 200 frames handed out in turn to 2 actors: four run whole, the last in segments.
    sizes = [tail_segment_frames(1800, 200, queued, 2) for queued in (1000, 800, 600, 400, 200)]
    assert sizes == [1800, 1800, 1800, 1800, MIN_SEGMENT_FRAMES]
    assert cut_points(np.array([0]), 200, MIN_SEGMENT_FRAMES) == [0, 100, 200]  # two even halves
    assert tail_segment_frames(1800, 10_000, 10_000, 2) == 1250  # one long video: about 4 segments per actor
    assert tail_segment_frames(1800, 10**6, 10**6, 2) == 1800  # never longer than ray.segment_frames
    assert tail_segment_frames(40, 200, 200, 2) == 40  # nor than a shorter ray.segment_frames
    assert tail_segment_frames(1800, 200, 200, 1) == 1800  # one actor has no one to wait for
    assert tail_segment_frames(1800, None, 200, 2) == 1800  # frame count unknown (object store)
    assert tail_segment_frames(None, 200, 200, 2) is None  # never split


def test_the_tail_sizer_counts_the_queued_videos_and_segments():
    video = [Video(f"v{i}", f"/v/{i}.mp4", f"{i}.mp4") for i in range(3)]
    sizer = TailSizer({"v0": 200, "v1": 200, "v2": 200}, 1800, 2)
    assert sizer.size(Task(video[0]), [Task(video[2]), Task(video[1])], []).segment_frames == 1800  # run whole
    assert sizer.size(Task(video[0]), [], []).segment_frames == MIN_SEGMENT_FRAMES  # the last one: cut
    # A split video's queued segments count as what they span: 200 + 2 x 100 left, 200 each for 2 actors.
    segments = [Task(video[1], 0, 100), Task(video[1], 100, 200)]
    assert sizer.size(Task(video[0]), segments, []).segment_frames == 1800
    assert sizer.size(Task(video[0]), segments[:1], []).segment_frames == MIN_SEGMENT_FRAMES


def test_the_tail_sizer_reads_only_as_much_of_a_long_queue_as_it_needs():
    """Summing the whole queue at every hand-out made a run of 20,000 clips quadratic."""
    video = [Video(f"v{i}", f"/v/{i}.mp4", f"{i}.mp4") for i in range(10_000)]
    sizer = TailSizer({v.video_id: 10 for v in video}, 1800, 2)
    looked_at = []
    frames = sizer.frames
    sizer.frames = lambda task: looked_at.append(task) or frames(task)
    assert sizer.size(Task(video[0]), [Task(v) for v in reversed(video[1:])], []).segment_frames == 1800
    assert len(looked_at) <= 2, len(looked_at)  # the next one out is enough: 10 + 10 frames for 2 actors


def test_the_last_video_is_cut_so_that_every_actor_ends_together():
    video = [Video(f"v{i}", f"/v/{i}.mp4", f"{i}.mp4") for i in range(2)]
    sizer = TailSizer({"v0": 200, "v1": 200}, 1800, 2)
    running = [(Task(video[1]), 3.625)]
    assert sizer.size(Task(video[0]), [], running).cuts is None  # no task finished yet: speed unknown
    sizer.done(VideoStatus(video_id="v9", path="9.mp4", frame_count=200, seconds=5.0))  # 40 frames/s
    # v1 has 200 - 3.625 s x 40 = 55 frames left: the free actor takes 127.5 frames, v1's actor 72.5 after.
    assert sizer.size(Task(video[0]), [], running).cuts == (128,)
    assert last_video_cuts(200, [55]) == [128]
    assert last_video_cuts(200, [0, 0, 0]) == [50, 100, 150]  # idle actors: even pieces
    assert last_video_cuts(200, [300]) == []  # the other actor ends later anyway: run it whole
    assert last_video_cuts(300, [10, 250]) == [155]  # one ends later than the other two: 155 + 145
    assert last_video_cuts(200, [190]) == []  # a 5-frame piece is not worth its start
    assert TailSizer({"v0": 200}, None, 2).size(Task(video[0]), [], running) == Task(video[0])  # never split
    assert TailSizer({"v0": 200}, 1800, 1).size(Task(video[0]), [], running) == Task(video[0])  # one actor


def test_a_gpu_actor_is_handed_frames_unlike_those_it_holds_where_clearly_unlike():
    from job.balance import StreamMixer

    tasks = {name: Task(Video(name, f"/v/{name}.mp4", f"{name}.mp4")) for name in ("hd", "hd2", "sd", "qcif", "new")}
    mixer = StreamMixer({"hd": 1280 * 720, "hd2": 1280 * 720, "sd": 640 * 272, "qcif": 176 * 144})
    hd, hd2, sd, qcif, new = tasks.values()
    assert mixer.pick([hd2, sd, qcif], [hd]) == 2  # beside a 720p stream, the smallest frames
    assert mixer.pick([hd2, sd, qcif], [qcif]) == 0  # beside small frames, the next out: already the largest
    assert mixer.pick([sd, hd2], [Task(Video("sd2", "/v/sd2.mp4", "sd2.mp4"))]) == 0  # a held size unknown
    assert mixer.pick([new, qcif], [hd]) == 0  # the next out's size unknown: the order stands
    assert mixer.pick([hd2, sd], []) == 0  # nothing held: the order stands
    mixer.pixels_by_video["sd"] = 1000 * 700  # within twice the next out's distance: the order stands
    assert mixer.pick([hd2, sd], [qcif]) == 0


def test_a_held_video_that_will_come_back_split_does_not_count_as_holding_a_stream():
    """A small video handed out beside a 720p one is long, so it comes back at once as segments: the task
    held ahead should be small too, not the second 720p video (both streams would decode large frames)."""
    from job.balance import StreamMixer

    hd, hd2, qcif, qcif2 = (Task(Video(name, f"/v/{name}.mp4", f"{name}.mp4")) for name in ("hd", "hd2", "q", "q2"))
    pixels = {"hd": 1280 * 720, "hd2": 1280 * 720, "q": 176 * 144, "q2": 176 * 144}
    frames = {"hd": 1000, "hd2": 1000, "q": 6000, "q2": 6000}
    mixer = StreamMixer(pixels, frames)
    long_qcif = dataclasses.replace(qcif, segment_frames=1800)  # as the sizer hands it out: 6000 >= 1.5 x 1800
    assert mixer.comes_back_split(long_qcif)
    assert mixer.pick([hd2, qcif2], [hd, long_qcif]) == 1  # as if only the 720p one were held
    assert StreamMixer(pixels).pick([hd2, qcif2], [hd, long_qcif]) == 0  # lengths unknown: it counts
    short = dataclasses.replace(qcif, segment_frames=5000)  # 6000 < 1.5 x 5000: runs whole, holds its stream
    assert not mixer.comes_back_split(short)
    assert mixer.pick([hd2, qcif2], [hd, short]) == 0  # 720p and 176x144 held: the next out stands
    assert mixer.comes_back_split(dataclasses.replace(hd, cuts=(500,)))  # the last video's uneven pieces
    assert not mixer.comes_back_split(Task(qcif.video, 0, 3000))  # a segment is decoded, never split again
    assert mixer.pick([hd2, qcif2], [long_qcif]) == 0  # nothing held that counts: the order stands


def test_the_tail_sizer_weighs_the_queued_work_by_pixels_when_every_frame_size_is_known():
    """A 720p video handed out before two 640x272 ones: by frames it looks small next to them (1,000 against
    4,600) and would run whole on one stream; by pixels they are worth 869 of its frames, so it is cut."""
    hd, sd0, sd1, unknown = (Video(name, f"/v/{name}.mp4", f"{name}.mp4") for name in ("hd", "sd0", "sd1", "u"))
    frames = {"hd": 1000, "sd0": 2300, "sd1": 2300, "u": 2300}
    pixels = {"hd": 1280 * 720, "sd0": 640 * 272, "sd1": 640 * 272}
    queued = [Task(sd1), Task(sd0)]  # next out last
    assert TailSizer(frames, 1800, 2).size(Task(hd), queued, []).segment_frames == 1800  # by frames: whole
    weighed = TailSizer(frames, 1800, 2, pixels).size(Task(hd), queued, [])
    assert weighed.segment_frames == math.ceil(math.ceil(1000 + 4600 * 640 * 272 / (1280 * 720)) / 8) == 234
    # The small ones handed out before the 720p one would still run whole: it outweighs them.
    assert TailSizer(frames, 1800, 2, pixels).size(Task(sd0), [Task(hd), Task(sd1)], []).segment_frames == 1800
    # A queued video whose size is not known (yet): frames alone, as before.
    assert TailSizer(frames, 1800, 2, pixels).size(Task(hd), [Task(unknown), *queued], []).segment_frames == 1800
