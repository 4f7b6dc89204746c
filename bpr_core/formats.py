"""Data in and out: COCO ground truth, COCO results JSON, instance Parquet tables, image indexes.

Instances travel as one columnar record per instance (`INSTANCE_COLUMNS`): image_id, instance_id,
category_id, score and the compressed COCO RLE as counts + size. `instance_id` is the instance's
0-based position in the results file it came from (COCO results have no ids of their own), or the
`instance_id` key/column where the input carries one; with inputs of several files the identity is
(source_file, instance_id). Refined outputs add provenance columns. Every field is validated
exactly (no defaults, no rounding): a bad record raises `RecordError` naming the field, and the
refinement job quarantines it with file and position instead of failing.
All conversion to and from the ecosystem's formats happens here, once.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import rle as rle_utils


class InputError(ValueError):
    """A user input is malformed; the message names the file and the record."""


class JobFailed(RuntimeError):
    """The job cannot usefully go on (a systemic failure, e.g. most images unreadable); the message
    names the cause. The command exits non-zero with it, without a traceback."""


INSTANCE_SCHEMA = pa.schema([
    ("image_id", pa.int64()),
    ("instance_id", pa.int64()),
    ("category_id", pa.int64()),
    ("score", pa.float64()),
    ("rle_counts", pa.string()),
    ("rle_h", pa.int64()),  # int64 throughout (parts, quarantine, inputs): one schema to concatenate
    ("rle_w", pa.int64()),
])
INSTANCE_COLUMNS = INSTANCE_SCHEMA.names

PROVENANCE_SCHEMA = pa.schema([
    ("status", pa.string()),  # refined | passed_through
    ("reason", pa.string()),  # why it was passed through ("" when refined)
    ("source_file", pa.string()),
    ("position", pa.int64()),  # the instance's 0-based entry/row number in source_file
    ("detector_fields", pa.string()),  # the input entry's other keys (bbox, ...) as JSON, returned in refined.json
    ("coarse_area", pa.int64()),
    ("refined_area", pa.int64()),
    ("num_patches", pa.int64()),
    ("model_name", pa.string()),
    ("model_version", pa.string()),
    ("config_hash", pa.string()),
])
REFINED_SCHEMA = pa.schema(list(INSTANCE_SCHEMA) + list(PROVENANCE_SCHEMA))


def _read_json(path: str | Path, what: str):
    """A whole JSON document (image indexes, ground truth); plain or gzip, BOM or not."""
    try:
        with open_text(open(path, "rb"), f"{what} {path}") as f:
            return json.load(f)
    except FileNotFoundError:
        raise InputError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, EOFError, OSError) as e:
        raise InputError(f"{what} {path} is not valid JSON: {e}") from None


# --- image index ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageRecord:
    image_id: int
    file_name: str
    height: int | None = None
    width: int | None = None


class ImageTable(Mapping):
    """Usable image index entries held as arrays (ids, file names as an Arrow string array, sizes
    with 0 for unknown), a read-only mapping image_id -> ImageRecord in the index's order. Lookups
    are a binary search over the sorted ids; the refinement job's ingest uses the sorted arrays
    directly (`sorted_ids`, `sorted_file_names`), with no per-image Python objects held."""

    def __init__(self, ids, file_names, heights, widths):
        self.ids = np.asarray(ids, np.int64)
        self.file_names = pa.array(file_names, pa.string()) if not isinstance(file_names, pa.Array) else file_names
        self.heights, self.widths = np.asarray(heights, np.int64), np.asarray(widths, np.int64)
        self._order = np.argsort(self.ids, kind="stable")
        self.sorted_ids = self.ids[self._order]

    @property
    def sorted_file_names(self) -> pa.Array:
        return self.file_names.take(pa.array(self._order))

    def _find(self, image_id) -> int:
        if isinstance(image_id, bool) or not isinstance(image_id, (int, np.integer)) or not len(self.ids):
            return -1
        if not INT64_MIN <= int(image_id) <= INT64_MAX:
            return -1
        k = int(np.searchsorted(self.sorted_ids, image_id))
        return int(self._order[k]) if k < len(self.ids) and self.sorted_ids[k] == image_id else -1

    def __getitem__(self, image_id) -> ImageRecord:
        i = self._find(image_id)
        if i < 0:
            raise KeyError(image_id)
        h, w = int(self.heights[i]), int(self.widths[i])
        return ImageRecord(int(self.ids[i]), self.file_names[i].as_py(), h or None, w or None)

    def __contains__(self, image_id) -> bool:
        return self._find(image_id) >= 0

    def __iter__(self):
        return iter(self.ids.tolist())

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class ImageIndex:
    """An image index as read, entry by entry: the usable records, and the image ids whose entry is
    unusable (a duplicate id, a bad size, no file name) with the reason, so the detections on those
    images can be quarantined with it instead of the whole job failing or a silent choice."""

    records: ImageTable
    invalid: dict[int, str]
    unattributable: list[str]  # bad entries without a usable image id (no detection can refer to them)


HOW_TO_INDEX = (
    "An image index maps image_id to an image file. Use any COCO-style JSON with an 'images' list "
    "(the ground-truth file, or COCO's annotation-free image_info_*.json), or a CSV/Parquet table "
    "with columns image_id,path (optionally height,width). Example CSV:\n"
    "  image_id,path\n  1,000000000139.jpg"
)

INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1


class RecordError(ValueError):
    """One record (a detection, an index entry) is unusable; the message says which field and why."""


def _short(v) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def exact_int(v, field: str, minimum: int | None = None) -> int:
    """An integer field, exactly: ints, and floats with an integral value (JSON 3.0); never bools,
    strings or 1.7. Must fit int64 (and be >= minimum)."""
    if type(v) is int and INT64_MIN <= v <= INT64_MAX and (minimum is None or v >= minimum):
        return v  # the common case, first
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise RecordError(f"{field} {_short(v)} is not an integer" if v is not None else f"{field} is null")
    if isinstance(v, float):
        if not (math.isfinite(v) and v.is_integer()):
            raise RecordError(f"{field} {_short(v)} is not an integer")
        v = int(v)
    if not INT64_MIN <= v <= INT64_MAX:
        raise RecordError(f"{field} {v} is outside the 64-bit integer range")
    if minimum is not None and v < minimum:
        raise RecordError(f"{field} {v} is below {minimum}")
    return int(v)


def finite_number(v, field: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise RecordError(f"{field} {_short(v)} is not a number" if v is not None else f"{field} is null")
    f = _as_float(v)
    if not math.isfinite(f):
        raise RecordError(f"{field} {_short(v)} is not a finite number")
    return f


def _as_float(v: int | float) -> float:
    """float(v); inf for an integer too large for a double (float() raises OverflowError there)."""
    try:
        return float(v)
    except OverflowError:
        return math.inf


def _index_entry(entry, id_key: str, name_key: str) -> ImageRecord:
    if not isinstance(entry, dict):
        raise RecordError(f"expected an object, got {type(entry).__name__}")
    for k in (id_key, name_key):
        if entry.get(k) in (None, ""):
            raise RecordError(f"missing {k}")
    image_id = exact_int(entry[id_key], id_key)
    name = entry[name_key]
    if not isinstance(name, str):
        raise RecordError(f"{name_key} {_short(name)} is not a string")
    size = [None if entry.get(k) in (None, "") else exact_int(entry[k], k, minimum=1) for k in ("height", "width")]
    if (size[0] is None) != (size[1] is None):
        raise RecordError("height and width go together")
    return ImageRecord(image_id, name, *size)


def read_image_index(path: str | Path | None) -> ImageIndex:
    """Read an image index (COCO-style JSON `images`, or CSV/Parquet image_id,path[,height,width])
    entry by entry. A malformed file raises InputError; a bad entry is recorded (ImageIndex)."""
    if path is None:
        raise InputError("no image index given. " + HOW_TO_INDEX)
    path = Path(path)
    suffix = ".json" if path.name.lower().endswith(".json.gz") else path.suffix.lower()
    fast, rest = None, None  # Parquet: the rows checked as columns; the row numbers of the others
    if suffix == ".json":
        data = _read_json(path, "image index")
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise InputError(f"image index {path} has no 'images' list. " + HOW_TO_INDEX)
        entries, id_key, name_key, label = data["images"], "id", "file_name", "images[{}]"
        data = None  # the rest of the file (a ground-truth file's annotations) is not needed
    elif suffix in (".csv", ".parquet", ".pq"):
        if not path.is_file():
            raise InputError(f"image index not found: {path}")
        if suffix == ".csv":
            with open(path, newline="", encoding="utf-8-sig") as f:
                entries = list(csv.DictReader(f))
            for e in entries:  # CSV is text: numbers are parsed here, exactly
                for k in ("image_id", "height", "width"):
                    if isinstance(e.get(k), str) and e[k].strip().lstrip("-").isdigit():
                        e[k] = int(e[k])
            if entries and not {"image_id", "path"} <= set(entries[0]):
                raise InputError(f"image index {path} needs columns image_id and path. " + HOW_TO_INDEX)
        else:
            table = pq.read_table(path)
            if table.num_rows and not {"image_id", "path"} <= set(table.column_names):
                raise InputError(f"image index {path} needs columns image_id and path. " + HOW_TO_INDEX)
            fast, rest = _columnar_index(table)
            entries = table.take(pa.array(rest, pa.int64())).to_pylist() if len(rest) < table.num_rows else table.to_pylist()
            del table
        id_key, name_key, label = "image_id", "path", "row {}"
    else:
        raise InputError(f"image index {path}: unsupported type {suffix!r}. " + HOW_TO_INDEX)
    # One pass over the entries: the common well-formed entry is taken as is; any other goes through
    # _index_entry, which gives the exact reason. Duplicates are found over the arrays afterwards.
    ids, names, heights, widths, at = [], [], [], [], []
    invalid: dict[int, str] = {}
    unattributable: list[str] = []
    for i, entry in zip(rest if rest is not None else range(len(entries)), entries):
        if type(entry) is dict:
            image_id, name, h, w = entry.get(id_key), entry.get(name_key), entry.get("height"), entry.get("width")
            if type(image_id) is int and type(name) is str and name and INT64_MIN <= image_id <= INT64_MAX and (
                    (type(h) is int and type(w) is int and 1 <= h <= INT64_MAX and 1 <= w <= INT64_MAX)
                    or (h is None and w is None)):
                ids.append(image_id), names.append(name), heights.append(h or 0), widths.append(w or 0), at.append(int(i))
                continue
        try:
            rec = _index_entry(entry, id_key, name_key)
        except RecordError as e:
            where = f"image index {path} {label.format(i)}"
            try:
                bad_id = exact_int(entry.get(id_key), id_key) if isinstance(entry, dict) else None
            except RecordError:
                bad_id = None
            if bad_id is None:
                unattributable.append(f"{where}: {e}")
            else:
                invalid.setdefault(bad_id, f"{where}: {e}")
            continue
        ids.append(rec.image_id), names.append(rec.file_name), heights.append(rec.height or 0), widths.append(rec.width or 0)
        at.append(i)
    entries = None  # the parsed entries are no longer needed: the arrays below are built without them
    id_arr, at_arr = np.asarray(ids, np.int64), np.asarray(at, np.int64)
    del ids
    names = pa.array(names, pa.string())
    heights, widths = np.asarray(heights, np.int64), np.asarray(widths, np.int64)
    if fast is not None and len(fast[0]):  # the columnar rows, merged back in the index's order
        order = np.argsort(np.concatenate([fast[4], at_arr]), kind="stable")
        id_arr, at_arr = np.concatenate([fast[0], id_arr])[order], np.concatenate([fast[4], at_arr])[order]
        names = pa.concat_arrays([fast[1], names]).take(pa.array(order))
        heights, widths = np.concatenate([fast[2], heights])[order], np.concatenate([fast[3], widths])[order]
    order = np.argsort(id_arr, kind="stable")
    sorted_ids = id_arr[order]
    repeated = np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1])
    for image_id in np.unique(sorted_ids[repeated]).tolist():  # first and last of the entries with that id
        where = at_arr[order[np.searchsorted(sorted_ids, image_id, "left"):np.searchsorted(sorted_ids, image_id, "right")]]
        invalid[image_id] = (f"image_id {image_id} appears more than once in the image index {path} "
                             f"({label.format(int(where.min()))} and {label.format(int(where.max()))})")
    keep = ~np.isin(id_arr, np.asarray(sorted(invalid), np.int64)) if invalid else np.ones(len(id_arr), bool)
    records = ImageTable(id_arr[keep], names.filter(pa.array(keep)), heights[keep], widths[keep])
    return ImageIndex(records, invalid, unattributable)


def _columnar_index(table: pa.Table) -> tuple[tuple | None, np.ndarray]:
    """A Parquet image index checked column by column: ((ids, file names, heights, widths, row
    numbers) of the rows that are certainly well-formed, the row numbers of the others), or (None,
    every row) when a column's type needs the entry-by-entry reader. The other rows go through that
    reader, which gives the exact reason, so this only has to be sure about the rows it accepts."""
    import pyarrow.compute as pc

    n = table.num_rows
    every = np.arange(n, dtype=np.int64)
    names = set(table.column_names)
    sized = {"height", "width"} <= names
    if not n or ({"height", "width"} & names and not sized):
        return None, every
    cols = {k: table[k].combine_chunks() for k in ("image_id", "path", "height", "width") if k in names}
    if not (pa.types.is_integer(cols["image_id"].type) and pa.types.is_string(cols["path"].type)
            and (not sized or (pa.types.is_integer(cols["height"].type) and pa.types.is_integer(cols["width"].type)))):
        return None, every

    def ints(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:  # (valid, values as int64)
        valid = arr.is_valid().to_numpy(zero_copy_only=False)
        if arr.type == pa.uint64():
            valid &= pc.fill_null(pc.less_equal(arr, pa.scalar(INT64_MAX, pa.uint64())), False).to_numpy(zero_copy_only=False)
            arr = pc.if_else(pa.array(valid), arr, pa.scalar(0, arr.type))
        return valid, pc.fill_null(arr, 0).cast(pa.int64()).to_numpy(zero_copy_only=False)

    ok, ids = ints(cols["image_id"])
    ok &= pc.fill_null(pc.greater(pc.utf8_length(cols["path"]), 0), False).to_numpy(zero_copy_only=False)
    heights = widths = np.zeros(n, np.int64)
    if sized:
        (hv, heights), (wv, widths) = ints(cols["height"]), ints(cols["width"])
        hnull, wnull = cols["height"].is_null().to_numpy(zero_copy_only=False), cols["width"].is_null().to_numpy(zero_copy_only=False)
        ok &= (hv & wv & (heights >= 1) & (widths >= 1)) | (hnull & wnull)
    keep = pa.array(ok)
    return (ids[ok], cols["path"].filter(keep), heights[ok], widths[ok], every[ok]), every[~ok]


def load_image_index(path: str | Path | None) -> "Mapping[int, ImageRecord]":
    """An image index that must be entirely valid (training, evaluation, benchmarks): the first bad
    entry raises InputError. The refinement job reads it with `read_image_index` instead and
    quarantines the detections on a bad entry's image."""
    index = read_image_index(path)
    problems = list(index.invalid.values()) + index.unattributable
    if problems:
        raise InputError(problems[0] + (f" (and {len(problems) - 1} more bad entries)" if len(problems) > 1 else ""))
    return index.records


