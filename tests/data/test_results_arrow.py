"""The columnar results-JSON reader gives exactly the per-entry reader's rows (the definition), for
every kind of entry, key order, layout and chunk size, and fails exactly as it does."""

import gzip
import io
import json
import math
import random
import struct

import pytest

from bpr_core.formats import InputError, iter_results_json
from bpr_core.results_arrow import iter_results_batches

RLE_ALPHABET = "".join(chr(c) for c in range(48, 112))  # pycocotools' compressed counts


def _counts(rng: random.Random) -> str:
    return "".join(rng.choice(RLE_ALPHABET) for _ in range(rng.randint(1, 40)))


def _float32(rng: random.Random) -> float:
    """A box coordinate as detectron2 writes it: a float32 value, as a Python float."""
    return struct.unpack("f", struct.pack("f", rng.uniform(0, 1000)))[0]


ODD_NUMBERS = ["-0", "0", "-0.0", "0.0", "3", "2.50", "1E5", "1e-5", "1e20", "1e400", "-1e400", "1e-400", "12345678901234567890123",
               "0.1000000000000000055511151231257827", "123456789012345678", "1234567890123456789", "NaN", "Infinity",
               "true", "null", '"7"', "1.5e300", "0.00011", "9999999999999998.0", "7.0e0", "1" + "0" * 400]


def _number(rng: random.Random, odd: float) -> str:
    r = rng.random()
    if r < odd:
        return rng.choice(ODD_NUMBERS)
    if r < odd + 0.2:
        return str(rng.randint(-5, 2000))
    return json.dumps(_float32(rng) if rng.random() < 0.7 else rng.uniform(-1e3, 1e3))


ORDERS = [("image_id", "category_id", "segmentation", "score"),  # ours, pycocotools-style
          ("image_id", "category_id", "bbox", "score", "segmentation"),  # detectron2
          ("image_id", "bbox", "score", "category_id", "segmentation"),  # mmdetection
          ("score", "segmentation", "bbox", "category_id", "image_id")]


def _entry(rng: random.Random, odd: float) -> str:
    """One results entry as raw JSON text: mostly plain entries as the detectors write them, with
    every kind of unusual key, value and layout at rate `odd`."""
    sep = rng.choice([", ", ",", " , ", ",\n  ", ",\t"]) if rng.random() < odd else ", "
    colon = rng.choice([": ", ":", " : ", ":\n "]) if rng.random() < odd else ": "
    order = list(rng.choice(ORDERS))
    inner = ["size", "counts"] if rng.random() > odd else ["counts", "size"]
    counts = _counts(rng)
    values = {
        "image_id": str(rng.randint(0, 50)), "category_id": str(rng.randint(1, 90)),
        "score": _number(rng, odd) if rng.random() < odd else json.dumps(rng.random()),
        "bbox": "[" + sep.join(_number(rng, odd) for _ in range(4)) + "]",
        "size": f"[{rng.randint(1, 600)}{sep}{rng.randint(1, 600)}]", "counts": json.dumps(counts),
    }
    if rng.random() < odd:  # an unusual value of an interpreted key
        key = rng.choice(["image_id", "category_id", "score", "size", "counts", "bbox"])
        values[key] = rng.choice([
            "1.0", '"3"', "null", "-4", "true", "12345678901234567890", "9999999999999999999", "-999999999999999999",
            "[1, 2]", "[9999999999999999999, 8]", "[0, 5]", "[8]", "[8, 8, 8]",
            '"b0\\\\4"', '"b0\\"4"', '"a b"', '"\\u0030\\u0031"', '"caf\u00e9"', "[1, 2, 3]", "[1, 2, 3, 4, 5]", '[1, "2", 3, 4]',
            "[NaN, 1, 2, 3]", "{}", "[[1, 2]]"])
    if rng.random() < odd:  # a polygon, an uncompressed RLE, or no segmentation
        values["segmentation"] = rng.choice(["[[1, 1, 5, 1, 5, 5]]", '{"size": [2, 2], "counts": [1, 2, 1]}', "null"])
    else:
        values["segmentation"] = "{" + sep.join(f'"{k}"{colon}{values[k]}' for k in inner) + "}"
    if rng.random() < odd:  # another key, a missing key, a duplicate, an instance_id
        what = rng.choice(["extra", "missing", "duplicate", "instance_id", "nested", "tricky_string", "null_bbox"])
        if what == "extra":
            order.insert(rng.randint(0, len(order)), "track")
            values["track"] = rng.choice(["3", '"caf\u00e9"', "[1, 2]", '{"a": null}', "null", "1.5"])
        elif what == "missing":
            order.remove(rng.choice(order))
        elif what == "duplicate":
            order.append(rng.choice(order))
        elif what == "instance_id":
            order.append("instance_id")
            values["instance_id"] = rng.choice(["5", "-1", "2.0", "null", "99999999999999999999"])
        elif what == "nested":
            order.append("parts")
            values["parts"] = '[{"a": 1}, {"b": [2]}]'
        elif what == "tricky_string":
            order.append("note")
            values["note"] = json.dumps(rng.choice(["}, {", '"image_id": 3', "a\\b", "\u2603", "]", "}\n{"]))
        else:
            if "bbox" not in order:
                order.append("bbox")
            values["bbox"] = "null"
    if rng.random() < odd / 4:  # not an object at all
        return rng.choice(["3", '"x"', "null", "[1, 2]", "[]", "{}"])
    return "{" + sep.join(f'"{k}"{colon}{values[k]}' for k in order) + "}"


