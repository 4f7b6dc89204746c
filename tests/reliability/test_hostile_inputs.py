"""Hostile and messy inputs, through jobs.refine: paths that leave the image root, EXIF orientation,
bad records of every kind, a bad image index entry, pixel limits, multi-file Parquet inputs, gzip
and BOM, malformed files, bad options, checkpoints and output locations.

One rule is checked for every record-level case: the job completes (exit 0), the record comes out
quarantined with the exact reason (naming file, position and field), and instances in == out. Only
malformed files and bad options fail, before Ray starts, with one line.
"""

import gzip
import io
import json
import math
import os
import struct
import zlib

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bpr_core import rle
from bpr_core.formats import InputError
from jobs import refine

from .test_bad_inputs import H, W, _img, _mask


def _det(image_id, m=None, **extra):
    d = {"image_id": image_id, "category_id": 1, "segmentation": rle.encode(_mask() if m is None else m), "score": 0.9}
    d.update(extra)
    return d


def png_header_only(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h (8-bit RGB) with a few bytes of pixel data: what a
    decompression bomb looks like to a header check."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def exif_jpeg(path, pixels: np.ndarray, orientation: int | None) -> None:
    from PIL import Image

    kwargs = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif
    Image.fromarray(pixels).save(path, format="JPEG", quality=95, **kwargs)


def _refine(root, coarse, index, *extra, out="out"):
    args = ["--images", str(root / "images"), "--coarse", str(coarse), "--image-info", str(index),
            "--out", str(root / out), "--refiner", "identity", "--patch-size", "32", *extra]
    return refine.main(args)


def _all_rows(out):
    """Every output row (parts: anything that reached a shard; quarantine.parquet: all quarantined),
    keyed by (source_file, position)."""
    rows = pq.read_table(out / "parts").to_pylist() if (out / "parts").exists() else []
    rows += [q for q in pq.read_table(out / "quarantine.parquet").to_pylist() if q["status"] == "quarantined" and q not in rows]
    by_pos = {}
    for r in rows:
        by_pos.setdefault((r["source_file"], r["position"]), []).append(r)
    return rows, by_pos


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("hostile")
    imgs, outside = root / "images", root / "outside"
    imgs.mkdir()
    outside.mkdir()
    cv2.imwrite(str(outside / "secret.png"), _img(seed=9))
    index_path, coarse_path = root / "index.json", root / "coarse.json"
    images, dets, expect = [], [], {}

    def image(name, write=None, size=(H, W), image_id=None):
        image_id = image_id or len(images) + 1
        images.append({"id": image_id, "file_name": name, "height": size[0], "width": size[1]})
        if write is not None:
            write(imgs / name)
        return image_id

    def case(name, det, status, reason=None):
        expect[name] = (len(dets), det, status, reason)
        dets.append(det)

    good = lambda p: cv2.imwrite(str(p), _img())  # noqa: E731
    q = "quarantined"
    C = str(coarse_path)

    # paths
    case("plain", _det(image("plain.png", good)), "refined")
    case("dotdot", _det(image("../outside/secret.png")), q,
         f"file_name '../outside/secret.png' resolves outside the image root {imgs}")
    absolute = str(outside / "secret.png")
    case("absolute", _det(image(absolute)), q,
         f"file_name '{absolute}' is an absolute path; absolute paths are refused unless --allow-absolute-paths is given")
    case("etc_hostname", _det(image("/etc/hostname")), q,
         "file_name '/etc/hostname' is an absolute path; absolute paths are refused unless --allow-absolute-paths is given")
    os.symlink(outside / "secret.png", imgs / "link.png")
    case("symlink_out", _det(image("link.png")), q, f"file_name 'link.png' is a symlink that leads outside the image root {imgs}")
    good(imgs / "real.png")
    os.symlink(imgs / "real.png", imgs / "alias.png")
    case("symlink_in", _det(image("alias.png")), "refined")
    # EXIF: stored pixels are decoded; a mask sized to the rotated picture is named as such
    exif_jpeg(imgs / "exif6.jpg", _img(), 6)
    exif_id = image("exif6.jpg")
    case("exif_stored_mask", _det(exif_id), "refined")
    case("exif_rotated_mask", _det(exif_id, _mask(W, H, (20, 20, 60, 90))), q,
         f"image {imgs}/exif6.jpg is {H}x{W} but the mask RLE is {W}x{H} (the file has EXIF orientation 6; "
         "decoded with --exif stored; re-run with --exif apply)")
    # records: one rule, quarantined with file, position and field
    rec_id = image("records.png", good)

    def record(name, det, why):
        case(name, det, q, f"{C} entry {len(dets)}: {why}")

    record("score_null", _det(rec_id, score=None), "score is null")
    record("score_string", _det(rec_id, score="0.9"), "score '0.9' is not a number")
    record("score_nan", _det(rec_id, score=float("nan")), "score nan is not a finite number")
    record("category_null", _det(rec_id, category_id=None), "category_id is null")
    record("segmentation_null", _det(rec_id, segmentation=None), "segmentation is null")
    for k in (2, 4):
        record(f"polygon_{k}", _det(rec_id, segmentation=[[10.0] * k]),
               f"segmentation polygon 0 has {k} numbers; a polygon needs x,y pairs for at least 3 points (6 or more, even)")
    record("image_id_string", _det("abc"), "image_id 'abc' is not an integer")
    record("image_id_bool", _det(True), "image_id True is not an integer")
    record("image_id_fraction", _det(1.7), "image_id 1.7 is not an integer")
    record("instance_id_string", _det(rec_id, instance_id="x"), "instance_id 'x' is not an integer")
    record("instance_id_huge", _det(rec_id, instance_id=2 ** 70), f"instance_id {2 ** 70} is outside the 64-bit integer range")
    record("image_id_2_64", _det(2 ** 64), f"image_id {2 ** 64} is outside the 64-bit integer range")
    nan_size = _det(rec_id)
    nan_size["segmentation"] = {"size": [float("nan"), W], "counts": nan_size["segmentation"]["counts"]}
    record("size_nan", nan_size, "segmentation.size[0] nan is not an integer")
    half = _det(rec_id)
    half["segmentation"] = {"size": [321.5, W], "counts": half["segmentation"]["counts"]}
    record("size_fraction", half, "segmentation.size[0] 321.5 is not an integer")
    no_cat = _det(rec_id)
    del no_cat["category_id"]
    record("category_missing", no_cat, "missing category_id")
    no_score = _det(rec_id)
    del no_score["score"]
    record("score_missing", no_score, "missing score")
    record("not_an_object", 42, "expected an object, got int")
    case("integral_float_id", _det(float(rec_id)), "refined")  # 3.0 is exactly 3: accepted
    record("bbox_bad", _det(rec_id, bbox=[1, 2, 3]), "bbox [1, 2, 3] is not [x, y, width, height] of finite numbers")
    record("extra_nan", _det(rec_id, area=float("nan")), "a detector field holds NaN or Infinity (area)")
    # the detector's own keys travel through and come back in refined.json
    case("detector_keys", _det(rec_id, bbox=[1.5, 2, 30, 40], track_id=7, attributes={"occluded": True}), "refined")
    # image index: a duplicate id and a fractional size make that image's detections unusable
    dup = image("dup_a.png", good)
    images.append({"id": dup, "file_name": "dup_b.png", "height": H, "width": W})
    case("index_duplicate", _det(dup), q,
         f"unusable image index entry: image_id {dup} appears more than once in the image index {index_path} "
         f"(images[{len(images) - 2}] and images[{len(images) - 1}])")
    frac = image("frac.png", good)
    images[-1]["height"] = 321.5
    case("index_fraction", _det(frac), q,
         f"unusable image index entry: image index {index_path} images[{len(images) - 1}]: height 321.5 is not an integer")
    # pixel limits (default 100 MP): from the header, before decoding; and on the mask's size
    case("image_over_limit", _det(image("huge.png", lambda p: p.write_bytes(png_header_only(12000, 12000)))), q,
         f"image {imgs}/huge.png is 12000x12000 (144.0 MP), over the pixel limit of 100 MP (--max-image-pixels)")
    from PIL import Image

    bound = 2 * Image.MAX_IMAGE_PIXELS
    case("decompression_bomb", _det(image("bomb.png", lambda p: p.write_bytes(png_header_only(20000, 20000)))), q,
         f"image {imgs}/bomb.png has more than {bound / 1e6:.0f} MP (Pillow's decompression-bomb bound, "
         "the most bpr opens whatever --max-image-pixels says)")
    big = (12000, 12000)
    case("mask_over_limit", _det(image("bigmask.png", good, size=big), m=None,
                                 segmentation={"size": list(big), "counts": rle.encode(np.zeros((1, 1), bool))["counts"]}), q,
         "mask RLE is 12000x12000 (144.0 MP), over the pixel limit of 100 MP (--max-image-pixels)")

    index_path.write_text(json.dumps({"images": images}))
    coarse_path.write_text(json.dumps(dets))
    code = _refine(root, coarse_path, index_path)
    out = root / "out"
    rows, by_pos = _all_rows(out)
    return {"code": code, "expect": expect, "rows": rows, "by_pos": by_pos, "source": C, "dets": dets,
            "refined_json": json.loads((out / "refined.json").read_text()),
            "manifest": json.loads((out / "manifest.json").read_text()), "out": out}


def test_job_completes_and_counts_balance(hostile):
    m = hostile["manifest"]
    assert hostile["code"] == 0
    assert m["invariant"]["ok"] and m["counts"]["input"] == len(hostile["dets"]) == len(hostile["rows"])
    assert sum(len(v) for v in hostile["by_pos"].values()) == len(hostile["rows"])  # one row per input position


CASES = ["plain", "dotdot", "absolute", "etc_hostname", "symlink_out", "symlink_in", "exif_stored_mask", "exif_rotated_mask",
         "score_null", "score_string", "score_nan", "category_null", "segmentation_null", "polygon_2", "polygon_4",
         "image_id_string", "image_id_bool", "image_id_fraction", "instance_id_string", "instance_id_huge", "image_id_2_64",
         "size_nan", "size_fraction", "category_missing", "score_missing", "not_an_object", "integral_float_id",
         "bbox_bad", "extra_nan", "detector_keys",
         "index_duplicate", "index_fraction", "image_over_limit", "decompression_bomb", "mask_over_limit"]


@pytest.mark.parametrize("name", CASES)
def test_each_case_has_its_exact_status_and_reason(hostile, name):
    position, det, status, reason = hostile["expect"][name]
    (row,) = hostile["by_pos"][(hostile["source"], position)]
    assert row["status"] == status
    if status == "refined":
        assert row["reason"] == "" and row["rle_counts"] == det["segmentation"]["counts"]  # identity: bit for bit
    else:
        assert row["reason"] == reason


def test_refined_json_keeps_the_detectors_box_and_keys(hostile):
    position, det, _, _ = hostile["expect"]["detector_keys"]
    (entry,) = [e for e in hostile["refined_json"] if e["image_id"] == det["image_id"] and e["instance_id"] == position]
    assert entry["bbox"] == [1.5, 2, 30, 40] and entry["refined_bbox"] == rle.to_bbox(det["segmentation"])
    assert entry["track_id"] == 7 and entry["attributes"] == {"occluded": True} and entry["bpr_status"] == "refined"
    plain = [e for e in hostile["refined_json"] if e["instance_id"] == hostile["expect"]["plain"][0]][0]
    assert plain["bbox"] == plain["refined_bbox"]  # no detector box given: the mask's


def test_refined_json_holds_every_detection_with_a_mask(hostile):
    """Quarantined detections that have a mask (a refused path, an oversized image, ...) pass
    through in refined.json with their coarse mask and reason; records without one cannot."""
    have_mask = [n for n, (pos, det, status, _) in hostile["expect"].items()
                 if isinstance(det, dict) and status != "quarantined" or n in (
                     "dotdot", "absolute", "etc_hostname", "symlink_out", "exif_rotated_mask", "index_duplicate",
                     "index_fraction", "image_over_limit", "decompression_bomb", "mask_over_limit")]
    out = hostile["refined_json"]
    assert len(out) == len(have_mask) == hostile["manifest"]["counts"]["in_refined_json"]
    quarantined = [e for e in out if e["bpr_status"] == "quarantined"]
    assert len(quarantined) == 10 and all(e["bpr_reason"] for e in quarantined)


def test_every_case_is_listed(hostile):
    assert sorted(CASES) == sorted(hostile["expect"])


def test_quarantine_and_parts_share_one_schema(hostile):
    import pyarrow.dataset as pads

    parts = pq.read_table(hostile["out"] / "parts")
    quarantine = pq.read_table(hostile["out"] / "quarantine.parquet")
    assert parts.schema.equals(quarantine.schema)  # the same columns, types and order
    both = pa.concat_tables([parts, quarantine])
    assert both.num_rows == parts.num_rows + quarantine.num_rows
    assert pads.dataset([pads.dataset(hostile["out"] / "parts"), pads.dataset(hostile["out"] / "quarantine.parquet")]).to_table() \
        .num_rows == both.num_rows
    # each row's refined.json entry travels with it; a record without a readable mask has none
    entries = {json.dumps(e, separators=(",", ":")) for e in json.loads((hostile["out"] / "refined.json").read_text())}
    for row in both.to_pylist():
        assert row["result_json"] in entries if row["result_json"] is not None else row["status"] == "quarantined"


def test_allow_absolute_paths_reads_them(hostile, tmp_path):
    """With the flag an absolute file_name is read (and refined); `..` escapes stay refused."""
    root = tmp_path
    (root / "images").mkdir()
    src = hostile["out"].parent / "outside" / "secret.png"
    index = root / "index.json"
    index.write_text(json.dumps({"images": [{"id": 1, "file_name": str(src), "height": H, "width": W},
                                            {"id": 2, "file_name": "../x/secret.png", "height": H, "width": W}]}))
    coarse = root / "coarse.json"
    coarse.write_text(json.dumps([_det(1), _det(2)]))
    assert _refine(root, coarse, index, "--allow-absolute-paths") == 0
    rows, by_pos = _all_rows(root / "out")
    assert [by_pos[(str(coarse), i)][0]["status"] for i in (0, 1)] == ["refined", "quarantined"]
    assert by_pos[(str(coarse), 1)][0]["reason"] == f"file_name '../x/secret.png' resolves outside the image root {root / 'images'}"


def test_exif_policy_square_image_uses_stored_pixels_and_apply_rotates(ray_session, tmp_path):
    """A square photo with an orientation tag refines exactly like the same pixels without the tag
    (OpenCV's default decoder would rotate it: the masks would be refined against the wrong
    picture). With --exif apply the non-square tagged image is rotated, so a mask sized to the
    rotated picture refines and one sized to the stored pixels is named."""
    (tmp_path / "images").mkdir()
    rng = np.random.default_rng(3)
    pixels = (cv2.GaussianBlur(rng.integers(0, 256, (H, H, 3), dtype=np.uint8), (9, 9), 3))
    exif_jpeg(tmp_path / "images" / "tagged.jpg", pixels, 6)
    exif_jpeg(tmp_path / "images" / "plain.jpg", pixels, None)
    tagged = (tmp_path / "images" / "tagged.jpg").read_bytes()
    assert cv2.imdecode(np.frombuffer(tagged, np.uint8), cv2.IMREAD_COLOR).tolist() != \
        cv2.imdecode(np.frombuffer(tagged, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION).tolist()
    m = _mask(H, H, (15, 30, 70, 60))
    index = tmp_path / "index.json"
    index.write_text(json.dumps({"images": [{"id": 1, "file_name": "tagged.jpg"}, {"id": 2, "file_name": "plain.jpg"}]}))
    coarse = tmp_path / "coarse.json"
    coarse.write_text(json.dumps([_det(1, m), _det(2, m)]))
    args = ["--images", str(tmp_path / "images"), "--coarse", str(coarse), "--image-info", str(index),
            "--refiner", "guided-filter", "--patch-size", "32"]
    assert refine.main([*args, "--out", str(tmp_path / "stored")]) == 0
    a, b = json.loads((tmp_path / "stored" / "refined.json").read_text())
    assert a["segmentation"]["counts"] == b["segmentation"]["counts"]
    assert a["segmentation"]["counts"] != rle.encode(m)["counts"]  # the filter did change the mask
    assert refine.main([*args, "--out", str(tmp_path / "applied"), "--exif", "apply"]) == 0
    a2, b2 = json.loads((tmp_path / "applied" / "refined.json").read_text())
    assert a2["segmentation"]["counts"] != b2["segmentation"]["counts"]  # rotated picture: another result

    # non-square, --exif apply
    root = tmp_path / "ns"
    (root / "images").mkdir(parents=True)
    exif_jpeg(root / "images" / "exif6.jpg", _img(), 6)
    idx = root / "index.json"
    idx.write_text(json.dumps({"images": [{"id": 1, "file_name": "exif6.jpg"}]}))
    c = root / "coarse.json"
    c.write_text(json.dumps([_det(1, _mask(W, H, (20, 20, 60, 90))), _det(1)]))
    assert _refine(root, c, idx, "--exif", "apply") == 0
    _, by_pos = _all_rows(root / "out")
    assert by_pos[(str(c), 0)][0]["status"] == "refined"
    assert by_pos[(str(c), 1)][0]["reason"] == (
        f"image {root / 'images'}/exif6.jpg is {W}x{H} but the mask RLE is {H}x{W} (the file has EXIF orientation 6; "
        "decoded with --exif apply; re-run with --exif stored)")


def test_multi_file_parquet_keeps_each_files_numbering_and_names_the_file(ray_session, tmp_path):
    """Detector files that each number instances from 0 are one input: identity is (file,
    instance_id), provenance names the file, and bad rows are quarantined with file and row."""
    (tmp_path / "images").mkdir()
    for i in (1, 2):
        cv2.imwrite(str(tmp_path / "images" / f"{i}.png"), _img(seed=i))
    index = tmp_path / "index.json"
    index.write_text(json.dumps({"images": [{"id": i, "file_name": f"{i}.png"} for i in (1, 2)]}))
    masks = [_mask(box=(10 + 5 * k, 15, 60 + 5 * k, 70)) for k in range(3)]

    def table(image_ids, category_ids, instance_ids):
        return pa.table({"image_id": image_ids, "instance_id": instance_ids, "category_id": category_ids,
                         "score": [0.5] * len(image_ids), "rle_counts": [rle.encode(masks[k % 3])["counts"] for k in range(len(image_ids))],
                         "rle_h": [H] * len(image_ids), "rle_w": [W] * len(image_ids)})

    d = tmp_path / "dets"
    d.mkdir()
    pq.write_table(table([1, 1, 2], [1, 2, 3], [0, 1, 2]), d / "a.parquet")
    pq.write_table(table([1, 2, 2], [1, None, 3], [0, 1, None]), d / "b.parquet")
    pq.write_table(table(pa.array([1.0, 1.7], pa.float64()), [4, 4], [0, 1]), d / "c.parquet")
    assert _refine(tmp_path, d, index) == 0
    rows, by_pos = _all_rows(tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["invariant"]["ok"] and manifest["counts"]["input"] == 8 == len(rows)
    a, b, c = (str(d / f"{n}.parquet") for n in "abc")
    refined = {(s, p) for (s, p), (r,) in by_pos.items() if r["status"] == "refined"}
    assert refined == {(a, 0), (a, 1), (a, 2), (b, 0), (c, 0)}  # a's and b's instance 0 of image 1 both refined
    assert by_pos[(b, 1)][0]["reason"] == f"{b} row 1: category_id is null"
    assert by_pos[(b, 2)][0]["reason"] == f"{b} row 2: instance_id is null"
    assert by_pos[(c, 1)][0]["reason"] == f"{c} row 1: image_id 1.7 is not an integer"
    out = json.loads((tmp_path / "out" / "refined.json").read_text())
    assert sorted((e["source_file"], e["image_id"], e["instance_id"]) for e in out) == \
        sorted([(a, 1, 0), (a, 1, 1), (a, 2, 2), (b, 1, 0), (c, 1, 0)])
    assert all(e["category_id"] in (1, 2, 3, 4) for e in out)


def test_gzip_and_bom_results_read_like_plain_json(ray_session, synth30, tmp_path):
    coarse = (synth30 / "coarse.json").read_bytes()
    variants = {"plain.json": coarse, "bom.json": b"\xef\xbb\xbf" + coarse, "gz.json.gz": gzip.compress(b"\xef\xbb\xbf" + coarse)}
    outs = {}
    for name, data in variants.items():
        (tmp_path / name).write_bytes(data)
        assert refine.main(["--images", str(synth30 / "images"), "--coarse", str(tmp_path / name), "--image-info",
                            str(synth30 / "annotations.json"), "--out", str(tmp_path / f"out-{name}"), "--refiner", "identity"]) == 0
        outs[name] = [(e["image_id"], e["instance_id"], e["segmentation"]) for e in json.loads((tmp_path / f"out-{name}" / "refined.json").read_text())]
    assert len(outs["plain.json"]) > 0 and outs["plain.json"] == outs["bom.json"] == outs["gz.json.gz"]


# --- malformed files, options, checkpoints, output locations: one line, before Ray starts --------


def _inputs(tmp_path, coarse_text: bytes | str = "[]"):
    (tmp_path / "images").mkdir(exist_ok=True)
    (tmp_path / "index.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png"}]}))
    coarse = tmp_path / "coarse.json"
    coarse.write_bytes(coarse_text if isinstance(coarse_text, bytes) else coarse_text.encode())
    return ["--images", str(tmp_path / "images"), "--coarse", str(coarse), "--image-info", str(tmp_path / "index.json"),
            "--out", str(tmp_path / "out")]