# --- instances -------------------------------------------------------------------------------

# Required keys of one COCO results entry. A GT-style file's annotations have no score (the format
# has none) and count as 1.0; in a results list a missing score is an error, never a default.
REQUIRED_RESULT_KEYS = ("image_id", "category_id", "segmentation", "score")


def _segmentation(seg, image_id: int, sizes: dict[int, ImageRecord] | None) -> tuple[str, int, int]:
    """A COCO segmentation (RLE object, or polygon list) -> (compressed counts, h, w)."""
    if isinstance(seg, dict):
        if "size" not in seg or "counts" not in seg:
            raise RecordError("segmentation is an object without 'size' and 'counts' (expected COCO RLE)")
        size = seg["size"]
        if not isinstance(size, (list, tuple)) or len(size) != 2:
            raise RecordError(f"segmentation.size {_short(size)} is not [height, width]")
        h, w = exact_int(size[0], "segmentation.size[0]", minimum=1), exact_int(size[1], "segmentation.size[1]", minimum=1)
        counts = seg["counts"]
        if isinstance(counts, list):
            if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
                raise RecordError("segmentation.counts (uncompressed RLE) must be non-negative integers")
            if sum(counts) != h * w:
                raise RecordError(f"segmentation.counts (uncompressed RLE) covers {sum(counts)} pixels, not {h}x{w}")
        elif not isinstance(counts, str):
            raise RecordError(f"segmentation.counts {_short(counts)} is neither an RLE string nor a list")
    elif isinstance(seg, list):
        if not seg:
            raise RecordError("segmentation is an empty polygon list")
        for k, poly in enumerate(seg):
            if not isinstance(poly, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                      and math.isfinite(v) for v in poly):
                raise RecordError(f"segmentation polygon {k} is not a list of finite numbers")
            if len(poly) < 6 or len(poly) % 2:
                raise RecordError(f"segmentation polygon {k} has {len(poly)} numbers; a polygon needs x,y pairs "
                                  "for at least 3 points (6 or more, even)")
        rec = (sizes or {}).get(image_id)
        if rec is None or rec.height is None:
            raise RecordError(f"polygon segmentation needs the image size; image_id {image_id} has none in the image index")
        h, w = rec.height, rec.width
    else:
        raise RecordError(f"segmentation {_short(seg)} is neither a COCO RLE object nor a list of polygons"
                          if seg is not None else "segmentation is null")
    try:
        r = rle_utils.segmentation_to_rle(seg, h, w)
    except Exception as e:
        raise RecordError(f"invalid segmentation ({e})") from None
    return r["counts"], h, w


