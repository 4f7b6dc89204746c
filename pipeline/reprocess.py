"""Scheduled reprocessing: refine every detector output under a prefix that the current model and
config have not refined yet. Idempotent, and safe to start from cron while a previous run is still
going: a lease object in the output prefix (owner + expiry, renewed between files) lets one run
work at a time; a run that finds a live lease of another owner exits without doing anything, and
an expired lease (a crashed run) is taken over.

For each detections file D: OUT/<safe name of D>/ holds the refine job's outputs; it is skipped
when its `reprocess.json` names the same input content hash, model and config hash. Within a file
the refine job's shard commits resume an interrupted run.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import time
import uuid
from dataclasses import dataclass, replace

from bpr_core.formats import InputError
from bpr_core.refiner import make_patch_refiner

from . import storage
from .refine_job import RefineOptions, run

LEASE = "_lease.json"


def safe_name(name: str) -> str:
    """A detections file name -> one path component that cannot leave the output prefix."""
    base = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".")
    if not base or base in (".", ".."):
        base = "_"
    return base[:200]


@dataclass
class Lease:
    out: storage.Location
    owner: str
    seconds: float

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
        if cur and cur.get("owner") != self.owner and cur.get("expires_at", 0) > time.time():
            return False, cur
        self.renew()
        time.sleep(0.2)  # last writer wins on object stores: read back to see who won
        cur = self._read()
        return (cur or {}).get("owner") == self.owner, cur

    def renew(self) -> None:
        body = {"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                "expires_at": time.time() + self.seconds}
        storage.write_bytes_atomic(self.out.join(LEASE), json.dumps(body).encode())

    def release(self) -> None:
        cur = self._read()
        if cur and cur.get("owner") == self.owner:
            storage.delete(self.out.join(LEASE))


def list_detections(prefix: str) -> list[storage.Location]:
    loc = storage.check_readable(prefix, "detections prefix")
    files = [f for f in storage.list_files(loc) if f.path.lower().endswith((".json", ".parquet"))]
    if not files:
        raise InputError(f"no detector outputs (*.json, *.parquet) under {prefix}")
    return files


def reprocess(detections: str, template: RefineOptions, lease_seconds: float = 3600.0) -> dict:
    """Refine each new or changed detections file. `template` carries images, image index, output
    prefix and model/config; its `coarse` and `out` are set per file."""
    _, cfg, card = make_patch_refiner(template.method, template.checkpoint, "cpu", template.config)
    model_id = f"{card.get('name')}@{card.get('version', '')}"
    out = storage.resolve(template.out)
    storage.makedirs(out)
    lease = Lease(out, uuid.uuid4().hex, lease_seconds)
    ok, holder = lease.acquire()
    if not ok:
        until = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(holder.get("expires_at", 0)))
        print(f"another run holds the lease ({holder.get('host')} pid {holder.get('pid')}, until {until} UTC); nothing to do",
              file=sys.stderr)
        return {"skipped_lease": True, "refined": [], "up_to_date": [], "retry": []}
    done, fresh, retry = [], [], []
    try:
        root = storage.resolve(detections)
        for f in list_detections(detections):
            rel = f.path[len(root.path):].lstrip("/") if f.path.startswith(root.path) else os.path.basename(f.path)
            target = out.join(safe_name(rel))
            content = storage.sha256_hex(f)[:16]
            key = {"input": rel, "content": content, "model": model_id, "config_hash": cfg.config_hash()}
            marker = target.join("reprocess.json")
            if storage.exists(marker) and json.loads(storage.read_bytes(marker)) == key:
                fresh.append(rel)
                continue
            print(f"refining {f.uri} -> {target.uri}", file=sys.stderr, flush=True)
            manifest = run(replace(template, coarse=f.uri, out=target.uri))
            if not manifest["invariant"]["ok"]:
                raise RuntimeError(f"{f.uri}: instance invariant violated; not marking it done")
            if manifest["counts"].get("read_failures"):  # outputs written, but the next run retries the unread images
                print(f"{f.uri}: {manifest['counts']['read_failures']} instances on unreadable images; not marking it done",
                      file=sys.stderr, flush=True)
                retry.append(rel)
            else:
                storage.write_bytes_atomic(marker, json.dumps(key).encode())
                done.append(rel)
            lease.renew()
    finally:
        lease.release()
    return {"skipped_lease": False, "refined": done, "up_to_date": fresh, "retry": retry}
