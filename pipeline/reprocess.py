"""Scheduled reprocessing: refine every detector output under a prefix that the current model and
config have not refined yet. Idempotent, and safe to start from cron while a previous run is still
going: a lease object in the output prefix (pipeline.lease: owner + expiry, renewed by a heartbeat)
lets one run work at a time; a run that finds a live lease of another owner exits without doing
anything, and an expired lease (a crashed run) is taken over.

For each detections file D: OUT/files/<D's relative path>/ holds the refine job's outputs; it is
skipped when its `reprocess.json` names the same model and config hash and the file's size and
modification time are unchanged (then it is not even read), or its content hash is. A file with
unreadable images is not marked done. Within a file the refine job's shard commits resume an
interrupted run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import uuid
from dataclasses import replace

from bpr_core.formats import InputError, JobFailed
from bpr_core.refiner import make_patch_refiner

from . import storage
from .lease import LEASE, Lease
from .refine_job import RefineOptions, model_identity, run


def safe_name(name: str) -> str:
    """One path component -> a component that cannot leave the output prefix. A component that had
    to be changed gets a short hash of the original, so two different names never share a folder
    ("a b.json" and "a_b.json" stay apart)."""
    base = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".")
    if not base or base in (".", ".."):
        base = "_"
    base = base[:200]
    if base != name:
        base += "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
    return base


def output_folder(out: storage.Location, rel: str) -> storage.Location:
    """OUT/files/<the detections file's relative path, component by component>: `cam1/batch.json`
    and `cam1_batch.json` get different folders, and no folder can collide with OUT/_lease.json."""
    return out.join("files", *[safe_name(c) for c in rel.split("/") if c])


def list_detections(prefix: str) -> list[storage.Location]:
    loc = storage.check_readable(prefix, "detections prefix")
    files = [f for f in storage.list_files(loc) if f.path.lower().endswith((".json", ".parquet"))]
    if not files:
        raise InputError(f"no detector outputs (*.json, *.parquet) under {prefix}")
    return files


def reprocess(detections: str, template: RefineOptions, lease_seconds: float = 3600.0) -> dict:
    """Refine each new or changed detections file. `template` carries images, image index, output
    prefix and model/config; its `coarse` and `out` are set per file."""
    _, cfg, card = make_patch_refiner(template.method, storage.local_file(template.checkpoint), "cpu", template.config)
    model_id = model_identity(template.method, storage.local_file(template.checkpoint), card)
    out = storage.resolve(template.out)
    storage.makedirs(out)
    lease = Lease(out, uuid.uuid4().hex, lease_seconds)
    ok, holder = lease.acquire()
    if not ok:
        print(f"another run holds the lease ({Lease.describe(holder)}); nothing to do", file=sys.stderr)
        return {"skipped_lease": True, "refined": [], "up_to_date": [], "retry": []}
    lease.start_heartbeat()  # renewed while a long file is refined, not only between files
    done, fresh, retry = [], [], []
    try:
        root = storage.resolve(detections)
        for f in list_detections(detections):
            if lease.lost:
                raise JobFailed(f"lost the lease on {out.uri} to another run; stopping")
            rel = f.path[len(root.path):].lstrip("/") if f.path.startswith(root.path) else os.path.basename(f.path)
            target = output_folder(out, rel)
            info = f.fs.get_file_info(f.path)
            stat = {"size": info.size, "mtime": info.mtime_ns}
            marker = target.join("reprocess.json")
            previous = json.loads(storage.read_bytes(marker)) if storage.exists(marker) else {}
            same_model = previous.get("model") == model_id and previous.get("config_hash") == cfg.config_hash()
            # Unchanged size and modification time: up to date without reading the file; else hash it.
            if same_model and previous.get("input") == rel and previous.get("stat") == stat:
                fresh.append(rel)
                continue
            content = storage.sha256_hex(f)[:16]
            key = {"input": rel, "content": content, "model": model_id, "config_hash": cfg.config_hash(), "stat": stat}
            if same_model and previous.get("input") == rel and previous.get("content") == content:
                storage.write_bytes_atomic(marker, json.dumps(key).encode())  # touched, same bytes
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
    finally:
        lease.release()
    return {"skipped_lease": False, "refined": done, "up_to_date": fresh, "retry": retry}
