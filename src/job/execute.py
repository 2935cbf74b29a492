"""Ray: the runtime, the actors that hold a model, and the pool's Ray backend. The only module that imports Ray.

Each actor loads the model once and processes whole videos or segments of long ones; the pool
hands each to whichever actor is free, so long and short videos balance out.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from tqdm import tqdm

from job.balance import StreamMixer, TailSizer
from job.config import JobConfig, ModelConfig, RayConfig, decodes_in_child_processes
from job.discover import Video
from job.errors import ConfigError, JobError, OutputWriteError, WorkersCannotStartError, first_line
from job.output import OutputDir
from job.plan import HeaderRead, actor_layout
from job.pool import ActorDied, ActorPool, CallFailed
from job.segments import Split, Task
from job.status import VideoStatus
from job.video_cache import VideoCache

if TYPE_CHECKING:
    from job.decode_process import DecodeProcess

log = logging.getLogger(__name__)

# Frame buffers are allocated by decoder threads and freed by the model's thread; with glibc's
# per-thread arenas that fragments and a worker's memory creeps up with video length. One arena
# stops it at no measured cost in speed (benchmarks/memory.md).
WORKER_ENV_VARS = {"MALLOC_ARENA_MAX": "1"}


class RayRuntime:
    """Connects to or starts Ray; stops it on exit only if it started it (and `keep` is false).

    An embedded Ray is started with WORKER_ENV_VARS in the environment its processes inherit, so
    actors need no runtime_env and reuse the workers Ray prestarts (a runtime_env makes Ray start a
    fresh process per actor: ~0.6 s more start-up).
    """

    def __init__(self, ray_cfg: RayConfig, keep: bool = False) -> None:
        self.ray_cfg, self.keep = ray_cfg, keep
        self.started = False
        self.workers_have_env = False

    def __enter__(self) -> RayRuntime:
        if ray.is_initialized():
            return self
        address = self.ray_cfg.address
        kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
        embedded = address is None and not os.environ.get("RAY_ADDRESS")
        if embedded:
            # "local" starts a new runtime; None would silently join a `ray start` cluster on this machine.
            address = "local"
            kwargs.update(num_cpus=self.ray_cfg.num_cpus, include_dashboard=False)
        saved = {name: os.environ.get(name) for name in WORKER_ENV_VARS}
        if embedded:
            os.environ.update(WORKER_ENV_VARS)
        log.info("starting Ray (%s)", "embedded" if embedded else address or os.environ.get("RAY_ADDRESS"))
        # An embedded runtime lives and dies with this process: Ray's notice about its token is noise here.
        auth_log = logging.getLogger("ray._private.authentication.authentication_token_setup")
        auth_level = auth_log.level
        if embedded:
            auth_log.setLevel(logging.ERROR)
        try:
            ray.init(address=address, **kwargs)
        except ConnectionError as exc:
            where = f"ray.address={self.ray_cfg.address}" if self.ray_cfg.address else "RAY_ADDRESS"
            raise ConfigError(f"cannot connect to the Ray cluster at {where} ({first_line(exc)}); start one with "
                              f"`ray start --head`, or leave ray.address unset for an embedded Ray") from None
        finally:
            auth_log.setLevel(auth_level)
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        self.started, self.workers_have_env = True, embedded
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.started and not self.keep:
            ray.shutdown()

    @property
    def actor_runtime_env(self) -> dict[str, Any] | None:
        return None if self.workers_have_env else {"env_vars": WORKER_ENV_VARS}

    @staticmethod
    def job_id() -> str | None:
        return ray.get_runtime_context().get_job_id() if ray.is_initialized() else None


@ray.remote
class ProgressCounter:
    """Frames detected and frames expected, summed over actors, polled by the driver's bar."""

    def __init__(self) -> None:
        self.done = 0
        self.expected = 0
        self.last_progress: dict[str, float] = {}  # video_id -> when its worker last reported (this clock)

    def add(self, done: int, expected: int, video_id: str | None = None) -> None:
        self.done += done
        self.expected += expected
        if video_id is not None:
            self.last_progress[video_id] = time.time()

    def read(self) -> tuple[int, int]:
        return self.done, self.expected

    def ages(self, keys: list[str]) -> dict[str, float]:
        """Seconds since the worker of each of these tasks last reported, measured on one clock (this
        actor's); only those asked for, as the run's other thousands are done."""
        now = time.time()
        return {key: now - self.last_progress[key] for key in keys if key in self.last_progress}