def result_to_row(det: dict, position: int, sizes: dict[int, ImageRecord] | None, where: str,
                  default_score: float | None = None) -> dict:
    """One COCO results entry -> one instance row, validated field by field (RecordError names the
    field). `position` is the entry's 0-based place in its file: the instance_id unless the entry
    carries one. Polygons need the image size from `sizes`."""
    row = _plain_rle_entry(det, position, default_score)
    if row is not None:
        return row
    if not isinstance(det, dict):
        raise RecordError(f"expected an object, got {type(det).__name__}")
    missing = [k for k in REQUIRED_RESULT_KEYS if k not in det and not (k == "score" and default_score is not None)]
    if missing:
        raise RecordError(f"missing {', '.join(missing)}")
    image_id = exact_int(det["image_id"], "image_id")
    category_id = exact_int(det["category_id"], "category_id")
    score = finite_number(det.get("score", default_score), "score")
    iid = exact_int(det["instance_id"], "instance_id", minimum=0) if "instance_id" in det else position
    counts, h, w = _segmentation(det["segmentation"], image_id, sizes)
    return {"image_id": image_id, "instance_id": iid, "category_id": category_id, "score": score,
            "rle_counts": counts, "rle_h": h, "rle_w": w, "detector_fields": detector_fields(det)}


