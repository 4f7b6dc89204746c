"""Outputs of the refinement job, assembled by streaming the committed parts shard by shard:
refined.json (COCO results), quarantine.parquet, and the manifest's counts and invariant."""

from __future__ import annotations

import io
import json
import logging
from collections import defaultdict
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from bpr_core.formats import REFINED_SCHEMA, row_to_result

from . import storage
from .stages import RESULT_JSON, is_read_failure, part_schema

log = logging.getLogger(__name__)


def read_parts(loc: storage.Location) -> pa.Table:
    files = storage.list_files(loc, ".parquet")
    tables = [pq.read_table(f.path, filesystem=f.fs) for f in files]
    if not tables:
        return REFINED_SCHEMA.empty_table()
    return pa.concat_tables([t.select(REFINED_SCHEMA.names).cast(REFINED_SCHEMA) for t in tables])


OUTPUT_ORDER = [("image_id", "ascending"), ("instance_id", "ascending"), ("source_file", "ascending"), ("position", "ascending")]


KEY_COLUMNS = ["image_id", "instance_id", "source_file", "position", "status", RESULT_JSON]  # what assembly reads


def shard_results(loc: storage.Location, with_source: bool, columns: list[str] | None = None) -> pa.Table:
    """A committed shard's parts as one table in output order, with each row's refined.json entry
    (serialised by the worker that wrote the part; computed here only for parts written before
    parts carried it). `columns`: read only those (they must include the OUTPUT_ORDER keys); all by default."""
    columns = columns or part_schema().names
    schema = pa.schema([part_schema().field(c) for c in columns])
    tables = []
    for f in storage.list_files(loc, ".parquet"):
        with f.fs.open_input_file(f.path) as fh:
            pf = pq.ParquetFile(fh, pre_buffer=not isinstance(f.fs, pafs.LocalFileSystem))  # pre-buffering helps S3 only
            if RESULT_JSON in pf.schema_arrow.names:
                t = pf.read(columns=columns, use_threads=False)
            else:
                t = pf.read(use_threads=False).select(REFINED_SCHEMA.names).cast(REFINED_SCHEMA)
                entries = [json.dumps(row_to_result(r, with_source), separators=(",", ":")) for r in t.to_pylist()]
                t = t.append_column(RESULT_JSON, pa.array(entries, pa.string())).select(columns)
        tables.append(t if t.schema.equals(schema) else t.cast(schema))
    if not tables:
        return schema.empty_table()
    return pa.concat_tables(tables).sort_by(OUTPUT_ORDER).combine_chunks()


def count_duplicates(table: pa.Table) -> int:
    """Rows of one input row, (source file, position), more than once. In output order an input
    row's copies are adjacent (they share image and instance id too), so neighbours are compared."""
    if table.num_rows < 2:
        return 0
    pos = table["position"].combine_chunks().to_numpy()  # (a ChunkedArray's to_numpy costs ~1 ms per call)
    k = np.flatnonzero(pos[1:] == pos[:-1])  # positions repeat rarely: compare the file names only there
    if not len(k):
        return 0
    sources = table["source_file"]
    return sum(a == b for a, b in zip(sources.take(pa.array(k)).to_pylist(), sources.take(pa.array(k + 1)).to_pylist()))


def shard_summary(out_uri: str, shard: int, with_source: bool) -> dict:
    """What assembly needs from one committed shard, read from its parts: its refined.json entries
    as one text in output order (`text`, `entries`), its counts per status, its duplicated input
    rows, and its quarantined rows in full. A function of the parts alone, so it can run anywhere:
    the job runs it in Ray tasks, shards in parallel, and the driver only concatenates (`assemble`)."""
    loc = storage.resolve(out_uri).join("parts", f"shard-{shard:05d}")
    table = shard_results(loc, with_source, KEY_COLUMNS)
    statuses = {s.as_py(): n.as_py() for s, n in zip(*pc.value_counts(table["status"]).flatten())}
    quarantined = []
    if statuses.get("quarantined"):  # rare: read the whole rows of this shard for quarantine.parquet
        full = shard_results(loc, with_source)
        quarantined = full.filter(pc.equal(full["status"], "quarantined")).to_pylist()
    entries = table[RESULT_JSON].drop_null().combine_chunks()
    text = ""
    if len(entries):  # joined in Arrow: no Python string per entry
        text = pc.binary_join(pa.ListArray.from_arrays(pa.array([0, len(entries)], pa.int32()), entries), ",\n")[0].as_py()
    return {"text": text, "entries": len(entries), "statuses": statuses, "duplicates": count_duplicates(table),
            "quarantined": quarantined}


