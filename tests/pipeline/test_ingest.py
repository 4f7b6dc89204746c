"""The driver's columnar ingest without Ray: Parquet inputs validated as arrays, the image index
held as arrays, image identities from one listing. Each is checked against the per-record rules
(`table_row`, `_index_entry`, posixpath.normpath) it replaces, row by row."""

import json
import os
import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bpr_core.formats import INSTANCE_COLUMNS, RecordError, _index_entry, exact_int, read_image_index, table_row
from pipeline.commit import ImageStats
from pipeline.ingest import prepare_shards
from pipeline.options import RefineOptions

RLE = "b04400000>"  # a 4x4 square in an 8x8 mask


def _index(root, n_images):
    (root / "images").mkdir()
    images = [{"id": i, "file_name": f"{i}.png", "height": 8, "width": 8} for i in range(1, n_images + 1)]
    (root / "index.json").write_text(json.dumps({"images": images}))
    for i in range(1, n_images + 1):
        (root / "images" / f"{i}.png").write_bytes(b"x" * i)


def test_parquet_columns_are_validated_exactly_as_row_by_row(tmp_path):
    """Every kind of column type and bad value, in one file read in several batches: the rows that
    reach a shard and the quarantined ones with their reasons equal what table_row says row by row."""
    _index(tmp_path, 40)
    n = 200
    rng = np.random.default_rng(0)
    image_id = rng.integers(1, 46, n).astype(np.float64)  # 41..45 are not in the index
    image_id[[3, 17]] = [2.5, np.nan]
    instance_id = np.arange(n, dtype=np.uint64)
    instance_id[5] = 2 ** 63  # over int64
    category = pa.array([1] * n, pa.int32())
    score = rng.random(n)
    score[[7, 8]] = [np.inf, np.nan]
    h = pa.array([8] * 190 + [None, 0, -3, 8, 8, 8, 8, 8, 8, 8], pa.int64())
    w = pa.array([8.0] * 195 + [8.5, 1e30, 8.0, None, 8.0])
    counts = pa.array([RLE] * 198 + [None, RLE], pa.large_string())
    table = pa.table({"image_id": image_id, "instance_id": instance_id, "category_id": category, "score": score,
                      "rle_counts": counts, "rle_h": h, "rle_w": w})
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=64)
    opts = RefineOptions(images=str(tmp_path / "images"), coarse=str(tmp_path / "in.parquet"),
                         image_info=str(tmp_path / "index.json"), out=str(tmp_path / "out"), method="identity", shard_size=7)
    shards, quarantined, n_in = prepare_shards(opts)
    try:
        spilled = {r["position"]: r for i in range(len(shards)) for r in shards[i]}
        assert n_in == n == len(spilled) + len(quarantined)
        assert [q["position"] for q in quarantined] == sorted(q["position"] for q in quarantined)  # input order
        quarantined = {q["position"]: q for q in quarantined}
        uri = shards.sources[0]
        for pos, raw in enumerate(table.to_pylist()):
            try:
                want = table_row(raw)
            except RecordError as e:
                assert quarantined[pos]["reason"] == f"{uri} row {pos}: {e}"
                continue
            if not 1 <= want["image_id"] <= 40:
                assert quarantined[pos]["reason"].startswith(f"image_id {want['image_id']} is not in the image index")
                continue
            got = spilled[pos]
            assert {k: got[k] for k in INSTANCE_COLUMNS} == want and type(got["score"]) is float
            assert got["file_name"] == f"{want['image_id']}.png" and got["image_identity"].startswith(f"{want['image_id']}:")
        assert len(quarantined) >= 12 and len(spilled) > 100
        # each shard holds the images of its id range (7 usable image ids per shard)
        for i in range(len(shards)):
            assert {(r["image_id"] - 1) // 7 for r in shards[i]} <= {i}
    finally:
        shards.close()


def _reference_index(entries):
    """The entry-by-entry reading the array version replaces (records in index order, invalid ids
    with the reason)."""
    records, first_at, invalid = {}, {}, {}
    for i, entry in enumerate(entries):
        try:
            rec = _index_entry(entry, "id", "file_name")
        except RecordError as e:
            try:
                bad = exact_int(entry.get("id"), "id") if isinstance(entry, dict) else None
            except RecordError:
                bad = None
            if bad is not None:
                invalid.setdefault(bad, f"images[{i}]: {e}")
            continue
        if rec.image_id in first_at:
            invalid[rec.image_id] = f"{first_at[rec.image_id]},{i}"
            continue
        first_at[rec.image_id] = i
        records[rec.image_id] = rec
    for image_id in invalid:
        records.pop(image_id, None)
    return records, invalid


def test_image_index_arrays_match_entry_by_entry_reading(tmp_path):
    entries = [{"id": 5, "file_name": "a.png", "height": 4, "width": 6}, {"id": 3, "file_name": "b.png"},
               {"id": 9, "file_name": "c.png", "height": 4.0, "width": 2}, {"id": True, "file_name": "d.png"},
               {"id": 7, "file_name": "e.png", "height": 4}, {"id": 7, "file_name": "e2.png"},
               {"id": 11, "file_name": "f.png"}, {"id": 11, "file_name": "f2.png"}, {"id": 11, "file_name": "f3.png"},
               ["not", "an", "object"], {"id": 2 ** 64, "file_name": "g.png"}, {"id": -4, "file_name": ""},
               {"id": 13, "file_name": 13}, {"id": 15.0, "file_name": "h.png", "height": "", "width": None},
               {"id": 0, "file_name": "z.png", "height": 1, "width": 1}]
    (tmp_path / "index.json").write_text(json.dumps({"images": entries}))
    index = read_image_index(tmp_path / "index.json")
    records, invalid = _reference_index(entries)
    assert list(index.records) == list(records)  # the index's order
    assert {k: index.records[k] for k in index.records} == records
    assert set(index.invalid) == set(invalid)
    for image_id, reason in invalid.items():
        if "," in reason:  # duplicates name their first and last entries
            first, last = reason.split(",")
            assert index.invalid[image_id].endswith(f"(images[{first}] and images[{last}])")
        else:
            assert index.invalid[image_id].endswith(reason)
    assert 11 in index.invalid and "images[6] and images[8]" in index.invalid[11]
    assert 4 not in index.records and index.records.get(4) is None and index.records.get("5") is None


@pytest.mark.parametrize("odd", [False, True])
def test_image_identities_as_arrays_equal_one_by_one_lookups(tmp_path, odd):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    for name in ("a.png", "sub/b.png", "sub/c.png"):
        (root / name).write_bytes(b"x" * len(name))
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"yy")
    stats = ImageStats(str(root))
    names = ["a.png", "sub/b.png", "missing.png", "sub/c.png"]
    if odd:
        names += ["./a.png", "sub//b.png", "sub/../a.png", "sub/c.png/", str(outside), "../outside.png", ""]
    got = stats.identities(pa.array(names, pa.string())).to_pylist()

    def one(name):
        rel = posixpath.normpath(name)
        p = root / rel
        if name.startswith("/"):
            p = __import__("pathlib").Path(name)
        elif rel.startswith("..") or not p.is_file():
            return "missing"
        st = os.stat(p)
        return f"{st.st_size}:{st.st_mtime_ns}"

    assert got == [one(n) for n in names]
    assert got[2] == "missing" and got[0] != got[1]