def _plain_rle_entry(det, position: int, default_score: float | None) -> dict | None:
    """The common entry, read without the general checks: int ids in int64, a finite float or int
    score, no instance_id, and a compressed RLE with an ASCII string and int sizes >= 1. Gives what
    the general path gives for it; None for anything else (the general path then decides, with
    the exact reason)."""
    if type(det) is not dict or "instance_id" in det:
        return None
    image_id, category_id, seg = det.get("image_id"), det.get("category_id"), det.get("segmentation")
    score = det["score"] if "score" in det else default_score
    if type(image_id) is not int or type(category_id) is not int or type(seg) is not dict or len(seg) != 2:
        return None
    if type(score) is int:
        score = _as_float(score)
        if not math.isfinite(score):
            return None
    elif type(score) is not float or not math.isfinite(score):
        return None
    counts, size = seg.get("counts"), seg.get("size")
    if type(counts) is not str or not counts.isascii() or type(size) is not list or len(size) != 2:
        return None
    h, w = size
    if type(h) is not int or type(w) is not int or not (1 <= h <= INT64_MAX and 1 <= w <= INT64_MAX) \
            or not (INT64_MIN <= image_id <= INT64_MAX and INT64_MIN <= category_id <= INT64_MAX):
        return None
    plain = len(det) == 3 + ("score" in det)  # no key but the interpreted ones: no detector fields
    return {"image_id": image_id, "instance_id": position, "category_id": category_id, "score": score,
            "rle_counts": counts, "rle_h": h, "rle_w": w, "detector_fields": None if plain else detector_fields(det)}