def local_summaries(out_uri: str, n_shards: int, with_source: bool):
    """Every shard's summary, in shard order, computed here one after the other."""
    return (shard_summary(out_uri, i, with_source) for i in range(n_shards))


# From this many input instances on, the committed shards are read for the outputs in Ray tasks, in
# parallel, and the driver only concatenates their texts (reading a shard's parts costs the driver
# ~1 us per instance); below it, starting task workers costs more than reading the parts here.
PARALLEL_ASSEMBLY_INSTANCES = 200_000


def _summary_parts(out_uri: str, shard: int, with_source: bool) -> tuple[dict, str]:
    """In a Ray task: a shard's summary, its text apart (a second return, left in the object store
    for the task that writes refined.json)."""
    summary = shard_summary(out_uri, shard, with_source)
    return summary, summary.pop("text")


def ray_summaries(out_uri: str, n_shards: int, with_source: bool):
    """Each shard's summary from a Ray task, yielded in shard order with its text as a reference,
    as many in flight as the cluster has CPUs. The tasks ask for no CPU (they are short and mostly
    I/O, and must not wait behind actors still being released); the bound in flight limits them."""
    from collections import deque

    import ray

    task = ray.remote(num_cpus=0, max_retries=3, num_returns=2)(_summary_parts).options(scheduling_strategy="SPREAD")
    in_flight = max(2, int(ray.cluster_resources().get("CPU", 2)))
    pending: deque = deque()

    def take() -> dict:
        summary_ref, text_ref = pending.popleft()
        return {**ray.get(summary_ref), "text": text_ref}

    for i in range(n_shards):
        pending.append(task.remote(out_uri, i, with_source))
        if len(pending) >= in_flight:
            yield take()
    while pending:
        yield take()


def ray_write_json(out_uri: str, texts: list) -> None:
    """refined.json written by one Ray task from the shards' texts (references are passed inside a
    list, so the task fetches them one at a time rather than all at once)."""
    import ray

    ray.get(ray.remote(num_cpus=0, max_retries=3)(write_refined_json).remote(out_uri, texts))


def reason_kind(reason: str) -> str:
    """A quarantine reason -> a short kind for the summary line and the manifest."""
    if is_read_failure(reason):
        return "image unreadable (retried by the next run)"
    for needle, kind in ((" resolves outside", "path outside the image root"), ("absolute path", "absolute path refused"),
                         ("symlink", "symlink leaving the image root"), ("pixel limit", "over the pixel limit"),
                         ("decompression-bomb", "over the pixel limit"), ("but the mask RLE is", "image/mask size mismatch"),
                         ("invalid RLE", "invalid RLE"), ("not in the image index", "image_id not in the index"),
                         ("unusable image index entry", "bad image index entry"), ("duplicate instance_id", "duplicate instance_id"),
                         ("cannot decode", "image undecodable"), ("not a recognised image", "image undecodable"),
                         ("unreadable header", "image undecodable")):
        if needle in reason:
            return kind
    if " entry " in reason or " row " in reason:
        return "invalid record"
    return "other"


def write_refined_json(out_uri: str, texts: list) -> None:
    """refined.json from its pieces in order (each a text of entries joined by ",\\n", or a Ray
    reference to one, fetched one at a time), streamed, appearing only once complete."""
    with storage.AtomicWriter(storage.resolve(out_uri).join("refined.json")) as f:
        f.write("[")
        for k, text in enumerate(texts):
            if not isinstance(text, str):
                import ray

                text = ray.get(text)
            f.write(("," if k else "") + "\n" + text)
        f.write("\n]\n")


