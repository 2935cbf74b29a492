"""Decoding ahead in a child process: how one actor's decode streams keep up with a fast model.

Decode threads beside the model loop take turns with its host-side Python on one GIL, which held the
job at 0.6x of what the same cores decode alone (benchmarks/gpu.md). A `DecodeProcess` runs
`decode.iter_batches` (the same function, so the same frames) in a child process of its own, writing
each batch into a shared buffer (a memory file: a container's small /dev/shm is no bound); only the
buffer's number, the frame indices and timestamps cross the pipe. A child is kept for many tasks
(starting one imports torch and PyAV: about a second, waited for while the actor starts up). The default
(`decode_processes=false` decodes in a thread instead): ahead of decode threads on the 2-core stand-in node
(benchmarks/gpu.md), and meant for a many-core GPU box, where it is still to be measured.

Buffers are owned like `decode.BatchBuffers`: the child writes into one again only once the parent has
handed its batch back; one not handed back by the end of its task is disowned (the parent's mapping keeps
it alive for whoever holds it) and never reused. The child allocates at most `keep` of them: its read-ahead.

The child exits when its pipe closes or its parent changes (the actor killed, even by kill -9); its death
midway is reported as `DecodeProcessError` and a new child starts for the next task.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import fields
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import torch

from job.decode import DecodeProgress, FrameBatch, VideoError, VideoInfo, iter_batches

log = logging.getLogger(__name__)

PARENT_CHECK_S = 1.0  # how often a child checks that its parent is alive


class DecodeProcessError(RuntimeError):
    """The child failed for a reason that is not the video's (a bug, memory, a kill): worth retrying.

    Its text is what the model's process would have recorded ("ErrorType: message"); the child logs
    the traceback."""


class DecodeProcess:
    """One decode stream's child process; `batches` is `iter_batches` run there. Used by one thread at a time."""

    def __init__(self, keep: int = 4, pin: bool = False) -> None:
        """`pin`: the batches go to a GPU: each buffer is page-locked where it is mapped (cudaHostRegister),
        so a batch crosses straight from it, without first being copied into pinned memory."""
        self.keep, self.pin = keep, pin
        self._child: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._buffer_fds: socket.socket | None = None  # where the child sends its buffers' file descriptors
        self._slots: dict[int, torch.Tensor] = {}  # the child's buffers, mapped here, by number
        self._slot_at: dict[int, int] = {}  # a buffer's address -> its number
        self._held: set[int] = set()  # handed out by the running task, not handed back yet
        self._locked: set[int] = set()  # buffers page-locked for the GPU (`pin`)
        self._task = 0
        self._up = False  # the running child has said it has imported what it needs

    def batches(self, path: str, info: VideoInfo, *, batch_size: int, frame_stride: int = 1, start_frame: int = 0,
                decoder: str = "pyav", progress: DecodeProgress | None = None, threads: int = 1,
                end_frame: int | None = None, planar: bool = False) -> Iterator[FrameBatch]:
        """`decode.iter_batches(...)` decoded in the child; `progress` is filled in once the video ends.

        Hand each batch back (`give_back`) once its frames are no longer read; a batch is never read
        after the iterator is closed early (its buffer may be written into again).
        """
        if decoder not in ("pyav", "decord"):
            raise ValueError(f"{decoder} decodes in the model's process")
        self.start()
        self._task += 1
        task, ended = self._task, False
        options = {"batch_size": batch_size, "frame_stride": frame_stride, "start_frame": start_frame,
                   "decoder": decoder, "threads": threads, "end_frame": end_frame, "planar": planar}
        self._send(("decode", task, path, info, options))
        try:
            while True:
                message = self._receive()
                kind, of_task = message[0], message[1]
                if kind == "up":
                    self._up = True
                elif kind == "slot":
                    self._map(message[1], message[2])
                elif kind == "forget":
                    self._unmap(message[1])
                elif of_task != task:  # what a stopped task had in flight
                    if kind == "batch":
                        self._send(("free", message[2]))
                elif kind == "batch":
                    _, _, slot, indices, timestamps, layout = message
                    self._held.add(slot)
                    buffer = self._slots[slot]
                    yield FrameBatch(indices, timestamps, buffer[: len(indices)], buffer, layout)
                else:
                    ended = True
                    if kind == "failed":
                        raise DecodeProcessError(message[2])
                    _fill(progress, message[2])
                    if kind == "video_error":
                        raise VideoError(message[3])
                    return
        finally:
            if not ended and self._alive():
                self._send(("stop", task))
            for slot in sorted(self._held):  # never handed back: never reused
                self._unmap(slot)
                if self._alive():
                    self._send(("disown", slot))
            self._held.clear()

    def give_back(self, batch: FrameBatch) -> None:
        """`batch`'s frames will not be read again: the child may write its next batch there."""
        buffer, batch.buffer = batch.buffer, None
        slot = None if buffer is None else self._slot_at.get(buffer.data_ptr())
        if slot is not None and slot in self._held:
            self._held.discard(slot)
            self._send(("free", slot))

    def close(self) -> None:
        if self._child is not None:
            self._conn.close()  # the child sees its pipe close and exits
            self._buffer_fds.close()
            try:
                self._child.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._child.kill()
                self._child.wait()
        self._child = self._conn = self._buffer_fds = None
        self._up = False
        for slot in list(self._slots):
            self._unmap(slot)

    def __enter__(self) -> DecodeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Starts the child now, if none is running (else the first `batches` does): it imports while
        the caller does something else."""
        if self._alive():
            return
        self.close()
        # Started as a program of its own, not by multiprocessing: a Ray worker has threads (gRPC's, torch's)
        # whose locks a forked child would inherit held, and spawn would re-run the parent's main script.
        messages, child_messages = socket.socketpair()
        self._buffer_fds, child_buffer_fds = socket.socketpair()
        package_root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        self._child = subprocess.Popen(
            [sys.executable, "-m", "job.decode_process", str(child_messages.fileno()),
             str(child_buffer_fds.fileno()), str(self.keep), str(os.getpid())],
            pass_fds=(child_messages.fileno(), child_buffer_fds.fileno()), env=env, stdin=subprocess.DEVNULL)
        child_messages.close()
        child_buffer_fds.close()
        self._conn = Connection(messages.detach())
        log.info("decoding ahead in child process %d", self._child.pid)

    def wait_until_up(self, timeout: float = 60.0) -> None:
        """Returns once the child has started up (its imports take about a second), so that the first
        task's decoding starts at once; gives up silently after `timeout` (the task then waits instead)."""
        if self._up or not self._alive():
            return
        if self._conn.poll(timeout):
            message = self._receive()
            assert message[0] == "up", message  # the first message of every child
            self._up = True

    def _alive(self) -> bool:
        return self._child is not None and self._child.poll() is None and not self._conn.closed

    def _send(self, message: tuple) -> None:
        try:
            self._conn.send(message)
        except (BrokenPipeError, ConnectionResetError, OSError) as exc:
            raise self._died() from exc

    def _receive(self) -> tuple:
        try:
            return self._conn.recv()
        except (EOFError, ConnectionResetError, OSError) as exc:
            raise self._died() from exc

    def _died(self) -> DecodeProcessError:
        try:
            code = self._child.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        self._conn.close()
        return DecodeProcessError(f"the decode process died (exit code {code})")

    def _map(self, slot: int, shape: tuple[int, ...]) -> None:
        _, (fd,), _, _ = socket.recv_fds(self._buffer_fds, 1, 1)  # sent just before its "slot" message
        buffer = _mapped(fd, shape)
        if self.pin:
            self.pin = _page_lock(buffer)  # refused (no memory to lock): pinned per batch, as before
            if self.pin:
                self._locked.add(slot)
        self._slots[slot] = buffer
        self._slot_at[buffer.data_ptr()] = slot

    def _unmap(self, slot: int) -> None:
        """Forgets a buffer: the child dropped it (handed back), or a task ended with it held (the batches
        of a task are let go before its iterator closes: `process._detected` waits for the model)."""
        buffer = self._slots.pop(slot, None)
        if buffer is not None:
            self._slot_at.pop(buffer.data_ptr(), None)
            if slot in self._locked:  # unlocked before the mapping can go, while it still exists
                self._locked.discard(slot)
                _page_unlock(buffer)