# Keys of a results entry that bpr reads; every other key (the detector's bbox, track ids, ...)
# travels unchanged as `detector_fields` and comes back in refined.json.
INTERPRETED_KEYS = ("image_id", "category_id", "segmentation", "score", "instance_id")


def detector_fields(det: dict) -> str | None:
    """The entry's other keys as compact JSON (None when there are none). A `bbox` must be
    [x, y, width, height] of finite numbers; NaN or Infinity anywhere is refused, since the output
    must stay standard JSON."""
    extra = {k: v for k, v in det.items() if k not in INTERPRETED_KEYS}
    if not extra:
        return None
    box = extra.get("bbox")
    if box is not None and not (isinstance(box, list) and len(box) == 4 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(_as_float(v)) for v in box)):
        raise RecordError(f"bbox {_short(box)} is not [x, y, width, height] of finite numbers")
    try:
        return json.dumps(extra, separators=(",", ":"), allow_nan=False)
    except ValueError:
        raise RecordError(f"a detector field holds NaN or Infinity ({', '.join(sorted(extra))})") from None


def table_row(row: dict) -> dict:
    """One instance-table (Parquet) row, validated like a results entry."""
    out = {"image_id": exact_int(row.get("image_id"), "image_id"),
           "instance_id": exact_int(row.get("instance_id"), "instance_id", minimum=0),
           "category_id": exact_int(row.get("category_id"), "category_id"),
           "score": finite_number(row.get("score"), "score")}
    counts = row.get("rle_counts")
    if not isinstance(counts, str):
        raise RecordError("rle_counts is null" if counts is None else f"rle_counts {_short(counts)} is not a string")
    out.update(rle_counts=counts, rle_h=exact_int(row.get("rle_h"), "rle_h", minimum=1),
               rle_w=exact_int(row.get("rle_w"), "rle_w", minimum=1))
    return out