def test_integer_score_columns_are_read_as_the_row_reader_reads_them(tmp_path):
    """An integer score column (even beyond float precision) is a score like any other."""
    _index(tmp_path, 3)
    scores = [1, 2 ** 60 + 1, 0]
    pq.write_table(pa.table({"image_id": [1, 2, 3], "instance_id": [0, 1, 2], "category_id": [1, 1, 1], "score": scores,
                             "rle_counts": [RLE] * 3, "rle_h": [8] * 3, "rle_w": [8] * 3}), tmp_path / "in.parquet")
    opts = RefineOptions(images=str(tmp_path / "images"), coarse=str(tmp_path / "in.parquet"),
                         image_info=str(tmp_path / "index.json"), out=str(tmp_path / "out"), method="identity")
    shards, quarantined, n_in = prepare_shards(opts)
    try:
        assert n_in == 3 and not quarantined
        assert [r["score"] for r in shards[0]] == [float(s) for s in scores]
    finally:
        shards.close()


@pytest.mark.parametrize("sized", [True, False])
def test_parquet_image_index_columns_equal_entry_by_entry_reading(tmp_path, monkeypatch, sized):
    """The columnar reading of a Parquet index accepts exactly the rows the entry-by-entry reader
    accepts, keeps the index's order, and leaves every other row to that reader's exact reason."""
    import bpr_core.formats as formats

    ids = [5, 3, 9, None, 7, 7, 11, 11, 11, 2 ** 63 + 5, -4, 13, 0, 8]
    paths = ["a.png", "b.png", "c.png", "d.png", "e.png", "e2.png", "f.png", "f2.png", "f3.png", "g.png", "", None, "z.png", "y.png"]
    id_col = pa.array([i if i is None or i >= 0 else 4 for i in ids], pa.uint64())  # uint64: 2**63+5 is out of range
    data = {"image_id": id_col, "path": pa.array(paths, pa.string())}
    if sized:
        data["height"] = pa.array([4, None, 4, 1, 4, None, None, None, None, None, 2, 1, 1, 0], pa.int32())
        data["width"] = pa.array([6, None, 2, 1, None, None, None, None, None, None, 2, 1, 1, 3], pa.int32())
    pq.write_table(pa.table(data), tmp_path / "index.parquet")
    got = read_image_index(tmp_path / "index.parquet")
    calls = []
    monkeypatch.setattr(formats, "_columnar_index", lambda t: calls.append(1) or (None, np.arange(t.num_rows)))
    want = read_image_index(tmp_path / "index.parquet")
    assert calls  # the reference really took the entry-by-entry path
    assert list(got.records) == list(want.records) and len(want.records) >= 3
    assert {k: got.records[k] for k in got.records} == {k: want.records[k] for k in want.records}
    assert got.invalid == want.invalid and got.unattributable == want.unattributable
    assert got.invalid and want.unattributable  # both kinds of bad row were there