def _fails(args, capsys=None) -> str:
    """jobs.refine fails with an InputError (exit 2 under run_main) before Ray is started."""
    import ray

    was = ray.is_initialized()
    with pytest.raises(InputError) as e:
        refine.main(args)
    assert ray.is_initialized() == was  # no Ray started or stopped by a failed check
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


@pytest.mark.parametrize("content,expected", [
    (b"[" + json.dumps(_det(1)).encode() + b"," + b"\x00" * (4 << 20), "is not valid JSON at character {n} (entry 1): Expecting value"),
    (b"\xff\xfe[\x00]\x00", "is UTF-16/32 (little-endian BOM); bpr reads UTF-8 JSON, plain or gzip-compressed"),
    (b"PK\x03\x04rest", "is a zip archive; bpr reads UTF-8 JSON, plain or gzip-compressed"),
    (b'[{"image_id": 1}, ]', "is not valid JSON at character 18 (entry 1): Expecting value"),
])
def test_malformed_results_file_fails_at_once_naming_it(tmp_path, content, expected):
    args = _inputs(tmp_path, content)
    n = len(json.dumps(_det(1))) + 2
    assert _fails(args) == f"results file {tmp_path / 'coarse.json'} " + expected.format(n=n)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_string_id_column_is_a_malformed_table(tmp_path):
    args = _inputs(tmp_path)
    t = pa.table({"image_id": ["1"], "instance_id": [0], "category_id": [1], "score": [0.5], "rle_counts": ["x"], "rle_h": [H], "rle_w": [W]})
    pq.write_table(t, tmp_path / "t.parquet")
    args[3] = str(tmp_path / "t.parquet")
    assert _fails(args) == f"instance table {tmp_path / 't.parquet'}: column image_id has type string; expected an integer or float column"