def invalid_row(position: int, reason: str, raw=None) -> dict:
    """A record that could not be read, kept as an instance row (fields it had that are valid are
    kept for identification) with the reason, so it is quarantined, never dropped."""
    raw = raw if isinstance(raw, dict) else {}
    row = {k: None for k in INSTANCE_COLUMNS}
    for k in ("image_id", "category_id"):
        try:
            row[k] = exact_int(raw.get(k), k)
        except RecordError:
            pass
    try:
        row["instance_id"] = exact_int(raw["instance_id"], "instance_id", minimum=0) if "instance_id" in raw else position
    except RecordError:
        row["instance_id"] = None
    row["invalid"] = reason
    return row


# Longest text one detection may take: far above any real entry (a polygon of 100k points is
# ~2 MB), so a corrupt file (an unclosed string, NUL padding inside an element) fails at a bound.
MAX_ENTRY_CHARS = 64 << 20
# A GT-style object (not a list) is parsed whole; larger files must be given as a results list.
MAX_OBJECT_CHARS = 1 << 30


def open_text(raw, what: str):
    """A binary stream -> a UTF-8 text stream; gzip is decompressed, a UTF-8 BOM skipped, and any
    other encoding or compression is named instead of surfacing as a parse error."""
    return io.TextIOWrapper(open_binary(raw, what), encoding="utf-8")


def open_binary(raw, what: str):
    """A binary stream -> the bytes of its UTF-8 text (`open_text` without the decoding): gzip
    decompressed, a UTF-8 BOM skipped, any other encoding or compression named."""
    import gzip

    head = raw.read(4)
    stream = io.BufferedReader(_Prefixed(head, raw), 1 << 20)  # few, large reads from any source
    if head[:2] == b"\x1f\x8b":
        stream = io.BufferedReader(gzip.GzipFile(fileobj=stream, mode="rb"), 1 << 20)
        head = stream.peek(4)[:4]
    for magic, name in ((b"\xff\xfe", "UTF-16/32 (little-endian BOM)"), (b"\xfe\xff", "UTF-16 (big-endian BOM)"),
                        (b"BZh", "a bzip2 archive"), (b"\x28\xb5\x2f\xfd", "a zstd archive"), (b"PK\x03\x04", "a zip archive")):
        if head.startswith(magic):
            raise InputError(f"{what} is {name}; bpr reads UTF-8 JSON, plain or gzip-compressed")
    if head.startswith(b"\xef\xbb\xbf"):  # skipped here: the utf-8-sig codec decodes in Python, 8 KB at a time
        stream.read(3)
    return stream


class _Prefixed(io.RawIOBase):
    """Bytes already read from a stream, then the rest of the stream."""

    def __init__(self, head: bytes, raw):
        self._head, self._raw = head, raw

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self._head:
            n = min(len(b), len(self._head))
            b[:n], self._head = self._head[:n], self._head[n:]
            return n
        data = self._raw.read(len(b))
        b[: len(data)] = data
        return len(data)


