"""jobs.prepare_data on a generated stand-in for ../shared/data (the tests never need the real
sets): fixed splits, real-detection photos kept out of training, files jobs.train can read."""

import json

import cv2
import numpy as np
import pytest

from bpr_core import rle
from bpr_core.formats import InputError, load_coco_gt, read_results_json
from jobs import prepare_data

from ..core.masks import random_blob_mask


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    root = tmp_path_factory.mktemp("shared")
    rng = np.random.default_rng(0)
    coco = root / "coco-train"
    (coco / "images").mkdir(parents=True)
    images, anns, dets = [], [], []
    for i in range(15):
        image_id = 100 + 7 * i  # ids not in file order, to check the sort
        name = f"{image_id:012d}.jpg"
        h, w = 60, 80
        cv2.imwrite(str(coco / "images" / name), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        images.append({"id": image_id, "file_name": f"images/{name}", "height": h, "width": w})
        for k in range(2):
            m = random_blob_mask(rng, h, w)
            r = rle.encode(m)
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": 1 + k, "segmentation": r,
                         "area": int(m.sum()), "bbox": rle.to_bbox(r), "iscrowd": 0})
            if i in (1, 4):  # real detections on two photos: one of them (index 4) is in the val split
                dets.append({"image_id": image_id, "category_id": 1 + k, "segmentation": r, "score": 0.9})
    (coco / "instances.json").write_text(json.dumps({"images": images[::-1], "annotations": anns,
                                                     "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}))
    (coco / "detections_real.json").write_text(json.dumps(dets))
    ccp = root / "ccp-persons"
    (ccp / "images").mkdir(parents=True)
    (ccp / "masks").mkdir()
    for i in range(10):
        cv2.imwrite(str(ccp / "images" / f"{i + 1:04d}.jpg"), rng.integers(0, 255, (50, 40, 3), dtype=np.uint8))
        cv2.imwrite(str(ccp / "masks" / f"{i + 1:04d}.png"), random_blob_mask(rng, 50, 40).astype(np.uint8) * 255)
    return root


def _files(d):
    gt = json.loads((d / "annotations.json").read_text())
    return gt, json.loads((d / "coarse.json").read_text())


def test_coco_split_every_fifth_to_val_and_real_photos_never_trained(shared, tmp_path):
    prepare_data.main(["--set", "coco", "--split", "val", "--out", str(tmp_path / "val"), "--shared", str(shared)])
    prepare_data.main(["--set", "coco", "--split", "train", "--recipe", "identity", "--draws", "2", "--out", str(tmp_path / "train"),
                       "--shared", str(shared)])
    val, _ = _files(tmp_path / "val")
    train, coarse = _files(tmp_path / "train")
    ids = sorted(100 + 7 * i for i in range(15))
    val_names = {f"{ids[i]:012d}.jpg" for i in (4, 9, 14)}
    assert {im["file_name"] for im in val["images"]} == val_names
    train_names = {im["file_name"] for im in train["images"]}
    real = {f"{ids[i]:012d}.jpg" for i in (1, 4)}
    assert not train_names & val_names and not train_names & real
    assert len(train_names) == 15 - 3 - 1
    assert len(coarse) == 2 * 2 * len(train_names)  # two draws per instance
    assert (tmp_path / "train" / "images" / next(iter(train_names))).is_file()  # through the symlink
    # readable by the project's own loaders (what jobs.train and jobs.refine use)
    coco = load_coco_gt(tmp_path / "train" / "annotations.json")
    assert len(coco.getAnnIds()) == 2 * len(train_names)
    assert len(read_results_json(tmp_path / "train" / "coarse.json")) == len(coarse)


def test_coarse_masks_are_reproducible_by_seed(shared, tmp_path):
    for name in ("a", "b"):
        prepare_data.main(["--set", "ccp", "--split", "train", "--recipe", "mix", "--seed", "5", "--out", str(tmp_path / name),
                           "--shared", str(shared)])
    assert (tmp_path / "a" / "coarse.json").read_bytes() == (tmp_path / "b" / "coarse.json").read_bytes()
    gt, coarse = _files(tmp_path / "a")
    assert len(gt["images"]) == 8 and 0 < len(coarse) <= 8  # 10 photos, 2 to val; a draw may miss (empty mask)


def test_real_detections_set_keeps_every_detection_and_its_photos_full_gt(shared, tmp_path):
    prepare_data.main(["--set", "coco-real", "--out", str(tmp_path / "real"), "--shared", str(shared)])
    gt, coarse = _files(tmp_path / "real")
    assert len(gt["images"]) == 2 and len(gt["annotations"]) == 4 and len(coarse) == 4
    by_file = {im["id"]: im["file_name"] for im in gt["images"]}
    src = json.loads((shared / "coco-train" / "detections_real.json").read_text())
    assert sorted(by_file[d["image_id"]] for d in coarse) == sorted(f"{d['image_id']:012d}.jpg" for d in src)


def test_recipe_report_lists_every_recipe_and_the_real_detections(shared, tmp_path):
    prepare_data.main(["--recipe-report", str(tmp_path / "r.json"), "--shared", str(shared)])
    rep = json.loads((tmp_path / "r.json").read_text())
    assert set(rep["recipes"]) == set(prepare_data.RECIPES)
    assert rep["recipes"]["identity"]["median"] == 1.0
    assert rep["real_detections_matched"]["n"] == 4 and rep["real_detections_matched"]["median"] == 1.0


def test_missing_shared_folder_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="coco-train/instances.json not found"):
        prepare_data.main(["--set", "coco", "--out", str(tmp_path / "x"), "--shared", str(tmp_path / "nowhere")])
