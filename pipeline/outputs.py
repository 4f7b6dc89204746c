"""Outputs of the refinement job, assembled by streaming the committed parts shard by shard:
refined.json (COCO results), quarantine.parquet, and the manifest's counts and invariant."""

from __future__ import annotations

import io
import json
import logging
from collections import defaultdict
from dataclasses import asdict

import pyarrow as pa
import pyarrow.parquet as pq

from bpr_core.formats import REFINED_SCHEMA, row_to_result

from . import storage
from .stages import is_read_failure

log = logging.getLogger(__name__)


def read_parts(loc: storage.Location) -> pa.Table:
    files = storage.list_files(loc, ".parquet")
    tables = [pq.read_table(f.path, filesystem=f.fs) for f in files]
    if not tables:
        return REFINED_SCHEMA.empty_table()
    return pa.concat_tables([t.select(REFINED_SCHEMA.names).cast(REFINED_SCHEMA) for t in tables])


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


def assemble(opts, out, shards, keys, prep_quarantine, n_in, cfg, card) -> dict:
    """Stream committed parts into refined.json and quarantine.parquet; check the invariant.

    refined.json holds every input detection that has a mask: refined, passed through, and
    quarantined ones too (with their coarse mask, `bpr_status` and `bpr_reason`), so downstream AP
    never drops because refinement failed. Only records without a readable mask (an invalid
    segmentation, a non-numeric id) are in quarantine.parquet alone."""
    counts = defaultdict(int)
    kinds: dict[str, int] = defaultdict(int)
    with_source = len(getattr(shards, "sources", [])) > 1
    duplicates = read_failures = in_json = 0
    quarantine_rows = [{k: r.get(k) for k in REFINED_SCHEMA.names} for r in prep_quarantine]
    for r in quarantine_rows:
        r.update(coarse_area=-1, refined_area=-1, num_patches=0, model_name=str(card.get("name")),
                 model_version=str(card.get("version", "")), config_hash=cfg.config_hash())
    counts["quarantined"] += len(quarantine_rows)

    def representable(row) -> bool:
        return bool(row.get("rle_counts")) and row.get("rle_h") is not None and row.get("rle_w") is not None \
            and row.get("image_id") is not None and row.get("category_id") is not None and row.get("instance_id") is not None \
            and row.get("score") is not None

    with storage.AtomicWriter(out.join("refined.json")) as f:
        f.write("[")

        def emit(row) -> None:
            nonlocal in_json
            f.write(("," if in_json else "") + "\n" + json.dumps(row_to_result(row, with_source), separators=(",", ":")))
            in_json += 1

        for i in range(len(shards)):
            table = read_parts(out.join("parts", f"shard-{i:05d}")).sort_by(
                [("image_id", "ascending"), ("instance_id", "ascending"), ("source_file", "ascending"), ("position", "ascending")])
            seen: set = set()  # an input row is (source file, position); a shard holds all of an image's rows
            for row in table.to_pylist():
                k = (row["source_file"], row["position"])
                duplicates += k in seen
                seen.add(k)
                counts[row["status"]] += 1
                if row["status"] == "quarantined":
                    quarantine_rows.append(row)
                emit(row)
        for row in quarantine_rows[: len(prep_quarantine)]:  # stopped before sharding: pass those with a mask through
            row["status"] = "quarantined"
            if representable(row):
                emit(row)
        f.write("\n]\n")
    for row in quarantine_rows:
        kinds[reason_kind(row["reason"] or "")] += 1
        read_failures += is_read_failure(row["reason"])
    qt = pa.Table.from_pylist(quarantine_rows, schema=REFINED_SCHEMA)
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
