"""One writer per output_dir: a lease file that the running job holds and renews.

A second run into the same output_dir stops at start-up naming the holder, instead of racing it
(duplicate parts, deleted temp files, two settings checks passing at once). A holder that died is
recognised (its process is gone on this host, or it stopped renewing) and its lease taken over.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone

from job.errors import OutputBusyError
from job.storage import Store

log = logging.getLogger(__name__)

LEASE = "_state/lease.json"


class Lease:
    def __init__(self, store: Store, renew_every_s: float = 10.0, expires_after_s: float = 60.0) -> None:
        self.store, self.renew_every_s, self.expires_after_s = store, renew_every_s, expires_after_s
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(), "run": uuid.uuid4().hex,
                       "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _record(self) -> bytes:
        return json.dumps({**self.holder, "renewed": time.time()}).encode()

    def acquire(self) -> Lease:
        for _ in range(2):  # the second try follows taking over a dead holder's lease
            created = self.store.create_exclusive(LEASE, self._record())
            current = None if created else self.store.get(LEASE)
            other = json.loads(current) if current else None
            # A conditional PUT retried after its answer was lost finds the lease its first try created.
            if created or (other is not None and other.get("run") == self.holder["run"]):
                self._renewer = threading.Thread(target=self._renew, name="lease", daemon=True)
                self._renewer.start()
                return self
            if other is not None and not self._is_dead(other):
                raise OutputBusyError(
                    f"output_dir={self.store.location} is being written by another run (host {other['host']}, "
                    f"pid {other['pid']}, since {other['since']}); wait for it to finish, or use another output_dir"
                )
            if other is not None:
                log.warning("output_dir=%s: taking over the lease of a run that is gone (host %s, pid %s)",
                            self.store.location, other["host"], other["pid"])
            self.store.delete(LEASE)
        raise OutputBusyError(f"output_dir={self.store.location}: another run took the lease just now; try again")

    def _is_dead(self, other: dict) -> bool:
        if other.get("host") == self.holder["host"] and not _pid_alive(int(other.get("pid", -1))):
            return True
        return time.time() - float(other.get("renewed", 0)) > self.expires_after_s

    def _renew(self) -> None:
        while not self._stop.wait(self.renew_every_s):
            try:
                self.store.put(LEASE, self._record())
            except Exception as exc:  # noqa: BLE001 - the run's own writes will report a broken output
                log.warning("could not renew the lease on %s: %s", self.store.location, exc)

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=5)
            current = self.store.get(LEASE)
            if current is not None and json.loads(current).get("run") == self.holder["run"]:
                self.store.delete(LEASE)
            self._renewer = None

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