def _may_be_cut(e: json.JSONDecodeError, buf: str) -> bool:
    """Could this parse error be the buffer's end cutting an element (so more input may fix it)?
    Anything else is a malformed byte, reported at once, however much of the file is left."""
    return e.msg.startswith("Unterminated string") or e.pos >= len(buf) - 16


def iter_json_array(f, what: str, chunk_size: int = 1 << 20, info: dict | None = None) -> Iterator:
    """Stream the elements of a top-level JSON array from a text file object, one at a time, in
    bounded memory (a chunk plus the current element) and linear time, failing at the first
    malformed character with its offset. A GT-style object with an "annotations" list is parsed
    whole (`info["gt_style"]` is set)."""
    dec = json.JSONDecoder()
    buf, pos, eof, base, n = "", 0, False, 0, 0

    def fill(size: int = chunk_size) -> bool:
        nonlocal buf, pos, eof, base
        if eof:
            return False
        data = f.read(size)
        if not data:
            eof = True
            return False
        base += pos
        buf, pos = buf[pos:] + data, 0
        return True

    def skip_ws():
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                pos += 1
            if pos < len(buf) or not fill():
                return

    def bad(msg: str, at: int):
        return InputError(f"{what} is not valid JSON at character {base + at} (entry {n}): {msg}")

    skip_ws()
    if pos >= len(buf):
        raise InputError(f"{what} is empty, not a JSON list")
    if buf[pos] == "{":  # a COCO GT-style dict: parse whole, up to a bound
        parts, total = [buf[pos:]], len(buf) - pos
        while chunk := f.read(chunk_size):
            parts.append(chunk)
            total += len(chunk)
            if total > MAX_OBJECT_CHARS:
                raise InputError(f"{what} is a JSON object over {MAX_OBJECT_CHARS >> 20} MiB; give detections as a JSON list")
        try:
            data = json.loads("".join(parts))
        except json.JSONDecodeError as e:
            raise InputError(f"{what} is not valid JSON: {e}") from None
        if isinstance(data, dict) and isinstance(data.get("annotations"), list):
            if info is not None:
                info["gt_style"] = True
            yield from data["annotations"]
            return
        raise InputError(f"{what}: expected a JSON list of detections, got {type(data).__name__}")
    if buf[pos] != "[":
        raise bad("expected '[' at the start", pos)
    pos += 1
    while True:
        skip_ws()
        if pos >= len(buf):
            raise InputError(f"{what} is not valid JSON: the list is not closed (truncated file?)")
        if buf[pos] == "]":
            pos += 1
            skip_ws()
            if pos < len(buf):
                raise bad("text after the closing ']'", pos)
            return
        if n:
            if buf[pos] != ",":
                raise bad(f"expected ',' between elements, found {buf[pos]!r}", pos)
            pos += 1
            skip_ws()
        while True:
            try:
                obj, end = dec.raw_decode(buf, pos)
                # an element ending exactly at the buffer's end may be a cut number: read on
                if end < len(buf) or eof:
                    break
            except json.JSONDecodeError as e:
                if eof or not _may_be_cut(e, buf):
                    raise bad(e.msg, e.pos) from None
            if len(buf) - pos > MAX_ENTRY_CHARS:
                raise bad(f"an element longer than {MAX_ENTRY_CHARS >> 20} MiB (corrupt file?)", pos)
            # read at least as much again as the element so far: each retry re-parses it, and
            # doubling keeps the total parse work linear in its length
            fill(max(chunk_size, len(buf) - pos))
        pos = end
        n += 1
        yield obj


def iter_results_json(source, sizes: dict[int, ImageRecord] | None = None, name: str | None = None,
                      strict: bool = True) -> Iterator[dict]:
    """Stream instance rows from a COCO results JSON (a path, or a binary or text file object;
    plain or gzip) without loading it whole. A malformed file raises InputError. A bad entry raises
    InputError naming file, entry and field when `strict`, else comes out as `invalid_row` (the
    refinement job quarantines it and goes on)."""
    path = name or (str(source) if not hasattr(source, "read") else "<stream>")
    what = f"results file {path}"
    if hasattr(source, "read"):
        f = source if isinstance(source, io.TextIOBase) else open_text(source, what)
    else:
        try:
            f = open_text(open(source, "rb"), what)
        except FileNotFoundError:
            raise InputError(f"results file not found: {path}") from None
    info: dict = {}
    with f:
        try:
            for i, d in enumerate(iter_json_array(f, what, info=info)):
                try:
                    yield result_to_row(d, i, sizes, path, default_score=1.0 if info.get("gt_style") else None)
                except RecordError as e:
                    reason = f"{path} entry {i}: {e}"
                    if strict:
                        raise InputError(reason) from None
                    yield invalid_row(i, reason, d)
        except UnicodeDecodeError as e:
            raise InputError(f"{what} is not valid UTF-8 ({e.reason} at byte {e.start} of a chunk)") from None
        except (EOFError, OSError) as e:  # a truncated or corrupt gzip stream
            raise InputError(f"{what} cannot be read: {e}") from None