def _document(rng: random.Random, n: int, odd: float) -> str:
    between = rng.choice([", ", ",", ",\n", " ,\n\t"])
    return rng.choice(["", " ", "\n"]) + "[" + rng.choice(["", "\n", " "]) + between.join(_entry(rng, odd) for _ in range(n)) \
        + rng.choice(["", "\n", " "]) + "]" + rng.choice(["", "\n", "  \n"])


def _reference(data: bytes) -> list[dict]:
    rows = []
    for i, row in enumerate(iter_results_json(io.BytesIO(data), None, name="r.json", strict=False)):
        row["position"] = i
        rows.append(row)
    return rows


def _columnar(data: bytes, chunk_bytes: int) -> tuple[list[dict], int]:
    rows, vouched = [], 0
    for table, others in iter_results_batches(lambda: io.BytesIO(data), None, "r.json", chunk_bytes=chunk_bytes):
        rows += table.to_pylist() + others
        vouched += table.num_rows
    return sorted(rows, key=lambda r: r["position"]), vouched


def _same(a: dict, b: dict) -> bool:
    """Equal field for field, types included (an int is not a float), NaN equal to NaN."""
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if type(x) is not type(y):
            return False
        if not (x == y or (isinstance(x, float) and math.isnan(x) and math.isnan(y))):
            return False
    return True


@pytest.mark.parametrize("seed,odd", [(0, 0.0), (1, 0.02), (2, 0.1), (3, 0.3), (4, 0.6)])
def test_rows_equal_the_per_entry_reader(seed, odd):
    rng = random.Random(seed)
    data = _document(rng, 400, odd).encode()
    want = _reference(data)
    assert len(want) == 400
    for chunk in (64, 1000, 1 << 20):
        got, vouched = _columnar(data, chunk)
        assert len(got) == len(want)
        bad = [(g, w) for g, w in zip(got, want) if not _same(g, w)]
        assert not bad, (chunk, bad[:2])
        if odd == 0.0:
            assert vouched == 400  # plain entries never take the slow path
        if odd <= 0.02 and chunk == 1 << 20:
            assert vouched >= 300  # the occasional odd entry does not send its chunk entry by entry


def test_detector_files_are_read_as_columns():
    """detectron2's layout (its key order, float32 boxes) and mmdetection's: all vouched for, with
    detector_fields byte for byte what the per-entry reader writes."""
    rng = random.Random(7)
    for order in ORDERS[1:3]:
        entries = []
        for i in range(300):
            d = {"image_id": i // 3, "category_id": 1 + i % 80, "score": rng.random(),
                 "bbox": [_float32(rng), _float32(rng), _float32(rng), float(rng.randint(0, 5))],
                 "segmentation": {"size": [480, 640], "counts": _counts(rng)}}
            entries.append({k: d[k] for k in order})
        data = json.dumps(entries).encode()
        got, vouched = _columnar(data, 1 << 20)
        want = _reference(data)
        assert vouched == 300
        assert all(_same(g, w) for g, w in zip(got, want))
        assert got[0]["detector_fields"] == json.dumps({"bbox": entries[0]["bbox"]}, separators=(",", ":"))


