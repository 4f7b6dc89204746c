"""Data in and out: COCO ground truth, COCO results JSON, instance Parquet tables, image indexes.

Instances travel as one columnar record per instance (`INSTANCE_COLUMNS`): image_id, instance_id,
category_id, score and the compressed COCO RLE as counts + size. `instance_id` is the instance's
0-based position in the results file it came from (COCO results have no ids of their own), or the
`instance_id` key/column where the input carries one. Refined outputs add provenance columns.
All conversion to and from the ecosystem's formats happens here, once.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from . import rle as rle_utils


class InputError(ValueError):
    """A user input is malformed; the message names the file and the record."""


INSTANCE_SCHEMA = pa.schema([
    ("image_id", pa.int64()),
    ("instance_id", pa.int64()),
    ("category_id", pa.int64()),
    ("score", pa.float64()),
    ("rle_counts", pa.string()),
    ("rle_h", pa.int32()),
    ("rle_w", pa.int32()),
])
INSTANCE_COLUMNS = INSTANCE_SCHEMA.names

PROVENANCE_SCHEMA = pa.schema([
    ("status", pa.string()),  # refined | passed_through
    ("reason", pa.string()),  # why it was passed through ("" when refined)
    ("source_file", pa.string()),
    ("coarse_area", pa.int64()),
    ("refined_area", pa.int64()),
    ("num_patches", pa.int32()),
    ("model_name", pa.string()),
    ("model_version", pa.string()),
    ("config_hash", pa.string()),
])
REFINED_SCHEMA = pa.schema(list(INSTANCE_SCHEMA) + list(PROVENANCE_SCHEMA))


def _read_json(path: str | Path, what: str):
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except FileNotFoundError:
        raise InputError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{what} {path} is not valid JSON: {e}") from None


# --- image index ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageRecord:
    image_id: int
    file_name: str
    height: int | None = None
    width: int | None = None


HOW_TO_INDEX = (
    "An image index maps image_id to an image file. Use any COCO-style JSON with an 'images' list "
    "(the ground-truth file, or COCO's annotation-free image_info_*.json), or a CSV/Parquet table "
    "with columns image_id,path (optionally height,width). Example CSV:\n"
    "  image_id,path\n  1,000000000139.jpg"
)


def load_image_index(path: str | Path | None) -> dict[int, ImageRecord]:
    """Read an image index (COCO-style JSON `images`, or CSV/Parquet image_id,path[,height,width])."""
    if path is None:
        raise InputError("no image index given. " + HOW_TO_INDEX)
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        data = _read_json(path, "image index")
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise InputError(f"image index {path} has no 'images' list. " + HOW_TO_INDEX)
        out = {}
        for i, im in enumerate(data["images"]):
            try:
                rec = ImageRecord(int(im["id"]), str(im["file_name"]), int(im["height"]) if "height" in im else None,
                                  int(im["width"]) if "width" in im else None)
            except (KeyError, TypeError, ValueError) as e:
                raise InputError(f"image index {path}: images[{i}] lacks a valid {e}") from None
            out[rec.image_id] = rec
        return out
    if suffix in (".csv", ".parquet", ".pq"):
        if not path.is_file():
            raise InputError(f"image index not found: {path}")
        if suffix == ".csv":
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))
        else:
            rows = pq.read_table(path).to_pylist()
        out = {}
        for i, r in enumerate(rows):
            if "image_id" not in r or "path" not in r:
                raise InputError(f"image index {path}: row {i} needs columns image_id and path. " + HOW_TO_INDEX)
            h = r.get("height")
            w = r.get("width")
            rec = ImageRecord(int(r["image_id"]), str(r["path"]), int(h) if h not in (None, "") else None,
                              int(w) if w not in (None, "") else None)
            out[rec.image_id] = rec
        return out
    raise InputError(f"image index {path}: unsupported type {suffix!r}. " + HOW_TO_INDEX)


# --- instances -------------------------------------------------------------------------------


def _finite_score(v, where: str) -> float:
    try:
        s = float(v)
    except (TypeError, ValueError):
        raise InputError(f"{where}: score {v!r} is not a number") from None
    return s


def result_to_row(det: dict, instance_id: int, sizes: dict[int, ImageRecord] | None, where: str) -> dict:
    """One COCO results entry -> one instance row. Polygons need the image size from `sizes`."""
    if not isinstance(det, dict):
        raise InputError(f"{where}: expected an object, got {type(det).__name__}")
    try:
        image_id = int(det["image_id"])
        category_id = int(det.get("category_id", 1))
        seg = det["segmentation"]
    except KeyError as e:
        raise InputError(f"{where}: missing key {e}") from None
    except (TypeError, ValueError) as e:
        raise InputError(f"{where}: bad field ({e})") from None
    score = _finite_score(det.get("score", 1.0), where)
    if isinstance(seg, dict) and "size" in seg:
        h, w = (int(v) for v in seg["size"])
    else:
        rec = (sizes or {}).get(image_id)
        if rec is None or rec.height is None:
            raise InputError(f"{where}: polygon segmentation needs the image size; image_id {image_id} has none in the image index")
        h, w = rec.height, rec.width
    try:
        r = rle_utils.segmentation_to_rle(seg, h, w)
    except Exception as e:
        raise InputError(f"{where}: invalid segmentation ({e})") from None
    iid = int(det["instance_id"]) if "instance_id" in det else instance_id
    return {"image_id": image_id, "instance_id": iid, "category_id": category_id, "score": score,
            "rle_counts": r["counts"], "rle_h": h, "rle_w": w}


def iter_json_array(f, what: str, chunk_size: int = 1 << 20) -> Iterator:
    """Stream the elements of a top-level JSON array from a text file object, one at a time, so a
    results file of millions of detections is never held whole in memory. A GT-style object with
    an "annotations" list is not streamable and is parsed whole (such files are small)."""
    dec = json.JSONDecoder()
    buf, pos, eof = "", 0, False

    def fill() -> bool:
        nonlocal buf, pos, eof
        if eof:
            return False
        data = f.read(chunk_size)
        if not data:
            eof = True
            return False
        buf, pos = buf[pos:] + data, 0
        return True

    def skip_ws():
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                pos += 1
            if pos < len(buf) or not fill():
                return

    skip_ws()
    if pos >= len(buf):
        raise InputError(f"{what} is empty, not a JSON list")
    if buf[pos] == "{":  # a COCO GT-style dict: small, parse whole
        rest = buf[pos:] + f.read()
        try:
            data = json.loads(rest)
        except json.JSONDecodeError as e:
            raise InputError(f"{what} is not valid JSON: {e}") from None
        if isinstance(data, dict) and isinstance(data.get("annotations"), list):
            yield from data["annotations"]
            return
        raise InputError(f"{what}: expected a JSON list of detections, got {type(data).__name__}")
    if buf[pos] != "[":
        raise InputError(f"{what} is not valid JSON: expected '[' at the start")
    pos += 1
    first = True
    while True:
        skip_ws()
        if pos >= len(buf):
            raise InputError(f"{what} is not valid JSON: the list is not closed (truncated file?)")
        if buf[pos] == "]":
            return
        if not first:
            if buf[pos] != ",":
                raise InputError(f"{what} is not valid JSON: expected ',' between elements")
            pos += 1
            skip_ws()
        while True:
            try:
                obj, end = dec.raw_decode(buf, pos)
                # an element ending exactly at the buffer's end may be a cut number: read on
                if end < len(buf) or eof:
                    break
            except json.JSONDecodeError as e:
                if eof:
                    raise InputError(f"{what} is not valid JSON: {e}") from None
            if not fill():
                continue
        pos, first = end, False
        yield obj


def iter_results_json(source, sizes: dict[int, ImageRecord] | None = None, name: str | None = None) -> Iterator[dict]:
    """Stream instance rows from a COCO results JSON (a path or a text file object) without
    loading it whole."""
    if hasattr(source, "read"):
        f, path = source, name or "<stream>"
    else:
        path = name or str(source)
        try:
            f = open(source, encoding="utf-8")
        except FileNotFoundError:
            raise InputError(f"results file not found: {path}") from None
    with f:
        try:
            for i, d in enumerate(iter_json_array(f, f"results file {path}")):
                yield result_to_row(d, i, sizes, f"{path} [entry {i}]")
        except UnicodeDecodeError as e:
            raise InputError(f"results file {path} is not valid JSON: {e}") from None


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


def row_to_result(row: dict) -> dict:
    """Instance row -> COCO results entry (drop-in for COCOeval); keeps instance_id for matching."""
    r = {"size": [int(row["rle_h"]), int(row["rle_w"])], "counts": row["rle_counts"]}
    score = float(row["score"])
    return {
        "image_id": int(row["image_id"]),
        "category_id": int(row["category_id"]),
        "segmentation": r,
        "score": score if math.isfinite(score) else 0.0,
        "bbox": rle_utils.to_bbox(r),
        "instance_id": int(row["instance_id"]),
    }


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