def test_listing_in_a_child_process_gives_the_same_shards_and_keys(tmp_path):
    """The images root listed in a child process while the instances are read: the shards (rows and
    image identities) and their keys equal an in-process listing's; a replaced image changes its
    identity in both; closing the spill stops the child and removes its file."""
    from pipeline.commit import shard_key
    from pipeline.ingest import index_images

    _index(tmp_path, 12)
    rows = [{"image_id": i % 12 + 1, "category_id": 1, "score": 0.5, "segmentation": {"size": [8, 8], "counts": RLE}}
            for i in range(30)]
    (tmp_path / "in.json").write_text(json.dumps(rows))
    opts = RefineOptions(images=str(tmp_path / "images"), coarse=str(tmp_path / "in.json"),
                         image_info=str(tmp_path / "index.json"), out=str(tmp_path / "out"), method="identity", shard_size=5)

    def shards_and_keys(background):
        indexed = index_images(opts, background=background)
        assert (indexed[1].listing._process is not None) == background
        shards, _, _ = prepare_shards(opts, indexed)
        try:
            tables = [shards.table(i) for i in range(len(shards))]
            assert background or indexed[1].listing.cpu_s > 0
            return tables, [shard_key(t, "m", "c") for t in tables]
        finally:
            shards.close()
            assert indexed[1].listing._process is None and indexed[1].listing._dir is None

    here, keys = shards_and_keys(False)
    child, child_keys = shards_and_keys(True)
    assert len(here) == 3 and all(a.equals(b) for a, b in zip(here, child)) and keys == child_keys
    assert all(v is not None and v != "missing" for t in child for v in t["image_identity"].to_pylist())
    (tmp_path / "images" / "7.png").write_bytes(b"replaced, another size")
    again, again_keys = shards_and_keys(True)
    assert [a == b for a, b in zip(keys, again_keys)] == [True, False, True]  # image 7 is in shard 1 only


