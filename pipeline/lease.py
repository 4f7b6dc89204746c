"""A lease on an output prefix, so two runs never write one output at once.

The lease is an object `OUT/_lease.json` (owner, host, pid, expiry). A run acquires it (an expired
one, or one whose process on this host is gone, left by a crashed or killed run, is taken over), a heartbeat thread renews it every third of its length
while the run works, however long one file or shard takes, and it is released at the end. On object
stores the last writer wins, so `acquire` reads back after writing to see who won; a run whose
heartbeat finds another owner marks the lease lost and stops before committing more work.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field

from . import storage

LEASE = "_lease.json"


def _dead_here(holder: dict) -> bool:
    """A lease written on this host by a process that no longer exists (a killed run): free."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


@dataclass
class Lease:
    out: storage.Location
    owner: str
    seconds: float
    lost: bool = False
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def _read(self) -> dict | None:
        loc = self.out.join(LEASE)
        if not storage.exists(loc):
            return None
        try:
            return json.loads(storage.read_bytes(loc))
        except ValueError:
            return None

    def acquire(self) -> tuple[bool, dict | None]:
        cur = self._read()
        if cur and cur.get("owner") != self.owner and cur.get("expires_at", 0) > time.time() and not _dead_here(cur):
            return False, cur
        self._write()
        time.sleep(0.2)  # last writer wins on object stores: read back to see who won
        cur = self._read()
        return (cur or {}).get("owner") == self.owner, cur

    def _write(self) -> None:
        body = {"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                "expires_at": time.time() + self.seconds}
        storage.write_bytes_atomic(self.out.join(LEASE), json.dumps(body).encode())

    def renew(self) -> bool:
        """Extend the lease; False (and `lost`) if another run holds it now."""
        cur = self._read()
        if cur and cur.get("owner") != self.owner:
            self.lost = True
            return False
        self._write()
        return True

    def start_heartbeat(self, every: float | None = None) -> None:
        every = every or max(1.0, self.seconds / 3)

        def beat():
            while not self._stop.wait(every):
                try:
                    if not self.renew():
                        return
                except OSError:  # a transient storage error: try again next beat
                    pass

        self._thread = threading.Thread(target=beat, name="bpr-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        cur = self._read()
        if cur and cur.get("owner") == self.owner:
            storage.delete(self.out.join(LEASE))

    @staticmethod
    def describe(holder: dict | None) -> str:
        h = holder or {}
        until = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(h.get("expires_at", 0)))
        return f"{h.get('host')} pid {h.get('pid')}, until {until} UTC"