@pytest.mark.parametrize("flag,value,message", [
    ("--shard-size", "0", "argument --shard-size: 0 is out of range (must be >= 1)"),
    ("--batch-size", "-3", "argument --batch-size: -3 is out of range (must be >= 1)"),
    ("--refine-cpus", "0", "argument --refine-cpus: 0 is out of range (must be > 0.0)"),
    ("--max-image-pixels", "-1", "argument --max-image-pixels: -1 is out of range (must be >= 0)"),
    ("--shard-size", "ten", "argument --shard-size: 'ten' is not an integer"),
])
def test_bad_sizes_are_usage_errors(tmp_path, capsys, flag, value, message):
    with pytest.raises(SystemExit) as e:
        refine.main([*_inputs(tmp_path), flag, value])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_library_options_are_validated_too(tmp_path):
    from pipeline.refine_job import RefineOptions, run

    args = _inputs(tmp_path)
    with pytest.raises(InputError, match="^shard-size must be a positive integer, got 0$"):
        run(RefineOptions(images=args[1], coarse=args[3], image_info=args[5], out=args[7], method="identity", shard_size=0))


def test_checkpoint_problems_are_one_line_naming_the_file(tmp_path):
    import torch

    from bpr_core import BPRConfig
    from bpr_core.model import build_model
    from bpr_core.refiner import DEFAULT_WEIGHTS, save_checkpoint

    args = _inputs(tmp_path)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(DEFAULT_WEIGHTS.read_bytes()[:100_000])
    msg = _fails([*args, "--checkpoint", str(cut)])
    assert msg.startswith(f"cannot read checkpoint {cut}: not a torch checkpoint, or truncated (")
    wrong = tmp_path / "wrong.pt"
    save_checkpoint(wrong, build_model("hrnet_lite"), BPRConfig(model="efflite0"))
    msg = _fails([*args, "--checkpoint", str(wrong)])
    assert msg.startswith(f"checkpoint {wrong}: its weights do not fit the 'efflite0' architecture its config declares (")
    pickled = tmp_path / "pickled.pt"
    torch.save({"format": "x", "obj": io.StringIO("x")}, pickled)
    assert _fails([*args, "--checkpoint", str(pickled)]).startswith(f"refusing to load checkpoint {pickled}: it holds Python objects")
    assert _fails([*args, "--checkpoint", str(tmp_path / "none.pt")]) == f"checkpoint not found: {tmp_path / 'none.pt'}"


