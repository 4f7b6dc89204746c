import json

import pyarrow.parquet as pq
import pytest

from bpr_core import rle
from bpr_core.formats import (
    INSTANCE_SCHEMA,
    InputError,
    load_image_index,
    read_instances,
    read_results_json,
    row_to_result,
    write_instances_parquet,
    write_results_json,
)


def test_results_json_parquet_json_roundtrip_is_lossless(synthetic_small, tmp_path):
    src = synthetic_small / "coarse.json"
    rows = read_results_json(src)
    assert len(rows) == len(json.loads(src.read_text()))
    pq_path = tmp_path / "inst.parquet"
    write_instances_parquet(rows, pq_path)
    assert pq.read_schema(pq_path).equals(INSTANCE_SCHEMA)
    back = read_instances(pq_path)
    out = tmp_path / "back.json"
    assert write_results_json(back, out) == len(rows)
    original = json.loads(src.read_text())
    again = json.loads(out.read_text())
    assert len(again) == len(original)
    for i, (a, b) in enumerate(zip(original, again)):
        assert a["segmentation"] == b["segmentation"]  # RLE equal, string for string
        assert (a["image_id"], a["category_id"], a["score"]) == (b["image_id"], b["category_id"], b["score"])
        assert b["instance_id"] == i


def test_polygon_results_need_and_use_the_index(tmp_path):
    dets = [{"image_id": 7, "category_id": 1, "score": 0.9, "segmentation": [[2, 2, 10, 2, 10, 8, 2, 8]]}]
    p = tmp_path / "res.json"
    p.write_text(json.dumps(dets))
    with pytest.raises(InputError, match="image_id 7"):
        read_results_json(p)
    idx = tmp_path / "index.json"
    idx.write_text(json.dumps({"images": [{"id": 7, "file_name": "a.png", "height": 12, "width": 16}]}))
    rows = read_results_json(p, load_image_index(idx))
    m = rle.decode(row_to_result(rows[0])["segmentation"])
    assert m.shape == (12, 16) and m[5, 5] and not m[0, 0]


def test_image_index_formats_and_missing_index_message(tmp_path):
    csv_path = tmp_path / "index.csv"
    csv_path.write_text("image_id,path\n1,a.png\n2,sub/b.jpg\n")
    idx = load_image_index(csv_path)
    assert idx[2].file_name == "sub/b.jpg" and idx[1].height is None
    import pyarrow as pa

    pq.write_table(pa.table({"image_id": [3], "path": ["c.png"], "height": [5], "width": [6]}), tmp_path / "i.parquet")
    assert load_image_index(tmp_path / "i.parquet")[3].width == 6
    with pytest.raises(InputError, match="image_id,path"):
        load_image_index(None)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"annotations": []}))
    with pytest.raises(InputError, match="no 'images' list"):
        load_image_index(bad)


def test_malformed_results_name_the_file_and_entry(tmp_path):
    p = tmp_path / "res.json"
    p.write_text("[{\"image_id\": 1")
    with pytest.raises(InputError, match="res.json is not valid JSON"):
        read_results_json(p)
    p.write_text(json.dumps([{"image_id": 1, "category_id": 1, "score": 1, "segmentation": {"size": [2, 2], "counts": [1, 2]}}]))
    with pytest.raises(InputError, match=r"res.json entry 0: segmentation.counts \(uncompressed RLE\) covers 3 pixels, not 2x2"):
        read_results_json(p)


def test_streamed_results_equal_whole_file_parse(synthetic_small, tmp_path):
    from bpr_core.formats import iter_json_array, iter_results_json

    src = synthetic_small / "coarse.json"
    assert list(iter_results_json(src)) == read_results_json(src)
    import io

    text = src.read_text()
    for chunk in (1, 13, 4096):
        assert list(iter_json_array(io.StringIO(text), "t", chunk_size=chunk)) == json.loads(text)
    for bad, msg in (("[{\"a\": 1}", "not closed"), ("[1 2]", "expected ','"), ("", "empty")):
        with pytest.raises(InputError, match=msg):
            list(iter_json_array(io.StringIO(bad), "t", chunk_size=2))


def test_reader_stops_at_the_first_bad_character_without_reading_on(tmp_path):
    """Bounded memory, fail fast: NUL padding after one entry is reported after reading about one
    chunk, not the whole (here 64 MiB) stream."""
    import io

    from bpr_core.formats import iter_json_array

    class Counting(io.StringIO):
        read_chars = 0

        def read(self, n=-1):
            data = super().read(n)
            Counting.read_chars += len(data)
            return data

    text = '[{"a": 1},' + "\x00" * (64 << 20)
    with pytest.raises(InputError, match=r"^t is not valid JSON at character 10 \(entry 1\): Expecting value$"):
        list(iter_json_array(Counting(text), "t", chunk_size=1 << 16))
    assert Counting.read_chars <= 2 << 16