def read_results_json(path: str | Path, sizes: dict[int, ImageRecord] | None = None) -> list[dict]:
    """COCO results JSON (as detectron2/mmdet write it; a GT-style file works too) -> instance rows."""
    return list(iter_results_json(path, sizes))


def read_instances(path: str | Path, sizes: dict[int, ImageRecord] | None = None) -> list[dict]:
    """Instances from a COCO results JSON or an instance Parquet file/dataset."""
    p = Path(path)
    if p.suffix.lower() == ".json":
        return read_results_json(p, sizes)
    if not p.exists():
        raise InputError(f"instances not found: {p}")
    table = pq.read_table(p)
    missing = set(INSTANCE_COLUMNS) - set(table.column_names)
    if missing:
        raise InputError(f"instance table {p} lacks columns {sorted(missing)}")
    return table.select(INSTANCE_COLUMNS).to_pylist()


def rows_to_table(rows: list[dict], schema: pa.Schema = INSTANCE_SCHEMA) -> pa.Table:
    return pa.Table.from_pylist([{k: r[k] for k in schema.names} for r in rows], schema=schema)


def write_instances_parquet(rows: list[dict], path: str | Path, schema: pa.Schema = INSTANCE_SCHEMA) -> None:
    pq.write_table(rows_to_table(rows, schema), str(path))


def row_to_result(row: dict, with_source: bool = False) -> dict:
    """Instance row -> COCO results entry (drop-in for COCOeval); keeps instance_id for matching,
    and the source file too when `with_source` (inputs of several files, each numbering its own
    instances: there (source_file, instance_id) is the identity).

    `bbox` is the detector's box where the input had one (else the output mask's box), and
    `refined_bbox` the output mask's; `bpr_status`/`bpr_reason` say what happened (rows that carry
    a status); the input entry's other keys come back unchanged."""
    r = {"size": [int(row["rle_h"]), int(row["rle_w"])], "counts": row["rle_counts"]}
    score = float(row["score"])
    mask_box = rle_utils.to_bbox(r)
    extra = json.loads(row["detector_fields"]) if row.get("detector_fields") else {}
    entry = {
        "image_id": int(row["image_id"]),
        "category_id": int(row["category_id"]),
        "segmentation": r,
        "score": score if math.isfinite(score) else 0.0,
        "bbox": extra.pop("bbox", mask_box),
        "refined_bbox": mask_box,
        "instance_id": int(row["instance_id"]),
        **({"source_file": row["source_file"]} if with_source else {}),
    }
    if row.get("status"):
        entry["bpr_status"], entry["bpr_reason"] = row["status"], row.get("reason") or ""
    for k, v in extra.items():
        entry.setdefault(k, v)
    return entry


def write_results_json(rows: Iterable[dict], out: io.TextIOBase | str | Path) -> int:
    """Stream instance rows into a COCO results JSON list, one entry at a time. Returns the count."""
    own = not hasattr(out, "write")
    f = open(out, "w") if own else out
    n = 0
    try:
        f.write("[")
        for row in rows:
            f.write(("," if n else "") + "\n" + json.dumps(row_to_result(row), separators=(",", ":")))
            n += 1
        f.write("\n]\n")
    finally:
        if own:
            f.close()
    return n


# --- ground truth ------------------------------------------------------------------------------


def load_coco_gt(path: str | Path):
    """COCO ground truth as a pycocotools COCO object, with a clear error for bad files."""
    from pycocotools.coco import COCO

    data = _read_json(path, "ground-truth file")
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise InputError(f"ground-truth file {path} needs 'images' and 'annotations' lists (COCO instances format)")
    data.setdefault("categories", [{"id": c, "name": str(c)} for c in sorted({a["category_id"] for a in data["annotations"]})])
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco
