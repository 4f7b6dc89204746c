"""Ingest for the refinement job: check inputs and model before Ray starts, stream and validate the
instances record by record, and spill them by shard to local files.

Inputs are streamed (a results JSON in chunks, its plain entries read as columns and the others
entry by entry; Parquet batch by batch), so the driver never holds the whole input; a shard holds
up to shard_size images in image-id order. Only what needs the image index is checked here
(unknown or unusable image ids, the pixel limit on the mask size); the per-image checks
(duplicate instance ids, size against the decoded image) run in the extraction actors, so the
driver keeps no per-instance state.
"""

from __future__ import annotations

import os
import sys
from collections import defaultdict
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from bpr_core.formats import (INSTANCE_COLUMNS, INT64_MAX, REFINED_SCHEMA, ImageIndex, InputError, RecordError, invalid_row,
                              read_image_index, table_row)
from bpr_core.refiner import make_patch_refiner
from bpr_core.results_arrow import iter_results_batches
from bpr_core.results_parallel import FileOpener

from . import storage
from .commit import ImageListing
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
                            ("file_name", pa.string()),
                            ("image_identity", pa.string())])  # the image file's size:mtime (part of the shard key)
STORED_SCHEMA = SPILL_SCHEMA.remove(SPILL_SCHEMA.get_field_index("image_identity"))  # identities join when a shard is read
SPILL_ORDER = [("image_id", "ascending"), ("instance_id", "ascending"), ("source_file", "ascending"), ("position", "ascending")]


class ShardSpill:
    """Instance rows split by shard into Arrow IPC files in a local temporary directory.

    Rows are buffered and written per shard as a record batch (one file per shard and flush); at
    most `buffer_rows` are held at once. Reading a shard (`table`) loads just that shard as one
    Arrow table sorted by (image_id, instance_id, source_file, position), a total order since a
    position is unique within its source file, and counts its images (`images`, for progress).
    """

    def __init__(self, n_shards: int, buffer_rows: int = 50_000, index: "ArrowIndex | None" = None):
        """`index`: gives a shard's rows their image identities when the shard is read (its listing
        of the images may still be running while rows are added); without it, image_identity is
        null. The spill owns it from here (`close`)."""
        import tempfile

        self.dir = tempfile.mkdtemp(prefix="bpr-refine-")
        self.sources: list[str] = []  # the input files, in reading order
        self.counts = [0] * n_shards
        self.images = [0] * n_shards  # images with at least one instance, per shard (set when read)
        self._files: list[int] = [0] * n_shards
        self._tables: dict[int, list[pa.Table]] = defaultdict(list)
        self._buffered, self.buffer_rows = 0, buffer_rows
        self.index = index

    def add(self, shard: int, row: dict) -> None:
        """One row (a dict of STORED_SCHEMA's fields)."""
        self.add_table(shard, pa.Table.from_pylist([row], schema=STORED_SCHEMA))

    def add_table(self, shard: int, table: pa.Table) -> None:
        """Rows of one shard as an Arrow table of STORED_SCHEMA (the columnar path: no per-row work)."""
        self._tables[shard].append(table)
        self.counts[shard] += table.num_rows
        self._buffered += table.num_rows
        if self._buffered >= self.buffer_rows:
            self.flush()

    def flush(self) -> None:
        for shard, tables in self._tables.items():
            table = pa.concat_tables(tables)
            with pa.OSFile(os.path.join(self.dir, f"{shard}-{self._files[shard]}.arrow"), "wb") as sink:
                with pa.ipc.new_stream(sink, STORED_SCHEMA) as writer:
                    writer.write_table(table)
            self._files[shard] += 1
        self._tables.clear()
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
        identities = self.index.identities_of(table) if self.index else pa.nulls(table.num_rows, pa.string())
        return table.append_column(SPILL_SCHEMA.field("image_identity"), identities)

    def __getitem__(self, shard: int) -> list[dict]:
        return self.table(shard).to_pylist()

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def close(self) -> None:
        import shutil

        if self.index:
            self.index.close()  # a listing still running in the background is stopped
        shutil.rmtree(self.dir, ignore_errors=True)


INT_TYPES = (pa.types.is_integer, pa.types.is_floating)  # floats must hold integral values (checked as arrays)
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


INPUT_SCHEMA = STORED_SCHEMA.remove(STORED_SCHEMA.get_field_index("file_name"))  # validated rows before the index
BATCH_ROWS = 65_536  # rows per columnar step (Parquet batches; results-JSON rows are gathered into tables of this size)


def _exact_ints(arr: pa.Array, minimum: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A column -> (which rows certainly pass `exact_int`, their values as int64). Rows not marked
    are checked one by one (`table_row`), which gives the exact reason, so this only has to be
    sure about the rows it accepts."""
    valid = arr.is_valid().to_numpy(zero_copy_only=False)
    if pa.types.is_integer(arr.type):
        if arr.type == pa.uint64():
            valid &= pc.fill_null(pc.less_equal(arr, pa.scalar(INT64_MAX, pa.uint64())), False).to_numpy(zero_copy_only=False)
            arr = pc.if_else(pa.array(valid), arr, pa.scalar(0, arr.type))
        values = pc.fill_null(arr, 0).cast(pa.int64()).to_numpy(zero_copy_only=False)
    else:
        x = pc.fill_null(arr.cast(pa.float64()), np.nan).to_numpy(zero_copy_only=False)
        with np.errstate(invalid="ignore"):
            valid &= np.isfinite(x) & (x == np.floor(x)) & (x >= -(2.0 ** 63)) & (x < 2.0 ** 63)
        values = np.where(valid, x, 0).astype(np.int64)
    if minimum is not None:
        valid &= values >= minimum
    return valid, values


def _columnar(batch: pa.RecordBatch) -> tuple[np.ndarray, dict[str, pa.Array]]:
    """One Parquet batch validated column by column: (rows that pass every field check, the
    columns in INSTANCE_SCHEMA's types)."""
    ok = np.ones(batch.num_rows, bool)
    cols: dict[str, pa.Array] = {}
    for name, minimum in (("image_id", None), ("instance_id", 0), ("category_id", None), ("rle_h", 1), ("rle_w", 1)):
        valid, values = _exact_ints(batch.column(name), minimum)
        ok &= valid
        cols[name] = pa.array(values, pa.int64())
    score = batch.column("score")
    # float(v) as the row reader does: a huge integer score rounds (a safe cast would refuse it)
    x = pc.fill_null(score.cast(pa.float64(), safe=False), np.nan).to_numpy(zero_copy_only=False)
    ok &= np.isfinite(x)
    cols["score"] = pa.array(x, pa.float64())
    counts = batch.column("rle_counts")
    ok &= counts.is_valid().to_numpy(zero_copy_only=False)
    cols["rle_counts"] = counts.cast(pa.string())
    return ok, cols


def _table_batches(loc: storage.Location) -> Iterator[tuple[pa.Table, list[dict]]]:
    """One Parquet file in columnar steps: (a table of the rows that pass every check, with
    source_file and position; the other rows one by one as `table_row` reads them: valid rows as
    dicts, bad ones with an `invalid` reason). A file whose schema cannot hold instances (a missing
    column, a string image_id column) is malformed and fails the job before any work."""
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
    for batch in pf.iter_batches(columns=INSTANCE_COLUMNS, batch_size=BATCH_ROWS):
        n = batch.num_rows
        ok, cols = _columnar(batch)
        positions = np.arange(position, position + n, dtype=np.int64)
        keep = pa.array(ok)
        good = pa.table({**{c: cols[c].filter(keep) for c in INSTANCE_COLUMNS},
                         "source_file": pa.repeat(pa.scalar(loc.uri, pa.string()), int(ok.sum())),
                         "position": pa.array(positions[ok]),
                         "detector_fields": pa.nulls(int(ok.sum()), pa.string())}, schema=INPUT_SCHEMA)
        others = []
        for k in np.flatnonzero(~ok).tolist():  # one by one, for the exact reason
            raw = batch.slice(k, 1).to_pylist()[0]
            try:
                row = table_row(raw)
            except RecordError as e:
                row = invalid_row(position + k, f"{loc.uri} row {position + k}: {e}", raw)
            row.update(source_file=loc.uri, position=position + k, detector_fields=None)
            others.append(row)
        position += n
        yield good, others


def _json_batches(loc: storage.Location, index: ImageIndex) -> Iterator[tuple[pa.Table, list[dict]]]:
    """A results JSON (plain or gzip), streamed: the plain entries as columns, the others entry by
    entry (`bpr_core.results_arrow`, the same rows as `iter_results_json`; a plain file from 512 MB
    on in byte ranges by reader processes, `bpr_core.results_parallel`), in steps: (a table of
    the rows the columns vouch for, the other rows: valid ones as dicts, bad ones with an `invalid`
    reason)."""
    def open_stream():  # again if the entry-by-entry reader has to take over the file
        return loc.fs.open_input_stream(loc.path, compression=None)

    # a large plain file is read in byte ranges by reader processes beside the driver
    ranged = FileOpener(loc.fs, loc.path)
    for table, others in iter_results_batches(open_stream, index.records, loc.uri, ranged=ranged):
        for row in others:
            row["source_file"] = loc.uri
        columns = {n: table[n] for n in table.column_names}
        columns["source_file"] = pa.repeat(pa.scalar(loc.uri, pa.string()), table.num_rows)
        yield pa.table({n: columns[n] for n in INPUT_SCHEMA.names}, schema=INPUT_SCHEMA), others


def _batches(coarse_loc: storage.Location, index: ImageIndex, sources: list[str]) -> Iterator[tuple[pa.Table, list[dict]]]:
    """Instance rows from a results JSON or a Parquet file or dataset, each with its source_file
    and position, in steps: (validated rows as a table, other rows as dicts)."""
    if coarse_loc.path.lower().endswith((".json", ".json.gz")):
        sources.append(coarse_loc.uri)
        yield from _json_batches(coarse_loc, index)
        return
    for loc in _table_files(coarse_loc):
        sources.append(loc.uri)
        yield from _table_batches(loc)


class ArrowIndex:
    """The image index as arrays: the usable image ids sorted (an image's rank = its position, which
    decides its shard) with their file names and the ids whose entry is unusable with the reason.
    Looking rows up is a vectorised binary search, with no per-row work.

    File identities (size:mtime, part of the shard keys) come from one listing of the images root
    (`listing`, which may run in a child process while the instances are read) and are joined to
    the rows when a shard is read (`identities_of`), not during ingest."""

    def __init__(self, index: ImageIndex, listing: ImageListing):
        self.ids, self.file_names = index.records.sorted_ids, index.records.sorted_file_names
        self.invalid = index.invalid  # never among the usable ids (read_image_index drops them)
        self.listing = listing
        self._identities: pa.Array | None = None

    def identities_of(self, table: pa.Table) -> pa.Array:
        """The image identity of each row of a shard's table (every row's image is in the index)."""
        if self._identities is None:  # once: every image's identity, in rank order
            self._identities = self.listing.result().identities(self.file_names)
        return self._identities.take(pa.array(self.rank(table["image_id"].to_numpy())))

    def close(self) -> None:
        self.listing.close()

    def __len__(self) -> int:
        return len(self.ids)

    def rank(self, image_ids: np.ndarray) -> np.ndarray:
        """Each id's rank among the usable ids, -1 where it has no usable entry."""
        if not len(self.ids):
            return np.full(len(image_ids), -1, np.int64)
        r = np.minimum(np.searchsorted(self.ids, image_ids), len(self.ids) - 1)
        r[self.ids[r] != image_ids] = -1
        return r


def _index_reason(row: dict, rank: int, index: ArrowIndex, opts: RefineOptions) -> str:
    """Why a validated row with this image rank (-1: no usable entry) cannot be refined."""
    image_id, limit = row["image_id"], opts.max_image_pixels
    if image_id in index.invalid:
        return f"unusable image index entry: {index.invalid[image_id]}"
    if rank < 0:
        return f"image_id {image_id} is not in the image index {opts.image_info}"
    return (f"mask RLE is {row['rle_h']}x{row['rle_w']} ({row['rle_h'] * row['rle_w'] / 1e6:.1f} MP), "
            f"over the pixel limit of {limit / 1e6:g} MP (--max-image-pixels)")


def _route(table: pa.Table, index: ArrowIndex, opts: RefineOptions, shards: "ShardSpill", quarantined: list[dict]) -> None:
    """Validated rows -> their shard's spill (with the image's file name and identity), or quarantined with the
    index's reason, all as column operations; only rejected rows are looked at one by one."""
    if not table.num_rows:
        return
    image_ids = table["image_id"].combine_chunks().to_numpy()  # (a ChunkedArray's to_numpy is slow)
    rank = index.rank(image_ids)
    bad = rank < 0
    if opts.max_image_pixels:
        pixels = table["rle_h"].combine_chunks().to_numpy().astype(np.float64) * table["rle_w"].combine_chunks().to_numpy()
        bad |= pixels > opts.max_image_pixels
    if bad.any():
        for row, r in zip(table.filter(pa.array(bad)).to_pylist(), rank[bad].tolist()):
            quarantined.append({**row, "status": "quarantined", "reason": _index_reason(row, r, index, opts)})
        keep = pa.array(~bad)
        table, rank = table.filter(keep), rank[~bad]
    shard = rank // opts.shard_size
    order = np.argsort(shard, kind="stable")
    ranks = pa.array(rank[order])
    table = table.take(order).append_column("file_name", index.file_names.take(ranks))
    shard = shard[order]
    cuts = np.flatnonzero(np.r_[True, shard[1:] != shard[:-1], True])
    for a, b in zip(cuts[:-1], cuts[1:]):
        shards.add_table(int(shard[a]), table.slice(a, b - a))


# From this many images on, the images root is listed in a child process while the driver reads the
# instances (a stat per file costs ~3 us here, more than the rest of the driver's per-image work);
# below it, starting a process (~1 s) costs more than the listing.
BACKGROUND_LISTING_IMAGES = 100_000


def index_images(opts: RefineOptions, background: bool | None = None) -> tuple[ImageIndex, ArrowIndex]:
    """The image index as read (for the results-JSON reader's polygon sizes) and as arrays, with
    the listing of the images root for the file identities started (`background`: in a child
    process; by default from BACKGROUND_LISTING_IMAGES images on): the driver's per-image work."""
    records = _load_index(storage.resolve(opts.image_info))
    for problem in records.unattributable[:5]:
        _progress(f"warning: {problem} (entry ignored)")
    if background is None:
        background = len(records.records) >= BACKGROUND_LISTING_IMAGES
    return records, ArrowIndex(records, ImageListing(opts.images, background))


def prepare_shards(opts: RefineOptions, indexed: tuple[ImageIndex, ArrowIndex] | None = None) -> tuple[ShardSpill, list[dict], int]:
    """Stream the instances, validate them against the index, and spill them by shard, column by
    column (a Parquet input is validated as arrays; a results JSON entry by entry as it is parsed).
    One rule for every bad record: quarantined with a reason naming file, position and field; the
    job goes on. Only a malformed file (or option) stops it, before any work.

    Returns (shards, quarantined rows in input order, number of input instances); `shards.sources`
    lists the input files. `indexed`: index_images(opts), when already done.
    """
    check_inputs(opts)
    records, index = indexed or index_images(opts)
    shards = ShardSpill((len(index) + opts.shard_size - 1) // opts.shard_size, index=index)
    quarantined, n_in = [], 0
    try:
        for table, others in _batches(storage.resolve(opts.coarse), records, shards.sources):
            n_in += table.num_rows + len(others)
            valid = []
            for row in others:
                reason = row.pop("invalid", None)
                if reason:
                    quarantined.append({**row, "status": "quarantined", "reason": reason})
                else:
                    valid.append(row)
            if valid:
                table = pa.concat_tables([table, pa.Table.from_pylist(valid, schema=INPUT_SCHEMA)])
            _route(table, index, opts, shards, quarantined)
        shards.flush()
    except BaseException:  # a malformed file: no spill files or listing left behind
        shards.close()
        raise
    source_rank = {s: k for k, s in enumerate(shards.sources)}
    quarantined.sort(key=lambda r: (source_rank.get(r.get("source_file"), -1), r.get("position") or 0))
    return shards, quarantined, n_in
