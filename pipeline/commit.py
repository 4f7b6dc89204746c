"""Commit and resume for the refinement job.

A shard is the unit of commit: its key hashes everything its outputs depend on (instance rows, each
with its image's size and mtime, model with the checkpoint's content hash, config, input policies).
The workers write a shard's parts under OUT/parts/shard-NNNNN/ (named by content); the driver
writes OUT/_commits/shard-NNNNN.json, holding the key, last, once every instance of the shard is in
a written part. A re-run skips shards whose marker holds the same key (unless they had read
failures, which are retried), deletes the parts of the others, and runs only those.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import pyarrow.fs as pafs

from bpr_core.formats import InputError, JobFailed

from . import storage


def shard_key(table, model_id: str, config_hash: str, read_policy: str = "") -> str:
    """What a shard's outputs depend on: its instance rows (the spill's sorted Arrow table, hashed
    as its IPC bytes: no per-row work; the rows carry each image's identity, size and modification
    time, so a replaced image is refined again), the model (with its checkpoint's hash), the config
    and the input policies."""
    import pyarrow as pa

    h = hashlib.sha256(f"{model_id}|{config_hash}|{read_policy}|".encode())
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table.combine_chunks())
    h.update(sink.getvalue())
    return h.hexdigest()[:16]


# A file name that posixpath.normpath would change, or one outside the images root (absolute, URI).
NOT_NORMAL = r"(^|/)\.\.?(/|$)|//|/$|^$|^/|://"


class ImageStats:
    """Identity ("size:mtime_ns") of image file_names, from one recursive listing of the images
    root (on S3, LIST calls of 1,000 keys, never a request per image), held as two Arrow arrays;
    names outside the root (--allow-absolute-paths) are looked up one by one. A missing file has
    the identity "missing"."""

    def __init__(self, images_uri: str | None, arrays: tuple | None = None):
        """List `images_uri`, or take (names, stamps) arrays listed elsewhere (`ImageListing`)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        if arrays is not None:
            self.names, self.stamps = arrays
            return
        root = storage.resolve(images_uri)
        try:
            infos = root.fs.get_file_info(pafs.FileSelector(root.path, recursive=True, allow_not_found=True))
        except OSError:
            infos = []
        prefix = root.path.rstrip("/") + "/"
        paths, sizes, mtimes = [], [], []
        for info in infos:
            if info.is_file:
                paths.append(info.path), sizes.append(info.size), mtimes.append(info.mtime_ns)
        del infos
        paths = pa.array(paths, pa.string())
        inside = pc.starts_with(paths, prefix)
        self.names = pc.utf8_slice_codeunits(paths.filter(inside), len(prefix))
        self.stamps = pc.binary_join_element_wise(pa.array(sizes, pa.int64()).filter(inside).cast(pa.string()),
                                                  pa.array(mtimes, pa.int64()).filter(inside).cast(pa.string()), ":")

    def identities(self, file_names) -> "pa.Array":
        """The identity of each file name of an Arrow string array, as arrays: names already in
        normal form are looked up in one vectorised hash join; the others (rare) are normalised one by
        one, and names outside the root are looked up with a `stat` each."""
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc

        found = pc.index_in(file_names, value_set=self.names)
        ident = pc.fill_null(self.stamps.take(found), "missing")
        odd = pc.fill_null(pc.match_substring_regex(file_names, NOT_NORMAL), True).to_numpy(zero_copy_only=False)
        if not odd.any():
            return ident
        import posixpath

        values = ident.to_pylist()
        where = np.flatnonzero(odd)
        names = file_names.take(pa.array(where)).to_pylist()
        hits = pc.index_in(pa.array([posixpath.normpath(n or "") for n in names], pa.string()), value_set=self.names).to_pylist()
        for k, name, hit in zip(where.tolist(), names, hits):
            values[k] = self.stamps[hit].as_py() if hit is not None else self._outside_root(name or "")
        return pa.array(values, pa.string())

    @staticmethod
    def _outside_root(name: str) -> str:
        if "://" in name or name.startswith("/"):
            try:
                loc = storage.resolve(name)
                info = loc.fs.get_file_info(loc.path)
                if info.type == pafs.FileType.File:
                    return f"{info.size}:{info.mtime_ns}"
            except (OSError, InputError):
                pass
        return "missing"


def _list_into(images_uri: str, path: str) -> None:
    """In a child process: list the images root and write the identities as an Arrow IPC file, with
    the CPU seconds the listing took in its metadata (the benchmark reports them)."""
    import pyarrow as pa

    started = time.process_time()
    stats = ImageStats(images_uri)
    table = pa.table({"name": stats.names, "stamp": stats.stamps})
    table = table.replace_schema_metadata({"cpu_s": str(time.process_time() - started)})
    with pa.OSFile(path + ".tmp", "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    os.replace(path + ".tmp", path)


class ImageListing:
    """The listing of the images root (`ImageStats`), started now and taken with `result()`.

    In the background (`background=True`) it runs in a child process (spawned: the driver may
    already hold threads), so the driver reads the instances meanwhile and its per-image CPU drops
    by the cost of a stat per file; the result comes back as one Arrow file. Should the child fail,
    the listing is done here instead, with a warning. Otherwise it is done here, at `result()`.
    `cpu_s`: CPU seconds the listing took (in the child, or here)."""

    def __init__(self, images_uri: str, background: bool = False):
        self.images_uri, self.cpu_s = images_uri, 0.0
        self._stats: ImageStats | None = None
        self._process = self._dir = None
        if background:
            import multiprocessing
            import tempfile

            self._dir = tempfile.mkdtemp(prefix="bpr-listing-")
            self._process = multiprocessing.get_context("spawn").Process(
                target=_list_into, args=(images_uri, f"{self._dir}/stats.arrow"), daemon=True, name="bpr-image-listing")
            self._process.start()

    def result(self) -> ImageStats:
        if self._stats is not None:
            return self._stats
        if self._process is not None:
            import pyarrow as pa

            self._process.join()
            try:
                with pa.OSFile(f"{self._dir}/stats.arrow", "rb") as source:  # read into memory: the file goes
                    table = pa.ipc.open_file(source).read_all()
                self.cpu_s = float(table.schema.metadata[b"cpu_s"])
                self._stats = ImageStats(None, (table["name"].combine_chunks(), table["stamp"].combine_chunks()))
            except (OSError, pa.ArrowInvalid, KeyError) as e:
                import sys

                print(f"warning: listing {self.images_uri} in a child process failed (exit code {self._process.exitcode}: {e}); "
                      "listing it here", file=sys.stderr, flush=True)
            self.close()
        if self._stats is None:
            started = time.process_time()
            self._stats = ImageStats(self.images_uri)
            self.cpu_s = time.process_time() - started
        return self._stats

    def close(self) -> None:
        """Stop a listing still running and remove its file."""
        if self._process is not None:
            if self._process.is_alive():
                self._process.terminate()
            self._process.join()
            self._process = None
        if self._dir:
            import shutil

            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


def model_identity(method: str, checkpoint: str | None, card: dict) -> str:
    """The model as part of every shard key: card name and version, and for a network the content
    hash of its checkpoint, so another model that carries the same card never reuses old results."""
    ident = f"{card.get('name')}@{card.get('version', '')}"
    if method == "network":
        from bpr_core.refiner import DEFAULT_WEIGHTS

        ident += "#" + storage.sha256_hex(storage.resolve(str(checkpoint or DEFAULT_WEIGHTS)))[:16]
    return ident


class ShardLedger:
    """The driver's bookkeeping for the shards of one run: which are pending, how many of their
    instances the workers have written (from the parts' receipts), and their commit markers.
    State is per shard (counts) and per unreadable image, never per instance."""

    def __init__(self, out: storage.Location, max_unreadable_share: float, lease=None):
        self.out, self.share, self.lease = out, max_unreadable_share, lease
        self.expected: dict[int, int] = {}  # shard -> instances it holds
        self.images: dict[int, int] = {}  # shard -> images it holds
        self.keys: dict[int, str] = {}
        self.written: dict[int, int] = {}
        self.patches: dict[int, int] = {}
        self.failed: dict[int, dict[str, str]] = {}  # shard -> {image_id: first read error}
        self.failed_instances: dict[int, int] = {}  # shard -> instances on images that could not be read

    @staticmethod
    def name(i: int) -> str:
        return f"shard-{i:05d}"

    def marker(self, i: int) -> storage.Location:
        return self.out.join("_commits", f"{self.name(i)}.json")

    def parts(self, i: int) -> storage.Location:
        return self.out.join("parts", self.name(i))

    def is_done(self, i: int, key: str) -> bool:
        """Committed with this key and no read failures (those shards are retried)."""
        marker = self.marker(i)
        previous = json.loads(storage.read_bytes(marker)) if storage.exists(marker) else {}
        return previous.get("key") == key and not previous.get("read_failures")

    def start(self, i: int, key: str, instances: int, images: int) -> None:
        """Shard i will run: drop what an interrupted run left of it."""
        storage.delete(self.parts(i))
        self.expected[i], self.images[i], self.keys[i] = instances, images, key
        self.written[i] = self.patches[i] = self.failed_instances[i] = 0
        self.failed[i] = {}

    def receive(self, shard: int, instances: int, patches: int, failed_images: dict[str, list]) -> bool:
        """A part of `shard` was written (`failed_images`: image_id -> [first read error, instances
        on it in the part]). True when the shard is now complete."""
        self.written[shard] += instances
        self.patches[shard] += patches
        for image_id, (reason, n) in failed_images.items():
            self.failed[shard].setdefault(image_id, reason)
            self.failed_instances[shard] += n
        if self.written[shard] > self.expected[shard]:
            raise RuntimeError(f"{self.name(shard)}: {self.written[shard]} instances written for {self.expected[shard]} in; "
                               "not committing")
        return self.written[shard] == self.expected[shard]

    def commit(self, i: int) -> dict:
        """Every instance of shard i is in a written part: check and write its marker (last)."""
        name = self.name(i)
        if self.lease is not None and self.lease.lost:
            raise JobFailed(f"lost the lease on {self.out.uri} to another run; {name} not committed")
        failed, n_images = self.failed[i], self.images[i]
        bad = len(failed)
        if bad and bad > self.share * n_images and (bad >= 3 or bad == n_images):
            first = failed[min(failed, key=int)]
            raise JobFailed(f"{name}: {bad} of {n_images} images could not be read (more than "
                            f"{self.share:.0%}, --max-unreadable-share): a systemic failure, e.g. no access "
                            f"to the images from the workers; not committing. First error: {first}")
        # A shard with read failures is committed (its outputs are complete, every instance
        # accounted for) but not "done": the next run redoes it, so restored images get refined.
        storage.write_bytes_atomic(self.marker(i), json.dumps(
            {"key": self.keys[i], "instances": self.expected[i], "patches": self.patches[i],
             "read_failures": self.failed_instances[i], "unreadable_images": len(failed)}).encode())
        return {"shard": i, "instances": self.expected[i], "patches": self.patches[i]}
