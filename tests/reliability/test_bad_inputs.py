"""The bad-input matrix, through jobs.refine: one job over a dataset holding every case; each case
either refines correctly (identity refiner: output equals input bit for bit) or is passed through /
quarantined with a reason naming the input, the rest completes, and instances in == out."""

import json

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

from bpr_core import rle
from jobs import refine

H, W = 96, 128


def _mask(h=H, w=W, box=(20, 20, 80, 70)):
    m = np.zeros((h, w), bool)
    x0, y0, x1, y1 = box
    m[y0:y1, x0:x1] = True
    return m


def _img(h=H, w=W, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _det(image_id, m, score=0.9, **extra):
    return {"image_id": image_id, "category_id": 1, "segmentation": rle.encode(m), "score": score, **extra}


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("bad")
    imgs = root / "images"
    imgs.mkdir()
    images, dets, cases = [], [], {}

    def add(case, name, write, size, det_list):
        image_id = len(images) + 1
        images.append({"id": image_id, "file_name": name, "height": size[0], "width": size[1]})
        if write is not None:
            write(imgs / name)
        first = len(dets)
        for d in det_list(image_id):
            dets.append(d)
        cases[case] = list(range(first, len(dets)))

    good = lambda p: cv2.imwrite(str(p), _img())  # noqa: E731
    add("missing_image", "missing.png", None, (H, W), lambda i: [_det(i, _mask())])
    png = cv2.imencode(".png", _img())[1].tobytes()
    add("truncated_png", "truncated.png", lambda p: p.write_bytes(png[: len(png) // 3]), (H, W), lambda i: [_det(i, _mask())])
    jpg = cv2.imencode(".jpg", _img())[1].tobytes()
    add("corrupt_jpeg", "corrupt.jpg", lambda p: p.write_bytes(jpg[:20] + b"\x00garbage" * 50), (H, W), lambda i: [_det(i, _mask())])
    add("grayscale", "gray.png", lambda p: cv2.imwrite(str(p), _img()[:, :, 0]), (H, W), lambda i: [_det(i, _mask())])
    add("rgba", "rgba.png", lambda p: cv2.imwrite(str(p), np.dstack([_img(), np.full((H, W), 128, np.uint8)])), (H, W),
        lambda i: [_det(i, _mask())])
    add("16bit", "deep.png", lambda p: cv2.imwrite(str(p), _img().astype(np.uint16) * 257), (H, W), lambda i: [_det(i, _mask())])

    def palette(p):
        from PIL import Image

        Image.fromarray(_img()).convert("P", palette=Image.ADAPTIVE, colors=16).save(p)

    add("palette", "palette.png", palette, (H, W), lambda i: [_det(i, _mask())])
    add("size_mismatch", "small_actual.png", lambda p: cv2.imwrite(str(p), _img(50, 60)), (H, W), lambda i: [_det(i, _mask())])
    add("empty_mask", "empty.png", good, (H, W), lambda i: [_det(i, np.zeros((H, W), bool))])
    add("one_pixel", "one.png", good, (H, W), lambda i: [_det(i, _mask(box=(40, 40, 41, 41)))])
    add("whole_image", "whole.png", good, (H, W), lambda i: [_det(i, np.ones((H, W), bool))])
    add("smaller_than_patch", "tiny.png", lambda p: cv2.imwrite(str(p), _img(30, 40)), (30, 40),
        lambda i: [_det(i, _mask(30, 40, (5, 5, 25, 20)))])
    big = (6000, 8000)
    add("very_large", "large.png", lambda p: cv2.imwrite(str(p), np.full((*big, 3), 90, np.uint8)), big,
        lambda i: [_det(i, _mask(*big, (1000, 1000, 3000, 2500)))])
    add("invalid_rle", "badrle.png", good, (H, W),
        lambda i: [{"image_id": i, "category_id": 1, "score": 0.5, "segmentation": {"size": [H, W], "counts": "!!!not-rle"}}])
    add("duplicate_ids", "dup.png", good, (H, W), lambda i: [_det(i, _mask(), instance_id=5000), _det(i, _mask(box=(10, 10, 30, 30)), instance_id=5000)])
    add("nan_score", "nan.png", good, (H, W), lambda i: [_det(i, _mask(), score=float("nan"))])
    # unknown image_id: a detection whose image is not in the index
    dets.append(_det(999, _mask()))
    cases["unknown_image_id"] = [len(dets) - 1]
    (root / "index.json").write_text(json.dumps({"images": images}))
    (root / "coarse.json").write_text(json.dumps(dets))  # NaN is written as the NaN token, as Python does
    code = refine.main(["--images", str(imgs), "--coarse", str(root / "coarse.json"), "--image-info", str(root / "index.json"),
                        "--out", str(root / "out"), "--refiner", "identity", "--patch-size", "32"])
    out = root / "out"
    # parts/ holds every instance that reached a shard (any status); quarantine.parquet lists all
    # quarantined ones, including those stopped before sharding (unknown image, duplicate, NaN)
    rows = pq.read_table(out / "parts").to_pylist()
    rows += [q for q in pq.read_table(out / "quarantine.parquet").to_pylist() if q not in rows]
    by_pos = {}
    for r in rows:
        by_pos.setdefault((r["image_id"], r["instance_id"]), []).append(r)
    return {"code": code, "dets": dets, "cases": cases, "rows": rows, "manifest": json.loads((out / "manifest.json").read_text()),
            "by_key": by_pos, "refined_json": json.loads((out / "refined.json").read_text())}


def test_refined_json_holds_every_detection_that_has_a_mask(bad_run):
    """Quarantined instances pass through with their coarse mask and the reason, so downstream AP
    never drops because refinement failed; only records without a readable mask are left out."""
    out = bad_run["refined_json"]
    no_mask = {"nan_score"}  # the one record the reader could not use at all
    expected = sum(len(v) for k, v in bad_run["cases"].items() if k not in no_mask)
    assert len(out) == bad_run["manifest"]["counts"]["in_refined_json"] == expected
    by_key = {(e["image_id"], e["instance_id"]): e for e in out}
    for case in ("missing_image", "truncated_png", "corrupt_jpeg", "size_mismatch", "invalid_rle", "unknown_image_id"):
        for pos in bad_run["cases"][case]:
            d = bad_run["dets"][pos]
            e = by_key[(d["image_id"], d.get("instance_id", pos))]
            assert e["bpr_status"] == "quarantined" and e["bpr_reason"]
            assert e["segmentation"]["counts"] == d["segmentation"]["counts"]  # the coarse mask, unchanged
    assert {e["bpr_status"] for e in out} == {"refined", "passed_through", "quarantined"}


def _rows_for(run, case):
    out = []
    for pos in run["cases"][case]:
        d = run["dets"][pos]
        iid = d.get("instance_id", pos)
        out.extend(r for r in run["by_key"].get((d["image_id"], iid), []) if r["rle_counts"] == d["segmentation"].get("counts") or r["status"] == "quarantined")
    return out


def test_job_completes_and_counts_balance(bad_run):
    m = bad_run["manifest"]
    assert bad_run["code"] == refine.EXIT_READ_FAILURES  # done, but the missing image is retried by the next run
    assert m["counts"]["read_failures"] == len(bad_run["cases"]["missing_image"]) == 1
    assert m["invariant"]["ok"] and m["counts"]["input"] == len(bad_run["dets"]) == len(bad_run["rows"])


@pytest.mark.parametrize("case,word", [("missing_image", "missing.png"), ("truncated_png", "truncated.png"),
                                       ("corrupt_jpeg", "corrupt.jpg"), ("size_mismatch", "small_actual.png"),
                                       ("invalid_rle", "invalid RLE"), ("nan_score", "not a finite number"),
                                       ("unknown_image_id", "image_id 999")])
def test_quarantined_with_a_reason_naming_the_input(bad_run, case, word):
    q = [r for r in bad_run["rows"] if r["status"] == "quarantined"]
    hits = [r for r in q if word in r["reason"]]
    assert len(hits) == len(bad_run["cases"][case]), [r["reason"] for r in q]


def test_duplicate_instance_id_keeps_the_first_and_quarantines_the_second(bad_run):
    rows = bad_run["by_key"][(bad_run["dets"][bad_run["cases"]["duplicate_ids"][0]]["image_id"], 5000)]
    assert sorted(r["status"] for r in rows) == ["quarantined", "refined"]
    assert "duplicate instance_id 5000" in next(r for r in rows if r["status"] == "quarantined")["reason"]


@pytest.mark.parametrize("case", ["grayscale", "rgba", "16bit", "palette", "one_pixel", "whole_image", "smaller_than_patch", "very_large"])
def test_refined_correctly(bad_run, case):
    (pos,) = bad_run["cases"][case]
    d = bad_run["dets"][pos]
    (row,) = bad_run["by_key"][(d["image_id"], pos)]
    assert row["status"] == "refined" and row["num_patches"] > 0
    assert row["rle_counts"] == d["segmentation"]["counts"]  # identity refiner: bit for bit


def test_empty_mask_is_passed_through(bad_run):
    (pos,) = bad_run["cases"]["empty_mask"]
    (row,) = bad_run["by_key"][(bad_run["dets"][pos]["image_id"], pos)]
    assert row["status"] == "passed_through" and row["reason"] == "empty"


@pytest.mark.parametrize("content,message", [("[{\"image_id\": 1,", "not valid JSON"), ("{\"a\": 1}", "expected a JSON list")])
def test_malformed_top_level_json_fails_fast(tmp_path, content, message, capsys):
    (tmp_path / "images").mkdir()
    (tmp_path / "coarse.json").write_text(content)
    (tmp_path / "index.json").write_text(json.dumps({"images": []}))
    with pytest.raises(Exception) as e:
        refine.main(["--images", str(tmp_path / "images"), "--coarse", str(tmp_path / "coarse.json"),
                     "--image-info", str(tmp_path / "index.json"), "--out", str(tmp_path / "out")])
    assert message in str(e.value) and "coarse.json" in str(e.value)
    assert not (tmp_path / "out" / "manifest.json").exists()