def _fill(progress: DecodeProgress | None, child_progress: DecodeProgress) -> None:
    if progress is not None:
        for field in fields(DecodeProgress):
            setattr(progress, field.name, getattr(child_progress, field.name))


class _Stopped(Exception):
    """The parent no longer wants the running task's batches."""


class _ChildBuffers:
    """The child's side of the buffers: `decode.BatchBuffers`' contract, with the parent handing back."""

    def __init__(self, conn: Connection, buffer_fds: socket.socket, keep: int) -> None:
        self.conn, self.buffer_fds, self.keep = conn, buffer_fds, keep
        self.slots: dict[int, torch.Tensor] = {}  # every buffer not disowned, by number
        self.free: list[int] = []
        self.task: int | None = None  # the one being decoded
        self.waiting: list[tuple] = []  # tasks that came while one ran (never, as the parent sends them)
        self._numbers = iter(range(2**62))

    def take(self, shape: tuple[int, ...], device: torch.device, pinned: bool) -> torch.Tensor:
        self.handle_waiting_messages()
        while True:
            for slot in self.free:
                if tuple(self.slots[slot].shape) == shape:
                    self.free.remove(slot)
                    return self.slots[slot]
            if self.free and len(self.slots) >= self.keep:  # a previous video's size: make room
                slot = self.free.pop()
                del self.slots[slot]
                self.conn.send(("forget", slot))
            if len(self.slots) < self.keep:
                slot = next(self._numbers)
                fd = os.memfd_create(f"job-batch-{slot}")
                try:
                    os.ftruncate(fd, math.prod(shape))
                    self.slots[slot] = _mapped(fd, shape)
                    socket.send_fds(self.buffer_fds, [b"b"], [fd])
                finally:
                    os.close(fd)
                self.conn.send(("slot", slot, shape))
                return self.slots[slot]
            self.handle(self.conn.recv())  # every buffer is the parent's: wait for one back

    def number(self, buffer: torch.Tensor) -> int:
        return next(slot for slot, mine in self.slots.items() if mine.data_ptr() == buffer.data_ptr())

    def handle_waiting_messages(self) -> None:
        while self.conn.poll():
            self.handle(self.conn.recv())

    def handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "free" and message[1] in self.slots:
            self.free.append(message[1])
        elif kind == "disown":
            self.slots.pop(message[1], None)
        elif kind == "stop" and message[1] == self.task:
            raise _Stopped
        elif kind == "decode":
            self.waiting.append(message)


def _page_lock(buffer: torch.Tensor) -> bool:
    """Registers a mapped buffer with CUDA as pinned host memory; False where CUDA refuses."""
    cudart = torch.cuda.cudart()
    error = cudart.cudaHostRegister(buffer.data_ptr(), buffer.numel(), 0)
    if error != cudart.cudaError.success:
        log.warning("cannot page-lock a decode buffer for the GPU (CUDA error %s): batches are copied into "
                    "pinned memory instead", error)
        return False
    return True


def _page_unlock(buffer: torch.Tensor) -> None:
    torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())


def _mapped(fd: int, shape: tuple[int, ...]) -> torch.Tensor:
    """A uint8 tensor over the memory file `fd` (which may be closed afterwards: the mapping stays)."""
    return torch.frombuffer(mmap.mmap(fd, math.prod(shape)), dtype=torch.uint8).view(shape)


def _child_main(conn: Connection, buffer_fds: socket.socket, keep: int, parent_pid: int) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)  # the frame copies into a batch: the decoder has the stream's CPUs
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
    buffers = _ChildBuffers(conn, buffer_fds, keep)
    try:
        conn.send(("up", os.getpid()))
        while True:
            message = buffers.waiting.pop(0) if buffers.waiting else conn.recv()
            if message[0] == "decode":
                _decode(buffers, *message[1:])
            else:
                buffers.handle(message)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        return  # the parent is gone or done with us


def _decode(buffers: _ChildBuffers, task: int, path: str, info: VideoInfo, options: dict[str, Any]) -> None:
    conn, progress = buffers.conn, DecodeProgress()
    buffers.task = task
    try:
        for batch in iter_batches(path, info, progress=progress, buffers=buffers, **options):
            indices = np.ascontiguousarray(batch.frame_indices)
            conn.send(("batch", task, buffers.number(batch.buffer), indices, batch.timestamps_s, batch.planar))
            buffers.handle_waiting_messages()
        conn.send(("end", task, progress))
    except _Stopped:
        pass
    except VideoError as exc:
        conn.send(("video_error", task, progress, str(exc)))
    except (EOFError, BrokenPipeError, ConnectionResetError):
        raise
    except Exception as exc:  # a bug or a resource error, for the parent to record and retry
        log.exception("decoding %s failed", path)
        conn.send(("failed", task, f"{type(exc).__name__}: {exc}"))
    finally:
        buffers.task = None


def _exit_with_parent(parent_pid: int) -> None:
    """A parent killed with -9 never closes its pipe's end in a child blocked on decoding: leave with it."""
    while os.getppid() == parent_pid:
        time.sleep(PARENT_CHECK_S)
    os._exit(0)


if __name__ == "__main__":  # started by `DecodeProcess`: its sockets, read-ahead and parent
    _child_main(Connection(int(sys.argv[1])), socket.socket(fileno=int(sys.argv[2])), int(sys.argv[3]),
                int(sys.argv[4]))
