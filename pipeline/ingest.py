"""Ingest for the refinement job: check inputs and model before Ray starts, stream and validate the
instances record by record, and spill them by shard to local files.

Inputs are streamed (a results JSON element by element, Parquet batch by batch), so the driver never
holds the whole input; a shard holds up to shard_size images in image-id order. Only what needs the
image index is checked here (unknown or unusable image ids, the pixel limit on the mask size); the
per-image checks (duplicate instance ids, size against the decoded image) run in the extraction
actors, so the driver keeps no per-instance state.
"""

from __future__ import annotations

import os
import sys
from collections import defaultdict
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from bpr_core.formats import (INSTANCE_COLUMNS, REFINED_SCHEMA, ImageIndex, InputError, RecordError, invalid_row, iter_results_json,
                              read_image_index, table_row)
from bpr_core.refiner import make_patch_refiner

from . import storage
from .options import RefineOptions


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _load_index(loc: storage.Location) -> ImageIndex:
    """The image index, read through the filesystem (object stores: a cached local copy)."""
    local = storage.local_file(loc.uri, what="image index")
    try:
        return read_image_index(local)
    except InputError as e:  # name the user's input, not the local copy
        raise InputError(str(e).replace(str(local), loc.uri)) from None


def check_inputs(opts: RefineOptions) -> None:
    """Fail fast, before Ray starts or any work is done, on bad options, missing or unreadable
    inputs, an output location that cannot be written, and a checkpoint that cannot be used."""
    opts.validate()
    storage.check_readable(opts.image_info, "image index")
    storage.check_readable(opts.coarse, "coarse results")
    storage.check_readable(opts.images, "images")
    storage.check_writable(opts.out, "output location")
    check_model(opts)


def check_model(opts: RefineOptions) -> None:
    """Load the checkpoint and resolve the config once, so a missing, foreign or conflicting
    checkpoint (e.g. --patch-size against the checkpoint's) is one clear error before Ray starts."""
    from bpr_core.formats import InputError

    local = storage.local_file(opts.checkpoint)
    try:
        make_patch_refiner(opts.method, local, "cpu", opts.config)
    except (ValueError, FileNotFoundError) as e:
        raise InputError(str(e).replace(str(local), str(opts.checkpoint)) if local else str(e)) from e


SPILL_SCHEMA = pa.schema([(n, REFINED_SCHEMA.field(n).type) for n in INSTANCE_COLUMNS]
                         + [("source_file", pa.string()), ("position", pa.int64()), ("detector_fields", pa.string()),
                            ("file_name", pa.string())])
SPILL_ORDER = [("image_id", "ascending"), ("instance_id", "ascending"), ("source_file", "ascending"), ("position", "ascending")]


class ShardSpill:
    """Instance rows split by shard into Arrow IPC files in a local temporary directory.

    Rows are buffered and written per shard as a record batch (one file per shard and flush); at
    most `buffer_rows` are held at once. Reading a shard (`table`) loads just that shard as one
    Arrow table sorted by (image_id, instance_id, source_file, position), a total order since a
    position is unique within its source file, and counts its images (`images`, for progress).
    """

    def __init__(self, n_shards: int, buffer_rows: int = 50_000):
        import tempfile

        self.dir = tempfile.mkdtemp(prefix="bpr-refine-")
        self.counts = [0] * n_shards
        self.images = [0] * n_shards  # images with at least one instance, per shard (set when read)
        self._files: list[int] = [0] * n_shards
        self._buf: dict[int, list[dict]] = defaultdict(list)
        self._buffered, self.buffer_rows = 0, buffer_rows

    def add(self, shard: int, row: dict) -> None:
        self._buf[shard].append(row)
        self.counts[shard] += 1
        self._buffered += 1
        if self._buffered >= self.buffer_rows:
            self.flush()

    def flush(self) -> None:
        for shard, rows in self._buf.items():
            table = pa.Table.from_pylist(rows, schema=SPILL_SCHEMA)
            with pa.OSFile(os.path.join(self.dir, f"{shard}-{self._files[shard]}.arrow"), "wb") as sink:
                with pa.ipc.new_stream(sink, SPILL_SCHEMA) as writer:
                    writer.write_table(table)
            self._files[shard] += 1
        self._buf.clear()
        self._buffered = 0

    def __len__(self) -> int:
        return len(self.counts)

    def table(self, shard: int) -> pa.Table:
        tables = []
        for k in range(self._files[shard]):
            with pa.OSFile(os.path.join(self.dir, f"{shard}-{k}.arrow"), "rb") as source:
                tables.append(pa.ipc.open_stream(source).read_all())
        if not tables:
            return SPILL_SCHEMA.empty_table()
        table = pa.concat_tables(tables).sort_by(SPILL_ORDER).combine_chunks()
        self.images[shard] = len(pc.unique(table["image_id"]))
        return table

    def __getitem__(self, shard: int) -> list[dict]:
        return self.table(shard).to_pylist()

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def close(self) -> None:
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)