@pytest.mark.parametrize("text", [
    "", "   ", "[", "[{}", '[{"image_id": 1}', '[{"image_id": 1}] x', '[{"image_id": 1}},{"a": 2}]', '[{"a": 1} {"b": 2}]',
    '[{"a": 1},]', "[,]", '[{"a": "x\ny"}]', '[{"a": 1}]]', "{", '{"x": 1}', "[1, 2", "\x00\x00"])
def test_malformed_files_fail_as_the_per_entry_reader_does(text):
    data = text.encode()
    with pytest.raises(InputError) as want:
        _reference(data)
    for chunk in (4, 1 << 20):
        with pytest.raises(InputError) as got:
            _columnar(data, chunk)
        assert str(got.value) == str(want.value)


def test_invalid_utf8_and_late_errors_fail_the_same_way():
    rng = random.Random(11)
    good = [_entry(rng, 0.0) for _ in range(50)]
    for tail in [b'{"note": "\xff"}', b'{"a": 1} {"b": 2}', b'{"a": tru}']:
        data = b"[" + b", ".join(e.encode() for e in good) + b", " + tail + b"]"
        with pytest.raises(InputError) as want:
            _reference(data)
        with pytest.raises(InputError) as got:
            _columnar(data, 256)
        assert str(got.value) == str(want.value)


def test_gzip_bom_and_gt_style_inputs():
    rng = random.Random(5)
    data = _document(rng, 60, 0.05).encode()
    want = _reference(data)
    for variant in (gzip.compress(data), b"\xef\xbb\xbf" + data):
        got, _ = _columnar(variant, 512)
        assert all(_same(g, w) for g, w in zip(got, want)) and len(got) == len(want)
    gt = json.dumps({"images": [], "annotations": [{"image_id": 1, "category_id": 1, "id": 4,
                                                     "segmentation": {"size": [2, 2], "counts": "04"}}]}).encode()
    got, vouched = _columnar(gt, 512)
    assert vouched == 0 and all(_same(g, w) for g, w in zip(got, _reference(gt)))
    empty, _ = _columnar(b" [ ] ", 512)
    assert empty == []


def test_integers_too_large_for_a_double_are_quarantined_not_a_crash():
    """float() of such an integer raises OverflowError: the entry is quarantined with a reason."""
    big = "1" + "0" * 400
    entry = '{"image_id": 1, "category_id": 1, "score": %s, "bbox": [%s, 1, 2, 3], "segmentation": {"size": [2, 2], "counts": "04"}}'
    for score, box in ((big, "0"), ("0.5", big)):
        data = ("[" + entry % (score, box) + "]").encode()
        (row,) = _reference(data)
        assert "is not a finite number" in row["invalid"] or "of finite numbers" in row["invalid"]
        got, vouched = _columnar(data, 1 << 20)
        assert vouched == 0 and _same(got[0], row)


def test_a_corrupt_file_fails_early_without_reading_it_all():
    """One valid entry, then NUL padding: reported after the first chunks, not after the size bound."""
    entry = '{"image_id": 1, "category_id": 1, "score": 0.5, "segmentation": {"size": [4, 4], "counts": "04"}}'
    data = b"[" + entry.encode() + b", " + b"\x00" * (16 << 20)
    read = [0]

    class Counting(io.BytesIO):
        def read(self, size=-1):
            out = super().read(size)
            read[0] += len(out)
            return out

    with pytest.raises(InputError) as want:
        _reference(data)
    with pytest.raises(InputError) as got:
        for _ in iter_results_batches(lambda: Counting(data), None, "r.json", chunk_bytes=1 << 20):
            pass
    assert str(got.value) == str(want.value)
    assert read[0] <= 4 << 20