# Tasks an actor holds beyond its streams, so the next starts without the driver's round trip (benchmarks/
# scale.md); the pool holds none ahead while a stream is free anywhere, nor at the run's tail.
TASKS_AHEAD = 1


@ray.remote(max_restarts=-1, max_task_retries=0)
class VideoWorker:
    """Holds one loaded model and the output store; processes one video or segment per call, several
    calls at once (its decode streams, in threads of Ray's) sharing the model; with `TASKS_AHEAD` more,
    those wait for a stream."""

    def __init__(self, cfg: JobConfig, progress_actor: str, threads: int, run_id: str, streams: int = 1) -> None:
        """`threads`: the CPUs each of its `streams` decode streams may use."""
        import torch

        from job.config import for_device
        from job.detect import CPU_INFERENCE_THREADS, Detector, make_inference_repeatable

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        torch.set_num_threads(CPU_INFERENCE_THREADS)  # the model is built as it will run (CPU unless CUDA)
        self.threads = threads  # each stream's decoder's
        self.free_streams = threading.BoundedSemaphore(streams)  # a call beyond them waits here, delivered
        self.idle_decoders: queue.SimpleQueue = queue.SimpleQueue()  # streams' child processes between tasks
        # Looked up by name: a handle argument would live in the object store, which restarts need intact.
        self.progress = ray.get_actor(progress_actor)
        # What the user must fix (weights, device, plug-in) is reported by `ready`, not raised here:
        # Ray would print the worker's whole traceback for a failed constructor.
        self.startup_error: str | None = None
        try:
            self.detector = Detector(cfg.model, cfg.score_threshold, cfg.device.value)
        except JobError as exc:
            self.startup_error = str(exc)
            return
        make_inference_repeatable(self.detector.device, threads)
        self.settings = for_device(cfg, self.detector.device.type)
        self.output = OutputDir(cfg.output_dir)
        # One directory per run and node, shared by the run's workers there.
        self.cache = VideoCache(Path(tempfile.gettempdir()) / f"job-video-cache-{os.getuid()}" / run_id)
        import job.process  # noqa: F401  (imported while starting up, not on the first video)

        decoders = []
        if decodes_in_child_processes(self.settings):  # they start up while the model warms up
            from job.decode_process import DecodeProcess

            decoders = [DecodeProcess(keep=self.settings.prefetch_batches + 3, pin=self.detector.device.type == "cuda")
                        for _ in range(streams)]
            for decoder in decoders:
                decoder.start()
                self.idle_decoders.put(decoder)
        self.detector.warm_up(self.settings.batch_size)
        for decoder in decoders:  # ready means ready to decode, not still importing
            decoder.wait_until_up()

    def ready(self) -> tuple[str | None, ModelConfig | None, str | None]:
        """(device, the model's settings with its classes, None) once the model is loaded and warm, or
        (None, None, what the user must fix)."""
        if self.startup_error is not None:
            return None, None, self.startup_error
        return str(self.detector.device), self.detector.model_cfg, None

    def device(self) -> str:
        """The health check: also the pool's sign that a worker still starting may take work."""
        if self.startup_error is not None:
            raise WorkersCannotStartError(self.startup_error)
        return str(self.detector.device)

    def process(self, task: Task, attempts: int) -> VideoStatus | Split:
        from job.process import process_task

        with self.free_streams:
            report = BatchedProgress(self.progress, video_id=task.key)  # the pool starts its stall clock
            decoder = self._decoder()
            try:
                return process_task(task, self.settings, self.output, self.detector, report, attempts, self.cache,
                                    decode_threads=self.threads, decode_process=decoder)
            finally:
                report.flush()
                if decoder is not None:
                    self.idle_decoders.put(decoder)

    def _decoder(self) -> DecodeProcess | None:
        """A free stream's child process, when decoding in child processes (one per stream: never empty)."""
        try:
            return self.idle_decoders.get_nowait()
        except queue.Empty:  # not decoding in child processes
            return None

    def close(self) -> None:
        """The run is over: drop this node's copies of object-store videos."""
        if self.startup_error is None:
            self.cache.clear()
            self.detector.close()
        while not self.idle_decoders.empty():
            self.idle_decoders.get_nowait().close()


class BatchedProgress:
    """Sends progress to the counter actor at most every `interval` s instead of once per batch:
    the bar refreshes once a second anyway, and each remote call costs the actor CPU time."""

    def __init__(self, counter: Any, interval: float = 1.0, video_id: str | None = None) -> None:
        self.counter, self.interval, self.video_id = counter, interval, video_id
        self.done = self.expected = 0
        self.sent_at = time.monotonic()

    def __call__(self, done: int, expected: int) -> None:
        self.done += done
        self.expected += expected
        if time.monotonic() - self.sent_at >= self.interval:
            self.flush()

    def flush(self) -> None:
        if self.done or self.expected:
            self.counter.add.remote(self.done, self.expected, self.video_id)
        self.done = self.expected = 0
        self.sent_at = time.monotonic()


class RayBackend:
    """`pool.Backend` over Ray actor calls: Ray's errors become the pool's two kinds of failure."""

    def submit(self, actor: Any, task: Task, attempt: int) -> ray.ObjectRef:
        return actor.process.remote(task, attempt)

    def ping(self, actor: Any) -> ray.ObjectRef:
        return actor.device.remote()

    def __init__(self, progress: Any = None) -> None:
        self.progress = progress

    def progress_ages(self, keys: list[str]) -> dict[str, float]:
        if self.progress is None:
            return {}
        try:
            return ray.get(self.progress.ages.remote(keys), timeout=30)
        except (RayActorError, GetTimeoutError) as exc:  # no stall is judged this round; the run goes on
            log.warning("the progress counter did not answer: %s", first_line(exc))
            return {}

    def kill(self, actor: Any) -> None:
        ray.kill(actor, no_restart=False)  # Ray restarts it; its running call fails as a dead actor

    def wait(self, refs: list[ray.ObjectRef], timeout: float) -> list[ray.ObjectRef]:
        ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        return ready

    def result(self, ref: ray.ObjectRef) -> Any:
        try:
            return ray.get(ref)
        except RayTaskError as exc:
            if isinstance(exc.cause, OutputWriteError):  # not the video's fault: the run must stop
                raise OutputWriteError(str(exc.cause)) from None
            raise CallFailed(root_cause(exc)) from None
        except RayActorError as exc:
            raise ActorDied(first_line(exc)) from None