def test_a_malformed_input_leaves_no_spill_or_listing_behind(tmp_path):
    from bpr_core.formats import InputError
    from pipeline.ingest import index_images

    _index(tmp_path, 3)
    pq.write_table(pa.table({"image_id": [1], "score": [0.5]}), tmp_path / "in.parquet")  # no mask columns
    opts = RefineOptions(images=str(tmp_path / "images"), coarse=str(tmp_path / "in.parquet"),
                         image_info=str(tmp_path / "index.json"), out=str(tmp_path / "out"), method="identity")
    import tempfile

    indexed = index_images(opts, background=True)
    before = set(os.listdir(tempfile.gettempdir()))
    with pytest.raises(InputError, match="lacks columns"):
        prepare_shards(opts, indexed)
    listing = indexed[1].listing
    assert listing._process is None and listing._dir is None  # the child stopped, its file removed
    assert not [d for d in set(os.listdir(tempfile.gettempdir())) - before if d.startswith("bpr-refine-")]  # no spill left


def test_a_results_json_read_by_reader_processes_gives_the_same_shards_and_quarantine(tmp_path, monkeypatch):
    """The job's ingest with the results JSON read in byte ranges by reader processes (the size
    threshold lowered for the test): the same shards, row for row, and the same quarantined rows
    (their reasons name the same entry positions) as reading it in the driver process."""
    from bpr_core import results_parallel

    _index(tmp_path, 40)
    rows = [{"image_id": i % 40 + 1, "category_id": 1 + i % 5, "bbox": [i * 0.25, 1.5, 3, 4.0], "score": (i % 97) / 97,
             "segmentation": {"size": [8, 8], "counts": RLE}} for i in range(3000)]
    rows[5]["image_id"] = 99  # not in the index
    rows[1234]["segmentation"] = [[1, 1, 5, 1, 5, 5]]  # a polygon: read whole
    rows[2500]["score"] = "high"  # invalid
    (tmp_path / "in.json").write_text(json.dumps(rows))
    opts = RefineOptions(images=str(tmp_path / "images"), coarse=str(tmp_path / "in.json"),
                         image_info=str(tmp_path / "index.json"), out=str(tmp_path / "out"), method="identity", shard_size=10)
    monkeypatch.setattr(results_parallel, "MIN_BYTES", 0)
    monkeypatch.setattr(results_parallel, "RANGE_BYTES", 20_000)
    monkeypatch.setattr(results_parallel, "MIN_RANGE_BYTES", 20_000)
    ranges = []
    real = results_parallel.iter_ranges

    def counted(*args, **kwargs):
        kwargs["stats"] = stats = {}
        yield from real(*args, **kwargs)
        ranges.append(stats)

    monkeypatch.setattr(results_parallel, "iter_ranges", counted)

    def ingest(readers):
        monkeypatch.setenv("BPR_JSON_READERS", str(readers))
        shards, quarantined, n_in = prepare_shards(opts)
        try:
            return [shards.table(i).drop_columns(["image_identity"]) for i in range(len(shards))], quarantined, n_in
        finally:
            shards.close()

    here, q_here, n_here = ingest(1)
    assert not ranges
    there, q_there, n_there = ingest(2)
    assert ranges and ranges[0]["accepted"] >= 10 and ranges[0]["handover_at"] is None, ranges
    assert n_here == n_there == 3000 and len(here) == len(there) == 4
    assert all(a.equals(b) for a, b in zip(here, there))
    assert q_here == q_there and [r["position"] for r in q_there] == [5, 2500]