def assemble(opts, out, shards, keys, prep_quarantine, n_in, cfg, card, summaries=None, write_json=None) -> dict:
    """Stream committed parts into refined.json and quarantine.parquet; check the invariant.

    `summaries`: each shard's `shard_summary`, in shard order, whose `text` may be a Ray reference
    (the job makes them in Ray tasks); by default they are made here, shard by shard. `write_json`:
    writes refined.json from the texts (`write_refined_json`'s signature; the job runs it in a Ray
    task, so the entries never pass through the driver). Either way this only concatenates.

    refined.json holds every input detection that has a mask: refined, passed through, and
    quarantined ones too (with their coarse mask, `bpr_status` and `bpr_reason`), so downstream AP
    never drops because refinement failed. Only records without a readable mask (an invalid
    segmentation, a non-numeric id) are in quarantine.parquet alone."""
    counts = defaultdict(int)
    kinds: dict[str, int] = defaultdict(int)
    with_source = len(shards.sources) > 1
    duplicates = read_failures = in_json = 0
    quarantine_rows = [{k: r.get(k) for k in REFINED_SCHEMA.names} for r in prep_quarantine]  # result_json set below
    for r in quarantine_rows:
        r.update(coarse_area=-1, refined_area=-1, num_patches=0, model_name=str(card.get("name")),
                 model_version=str(card.get("version", "")), config_hash=cfg.config_hash())
    counts["quarantined"] += len(quarantine_rows)

    def representable(row) -> bool:
        return bool(row.get("rle_counts")) and row.get("rle_h") is not None and row.get("rle_w") is not None \
            and row.get("image_id") is not None and row.get("category_id") is not None and row.get("instance_id") is not None \
            and row.get("score") is not None

    texts = []  # refined.json's pieces in order: texts, or (Ray) references to them

    def emit(text, entries: int) -> None:
        nonlocal in_json
        if entries:
            texts.append(text)
            in_json += entries

    if summaries is None:
        summaries = local_summaries(out.uri, len(shards), with_source)
    for summary in summaries:
        duplicates += summary["duplicates"]
        for status, n in summary["statuses"].items():
            counts[status] += n
        quarantine_rows.extend(summary["quarantined"])
        emit(summary["text"], summary["entries"])
    for row in quarantine_rows[: len(prep_quarantine)]:  # stopped before sharding: pass those with a mask through
        row["status"] = "quarantined"
        row[RESULT_JSON] = json.dumps(row_to_result(row, with_source), separators=(",", ":")) if representable(row) else None
        if row[RESULT_JSON]:
            emit(row[RESULT_JSON], 1)
    (write_json or write_refined_json)(out.uri, texts)
    for row in quarantine_rows:
        kinds[reason_kind(row["reason"] or "")] += 1
        read_failures += is_read_failure(row["reason"])
    qt = pa.Table.from_pylist(quarantine_rows, schema=part_schema())  # the parts' schema: they read as one table
    buf = io.BytesIO()
    pq.write_table(qt, buf)
    storage.write_bytes_atomic(out.join("quarantine.parquet"), buf.getvalue())
    n_out = counts["refined"] + counts["passed_through"] + counts["quarantined"]
    invariant = {"instances_in": n_in, "instances_out": n_out, "duplicates": duplicates,
                 "ok": n_out == n_in and duplicates == 0}
    if not invariant["ok"]:
        log.error("invariant violated: %s", invariant)
    counts["read_failures"] = read_failures
    counts["in_refined_json"] = in_json
    return {
        "inputs": {"images": opts.images, "coarse": opts.coarse, "image_info": opts.image_info},
        "outputs": {"refined_json": out.join("refined.json").uri, "parts": out.join("parts").uri,
                    "quarantine": out.join("quarantine.parquet").uri},
        "model": {k: card[k] for k in card if isinstance(card[k], (str, int, float))},
        "method": opts.method,
        "config": cfg.to_dict(),
        "config_hash": cfg.config_hash(),
        "shards": [{"index": i, "key": k, "instances": c} for i, (c, k) in enumerate(zip(shards.counts, keys))],
        "counts": dict(counts, input=n_in),
        "quarantine_reasons": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
        "invariant": invariant,
        "options": {k: v for k, v in asdict(opts).items() if k in ("shard_size", "batch_size", "refine_actors", "extract_actors",
                                                                    "refine_cpus", "images_per_block", "instances_per_call",
                                                                    "instances_per_part")},
    }