INT_TYPES = (pa.types.is_integer, pa.types.is_floating)  # floats are checked per row for exact integers
COLUMN_TYPES = {"image_id": INT_TYPES, "instance_id": INT_TYPES, "category_id": INT_TYPES, "rle_h": INT_TYPES,
                "rle_w": INT_TYPES, "score": INT_TYPES, "rle_counts": (pa.types.is_string, pa.types.is_large_string)}


def _table_files(loc: storage.Location) -> list[storage.Location]:
    info = loc.fs.get_file_info(loc.path)
    if info.type == pafs.FileType.Directory:
        files = storage.list_files(loc, ".parquet")
        if not files:
            raise InputError(f"instance table {loc.uri} is a directory without .parquet files")
        return files
    return [loc]


def _iter_table_file(loc: storage.Location) -> Iterator[dict]:
    """Rows of one Parquet file, validated one by one. A file whose schema cannot hold instances
    (a missing column, a string image_id column) is malformed and fails the job before any work."""
    try:
        pf = pq.ParquetFile(loc.fs.open_input_file(loc.path))
    except (OSError, pa.ArrowInvalid) as e:
        raise InputError(f"cannot read instance table {loc.uri}: {e}") from None
    schema = pf.schema_arrow
    missing = sorted(set(INSTANCE_COLUMNS) - set(schema.names))
    if missing:
        raise InputError(f"instance table {loc.uri} lacks columns {missing}")
    for col, checks in COLUMN_TYPES.items():
        t = schema.field(col).type
        if not any(c(t) for c in checks):
            want = "a string" if col == "rle_counts" else "an integer or float"
            raise InputError(f"instance table {loc.uri}: column {col} has type {t}; expected {want} column")
    position = 0
    for batch in pf.iter_batches(columns=INSTANCE_COLUMNS, batch_size=8192):
        for raw in batch.to_pylist():
            try:
                row = table_row(raw)
            except RecordError as e:
                row = invalid_row(position, f"{loc.uri} row {position}: {e}", raw)
            row["position"] = position
            row.setdefault("detector_fields", None)
            position += 1
            yield row


def _iter_instances(coarse_loc: storage.Location, index: ImageIndex, sources: list[str]) -> "Iterator[dict]":
    """Instance rows from a results JSON (plain or gzip) or a Parquet file or dataset, each with its
    source_file and position; a bad record comes as a row with an `invalid` reason."""
    if coarse_loc.path.lower().endswith((".json", ".json.gz")):
        sources.append(coarse_loc.uri)
        with coarse_loc.fs.open_input_stream(coarse_loc.path, compression=None) as raw:  # streamed, local or object store
            for position, row in enumerate(iter_results_json(raw, index.records, name=coarse_loc.uri, strict=False)):
                row["source_file"], row["position"] = coarse_loc.uri, position
                yield row
        return
    for loc in _table_files(coarse_loc):
        sources.append(loc.uri)
        for row in _iter_table_file(loc):
            row["source_file"] = loc.uri
            yield row


def prepare_shards(opts: RefineOptions) -> tuple[ShardSpill, list[dict], int]:
    """Stream the instances, validate them record by record against the index, and spill them by
    shard. One rule for every bad record: quarantined with a reason naming file, position and field;
    the job goes on. Only a malformed file (or option) stops it, before any work.

    Returns (shards, quarantined rows, number of input instances); `shards.sources` lists the input files.
    """
    check_inputs(opts)
    index_loc, coarse_loc = storage.resolve(opts.image_info), storage.resolve(opts.coarse)
    index = _load_index(index_loc)
    for problem in index.unattributable[:5]:
        _progress(f"warning: {problem} (entry ignored)")
    ranks = {image_id: r for r, image_id in enumerate(sorted(index.records))}
    shards = ShardSpill((len(ranks) + opts.shard_size - 1) // opts.shard_size)
    shards.sources = []
    quarantined, n_in = [], 0
    limit = opts.max_image_pixels
    for row in _iter_instances(coarse_loc, index, shards.sources):
        n_in += 1
        reason = row.pop("invalid", None)
        if reason is None:
            image_id = row["image_id"]
            if image_id in index.invalid:
                reason = f"unusable image index entry: {index.invalid[image_id]}"
            elif image_id not in ranks:
                reason = f"image_id {image_id} is not in the image index {opts.image_info}"
            elif limit and row["rle_h"] * row["rle_w"] > limit:
                reason = (f"mask RLE is {row['rle_h']}x{row['rle_w']} ({row['rle_h'] * row['rle_w'] / 1e6:.1f} MP), "
                          f"over the pixel limit of {limit / 1e6:g} MP (--max-image-pixels)")
        if reason:
            quarantined.append({**row, "status": "quarantined", "reason": reason})
            continue
        row["file_name"] = index.records[row["image_id"]].file_name
        shards.add(ranks[row["image_id"]] // opts.shard_size, row)
    shards.flush()
    return shards, quarantined, n_in
