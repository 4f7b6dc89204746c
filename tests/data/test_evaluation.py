import json

import numpy as np
import pytest

from bpr_core import Refiner, rle
from bpr_core.evaluation import evaluate_results, gt_as_results, mask_to_boundary
from bpr_core.formats import load_coco_gt, load_image_index, read_results_json, row_to_result
from jobs import evaluate

from ..core.masks import random_blob_mask


def _slow_boundary(mask, d):
    h, w = mask.shape
    out = np.zeros_like(mask)
    for y in range(h):
        for x in range(w):
            if not mask[y, x]:
                continue
            for yy in range(y - d, y + d + 1):
                for xx in range(x - d, x + d + 1):
                    if not (0 <= yy < h and 0 <= xx < w) or not mask[yy, xx]:
                        out[y, x] = True
    return out


@pytest.mark.parametrize("seed", range(5))
def test_boundary_region_matches_slow_reference(seed):
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(10, 60)), int(rng.integers(10, 60))
    m = random_blob_mask(rng, h, w)
    for ratio in (0.02, 0.05, 0.1):
        d = max(1, int(round(ratio * np.hypot(h, w))))
        assert np.array_equal(mask_to_boundary(m, ratio), _slow_boundary(m, d))


def test_gt_as_results_scores_100_and_coarse_is_lower(synthetic_small):
    gt = load_coco_gt(synthetic_small / "annotations.json")
    perfect = evaluate_results(gt, gt_as_results(gt))
    assert perfect["mask"]["AP"] == pytest.approx(100.0) and perfect["boundary"]["AP"] == pytest.approx(100.0)
    coarse = [row_to_result(r) for r in read_results_json(synthetic_small / "coarse.json")]
    rep = evaluate_results(gt, coarse)
    assert rep["mask"]["AP"] < 90.0
    assert rep["boundary"]["AP"] < rep["mask"]["AP"]


def test_guided_filter_baseline_runs_end_to_end_through_evaluation(synthetic_small, tmp_path):
    import cv2

    index = load_image_index(synthetic_small / "annotations.json")
    rows = read_results_json(synthetic_small / "coarse.json")
    refiner = Refiner(method="guided-filter")
    refined = []
    for image_id in sorted({r["image_id"] for r in rows}):
        mine = [r for r in rows if r["image_id"] == image_id]
        img = cv2.cvtColor(cv2.imread(str(synthetic_small / "images" / index[image_id].file_name)), cv2.COLOR_BGR2RGB)
        masks = np.stack([rle.decode({"size": [r["rle_h"], r["rle_w"]], "counts": r["rle_counts"]}) for r in mine])
        out = refiner.refine(img, masks)
        for r, m in zip(mine, out):
            enc = rle.encode(m)
            refined.append({**r, "rle_counts": enc["counts"]})
    out_path = tmp_path / "gf.json"
    out_path.write_text(json.dumps([row_to_result(r) for r in refined]))
    report = evaluate.evaluate_files(str(synthetic_small / "annotations.json"), [str(synthetic_small / "coarse.json"), str(out_path)])
    gf = report["results"]["gf.json"]
    assert gf["iou_change"]["instances"] > 10 and gf["iou_change"]["unpaired"] == 0
    assert 0.0 < gf["mask"]["AP"] <= 100.0
    # the baseline changes masks (it is not a no-op)
    assert sum(a["rle_counts"] != b["rle_counts"] for a, b in zip(rows, refined)) > len(rows) // 2