def test_one_long_entry_is_read_in_linear_work(monkeypatch):
    """An entry far longer than a chunk is parsed a bounded number of times (the buffer doubles),
    not once per chunk: count the decoder's calls."""
    import io
    import json as _json

    from bpr_core import formats

    entry = {"segmentation": [[1.5] * 200_000]}
    text = "[" + _json.dumps(entry) + "]"
    calls = []
    real = _json.JSONDecoder.raw_decode

    class Counted(_json.JSONDecoder):
        def raw_decode(self, s, idx=0):
            calls.append(idx)
            return real(self, s, idx)

    monkeypatch.setattr(formats.json, "JSONDecoder", Counted)
    assert list(formats.iter_json_array(io.StringIO(text), "t", chunk_size=1024)) == [entry]
    assert len(text) // 1024 > 900 and len(calls) <= 12  # ~log2(text / chunk) + a few, not one per chunk (~970)


def test_gzip_index_and_strict_record_errors(tmp_path):
    import gzip

    from bpr_core.formats import read_image_index

    p = tmp_path / "index.json.gz"
    p.write_bytes(gzip.compress(b"\xef\xbb\xbf" + json.dumps({"images": [{"id": 1, "file_name": "a.png"}]}).encode()))
    assert load_image_index(p)[1].file_name == "a.png"
    dup = tmp_path / "dup.csv"
    dup.write_text("\ufeffimage_id,path\n1,a.png\n1,b.png\n2,c.png\n")  # BOM, and image 1 listed twice
    index = read_image_index(dup)
    assert list(index.records) == [2]
    assert index.invalid == {1: f"image_id 1 appears more than once in the image index {dup} (row 0 and row 1)"}
    with pytest.raises(InputError, match="appears more than once"):
        load_image_index(dup)
    res = tmp_path / "res.json"
    res.write_text(json.dumps([{"image_id": 1, "score": 0.5, "segmentation": {"size": [2, 2], "counts": [4]}}]))
    with pytest.raises(InputError, match=f"^{res} entry 0: missing category_id$"):
        read_results_json(res)


def test_plain_rle_fast_path_reads_entries_exactly_as_the_general_path(monkeypatch):
    """result_to_row takes common entries on a fast path; every entry, accepted or refused, reads
    the same with the fast path switched off (the general, field-by-field checks)."""
    from bpr_core import formats

    rle = {"size": [8, 8], "counts": "b04400000>"}
    base = {"image_id": 3, "category_id": 1, "score": 0.5, "segmentation": rle}
    variants = [base, dict(base, score=1), dict(base, score=True), dict(base, score=float("nan")), dict(base, score=None),
                dict(base, score=2 ** 70), {k: v for k, v in base.items() if k != "score"}, dict(base, image_id=3.0),
                dict(base, image_id=True), dict(base, image_id=2 ** 64), dict(base, category_id="1"), dict(base, instance_id=7),
                dict(base, segmentation={"size": [8, 8], "counts": "b04\u00e9400000>"}),
                dict(base, segmentation={"size": [0, 8], "counts": "b04400000>"}),
                dict(base, segmentation={"size": [8.0, 8], "counts": "b04400000>"}),
                dict(base, segmentation={"size": [8, 8], "counts": "b04400000>", "extra": 1}),
                dict(base, segmentation={"size": [8, 8, 1], "counts": "b04400000>"}),
                dict(base, segmentation={"size": [8, 8], "counts": [64]}), dict(base, bbox=[1, 2, 3, 4]),
                dict(base, bbox=[1, 2, float("nan"), 4]), dict(base, track=5), ["not", "a", "dict"]]

    def read(det, default_score):
        try:
            return formats.result_to_row(det, 9, None, "f", default_score=default_score)
        except formats.RecordError as e:
            return f"RecordError: {e}"

    for default_score in (None, 1.0):
        fast = [read(d, default_score) for d in variants]
        with monkeypatch.context() as m:
            m.setattr(formats, "_plain_rle_entry", lambda *a: None)
            general = [read(d, default_score) for d in variants]
        assert fast == general
        assert [type(r["score"]) for r in fast if isinstance(r, dict)] == [float] * sum(isinstance(r, dict) for r in fast)
    assert sum(isinstance(r, dict) for r in fast) >= 8 and sum(isinstance(r, str) for r in fast) >= 8
    assert formats._plain_rle_entry(base, 0, None) is not None  # the fast path was taken