def test_output_location_that_cannot_be_created(tmp_path):
    args = _inputs(tmp_path)
    (tmp_path / "file").write_text("x")
    args[7] = str(tmp_path / "file")
    assert _fails([*args, "--refiner", "identity"]) == f"output location {tmp_path / 'file'} exists and is not a directory"


def test_credentials_in_a_uri_are_refused_and_never_echoed(tmp_path):
    from ..pipeline.conftest import run_refine_subprocess

    args = _inputs(tmp_path)
    args[1] = "s3://AKIAEXAMPLEKEY:TopSecretValue123@bucket/images"
    rc, log = run_refine_subprocess([*args, "--refiner", "identity"])
    assert rc == 2, log
    assert "TopSecretValue123" not in log and "AKIAEXAMPLEKEY" not in log and "Traceback" not in log
    assert "error: credentials or query parameters in an s3:// URI are not accepted (s3://***@bucket/images)" in log
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_pixel_counts_in_reasons_are_exact():
    from bpr_core.imageio import ImageHeader, ImageRejected, check_pixels

    check_pixels(ImageHeader(10_000, 10_000, 1), "x", 100_000_000)  # exactly at the limit: allowed
    with pytest.raises(ImageRejected, match=r"^image x is 10001x10000 \(100\.0 MP\), over the pixel limit of 100 MP"):
        check_pixels(ImageHeader(10_000, 10_001, 1), "x", 100_000_000)
    check_pixels(ImageHeader(10_000, 10_001, 1), "x", 0)  # 0 = no limit
    assert math.isclose(ImageHeader(3, 4, 6).pixels, 12) and ImageHeader(3, 4, 6).shape("apply") == (4, 3)