class ActorRun:
    """Iterating it starts the actors and yields each video's final status as it completes."""

    def __init__(self, todo: list[Video], cfg: JobConfig, runtime: RayRuntime, output: OutputDir,
                 headers: HeaderRead, on_model_loaded: Callable[[ModelConfig], None] | None = None) -> None:
        """`headers`: the work ahead, as the containers' headers tell it (still being read)."""
        self.todo, self.cfg, self.runtime, self.output = todo, cfg, runtime, output
        self.on_model_loaded = on_model_loaded or (lambda model: None)
        self.headers = headers
        # From the first actor being ready (model loaded and warm) to the last video done.
        self.processing_seconds = 0.0

    def __iter__(self) -> Iterator[VideoStatus]:
        todo, cfg, runtime, output = self.todo, self.cfg, self.runtime, self.output
        nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
        resources = ray.cluster_resources()
        # The headers are awaited only where the work ahead could be fewer units than the actors it allows.
        most_actors = actor_layout(cfg.ray, cfg.device, resources, sys.maxsize, nodes).count
        layout = actor_layout(cfg.ray, cfg.device, resources, self.headers.units(most_actors), nodes)
        log.info("starting %d actors (%.2g CPU, %.2g GPU, %d decode streams each)", layout.count, layout.cpus_each,
                 layout.gpus_each, layout.streams)
        run_id = uuid.uuid4().hex
        progress_name = f"job-progress-{run_id}"
        # On the driver's node: the counter holds the stall clocks, and a worker node may be lost mid-run.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        progress = ProgressCounter.options(num_cpus=0, name=progress_name, scheduling_strategy=here).remote()
        actors = [
            # A stream per concurrent call, and one more so that a health check or `close` is never queued.
            VideoWorker.options(num_cpus=layout.cpus_each, num_gpus=layout.gpus_each,
                                runtime_env=runtime.actor_runtime_env,
                                max_concurrency=layout.streams + TASKS_AHEAD + 1)
            .remote(cfg, progress_name, layout.decode_threads, run_id, layout.streams)
            for _ in range(layout.count)
        ]
        bar: tqdm | None = None  # shown once the model has loaded: a model that cannot load is one line, no bar

        videos_done = 0

        def update_bar() -> None:
            if bar is None:
                return
            try:
                done, expected = ray.get(progress.read.remote(), timeout=30)
            except (RayActorError, GetTimeoutError):  # the bar waits for the next tick
                return
            # Known up front where containers record their frame counts; else it grows as workers open videos.
            bar.total = max(self.headers.estimate.frames, expected, done)
            bar.set_postfix_str(f"{videos_done}/{len(todo)} videos", refresh=False)
            bar.update(done - bar.n)

        try:
            first, device, model = _wait_for_the_first(actors)
            log.info("the first of %d actors is ready on %s: starting on it, the others join as they load",
                     len(actors), device)
            self.on_model_loaded(model)
            bar = tqdm(total=self.headers.estimate.frames, unit="frame", desc="detecting", dynamic_ncols=True,
                       mininterval=1.0)
            ready_at = time.monotonic()
            pool = ActorPool(actors, RayBackend(progress), cfg.ray.max_video_attempts, output.statuses.write,
                             stall_timeout_s=cfg.ray.stall_timeout_s, streams=layout.streams, ahead=TASKS_AHEAD,
                             starting=set(range(len(actors))) - {first},
                             sizer=TailSizer(self.headers.estimate.frames_by_video, cfg.ray.segment_frames,
                                             layout.count * layout.streams, self.headers.estimate.pixels_by_video),
                             mixer=StreamMixer(self.headers.estimate.pixels_by_video,
                                                self.headers.estimate.frames_by_video))
            for status in pool.run(todo, tick=update_bar):
                videos_done += 1
                yield status
            self.processing_seconds = time.monotonic() - ready_at
        finally:
            if bar is not None:
                bar.close()
            ray.wait([actor.close.remote() for actor in actors], num_returns=len(actors), timeout=10)
            for actor in actors:
                ray.kill(actor)
            ray.kill(progress)


def _wait_for_the_first(actors: list[Any]) -> tuple[int, str, ModelConfig]:
    """(the index of the first actor to have loaded its model, its device, the model's settings): the run
    starts on it, and the others join the pool as each is ready. A model that cannot load (bad weights,
    no internet) is reported here once, from the first actor to answer, not as a failure per video."""
    pending = {actor.ready.remote(): i for i, actor in enumerate(actors)}
    first, _ = ray.wait(list(pending), num_returns=1)
    try:
        device, model, error = ray.get(first[0])
    except RayActorError as exc:
        reason = root_cause(exc)
        if "No module named 'job'" in str(exc):
            raise WorkersCannotStartError(
                "the Ray workers cannot import the job package (No module named 'job'): install the project on "
                "every node, or submit with the runtime_env the README's cluster section shows"
            ) from None
        raise WorkersCannotStartError(f"the Ray workers could not start: {reason}") from None
    if error:
        raise WorkersCannotStartError(f"the Ray workers could not load the model: {error}")
    return pending[first[0]], device, model


def root_cause(exc: BaseException) -> str:
    """The line of a Ray error that names the real exception, e.g. `WeightsError: ...`."""
    causes = [line.strip() for line in str(exc).splitlines()
              if re.match(r"^\s*[\w.]*(Error|Exception): ", line) and "ray.exceptions" not in line]
    return causes[-1] if causes else first_line(exc)
