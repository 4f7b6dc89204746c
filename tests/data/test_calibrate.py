"""jobs.calibrate: the grid search picks the admissible rule with the best boundary gain, and the
whole job writes a checkpoint that carries it."""

import json

import numpy as np
import pytest
import torch

from bpr_core import BPRConfig, load_checkpoint, save_checkpoint
from bpr_core.model import build_model
from jobs import calibrate


def _rec(gt_area, before, after_by_margin, coarse_area=None):
    return {"set": "s", "gt_area": gt_area, "coarse_area": coarse_area or gt_area, "before": before, "after": after_by_margin}


def _set(recs: list[dict]) -> dict:
    """A set's records as collect() returns them: each matched record its own GT (one category,
    score 1 unless given), no unmatched detection."""
    matched = [{"score": 1.0, **r, "gt_id": r.get("gt_id", i), "category_id": 1} for i, r in enumerate(recs)]
    return {"matched": matched, "unmatched": [], "gt_areas": [(r["gt_area"], 1) for r in matched]}


def test_search_refuses_rules_that_hurt_and_breaks_ties_to_the_safest_rule():
    m = len(calibrate.GRID["gate_margin"])
    # A large object gains a lot at every margin; a small one loses badly unless min_area skips it
    # (the network is confident, so no gate margin saves it); a medium one is hurt only without a gate.
    large = _rec(20000, (0.80, 0.50), [(0.90, 0.70, 0.85)] * m)
    small = _rec(300, (0.90, 0.80), [(0.50, 0.30, 0.55)] * m)
    medium_after = [(0.70, 0.40, 0.80)] + [(0.86, 0.62, 0.95)] * (m - 1)
    medium = _rec(5000, (0.85, 0.60), medium_after)
    best, points = calibrate.search({"s": _set([large, small, medium] * 10)}, max_worse=0.05)
    assert best["admissible"]
    # Every gate > 0 saves the medium object; the large one's IoU with its coarse mask is 0.85, so
    # acceptance thresholds up to 0.8 keep it, while the small one's redraw (IoU 0.55 with its
    # coarse mask) is rejected from 0.7 on; min_area 400 to 4096 would also skip it. All of those
    # tie on gain: the safest guards win (largest gate, then acceptance threshold), then the
    # smallest min_area, since the guards already protect the small object.
    assert best["min_area"] == 0 and best["gate_margin"] == 0.4 and best["min_keep_iou"] == 0.8
    # without the acceptance rule, only min_area protects the small object
    no_accept = [p for p in points if p["min_keep_iou"] == 0 and p["gate_margin"] == 0.4]
    assert [p["min_area"] for p in no_accept if p["admissible"]] == [400, 1024, 2048, 4096]
    official = next(p for p in points if p["min_area"] == 0 and p["gate_margin"] == 0 and p["min_keep_iou"] == 0)
    assert not official["admissible"] and official["sets"]["s"]["worse_gt_2pts"] > 0.5


def test_a_rule_that_loses_a_true_positive_in_a_size_bucket_is_refused():
    """Mean IoU rises in the medium bucket (+1 point) but one instance falls below IoU 0.75: mask
    AP would lose that true positive, so only the rules that leave it alone are admissible."""
    m = len(calibrate.GRID["gate_margin"])
    falls = _rec(5000, (0.76, 0.50), [(0.74, 0.52, 0.95)] + [(0.76, 0.50, 1.0)] * (m - 1))
    rises = _rec(5000, (0.60, 0.40), [(0.64, 0.45, 0.95)] * m)
    _, points = calibrate.search({"s": _set([falls, rises])}, max_worse=1.0)
    ungated = next(p for p in points if p["min_area"] == 0 and p["gate_margin"] == 0 and p["min_keep_iou"] == 0)
    medium = ungated["sets"]["s"]["sizes"]["medium"]
    assert medium["d_iou"] > 0 and medium["d_hits"] == -1 and not ungated["admissible"]
    gated = next(p for p in points if p["min_area"] == 0 and p["gate_margin"] > 0 and p["min_keep_iou"] == 0)
    assert gated["sets"]["s"]["sizes"]["medium"]["d_hits"] == 0 and gated["admissible"]


def test_a_rule_that_lowers_a_buckets_mask_ap_is_refused_even_at_equal_hits():
    """The detector's most confident detection drops below IoU 0.85 while a less confident one rises
    above 0.9: mean IoU and the true-positive count are unchanged or up, but COCO's AP (which ranks
    by score) falls, so only the rules that leave the pair alone are admissible."""
    m = len(calibrate.GRID["gate_margin"])
    sure = {**_rec(5000, (0.854, 0.5), [(0.842, 0.5, 0.95)] + [(0.854, 0.5, 1.0)] * (m - 1)), "score": 0.99, "gt_id": 1}
    unsure = {**_rec(5000, (0.872, 0.5), [(0.909, 0.55, 0.95)] * m), "score": 0.5, "gt_id": 2}
    _, points = calibrate.search({"s": _set([sure, unsure])}, max_worse=1.0)
    ungated = next(p for p in points if p["min_area"] == 0 and p["gate_margin"] == 0 and p["min_keep_iou"] == 0)
    medium = ungated["sets"]["s"]["sizes"]["medium"]
    assert medium["d_iou"] > 0 and medium["d_hits"] == 0 and medium["ap_after"] < medium["ap_before"]
    assert not ungated["admissible"]
    gated = next(p for p in points if p["min_area"] == 0 and p["gate_margin"] > 0 and p["min_keep_iou"] == 0)
    assert gated["sets"]["s"]["sizes"]["medium"]["ap_after"] > gated["sets"]["s"]["sizes"]["medium"]["ap_before"]
    assert gated["admissible"]


def test_acceptance_rule_in_the_search_keeps_coarse_figures():
    m = len(calibrate.GRID["gate_margin"])
    recs = [_rec(20000, (0.8, 0.5), [(0.3, 0.1, 0.35)] * m)]  # a redrawn object: reject it
    best, _ = calibrate.search({"s": _set(recs)}, max_worse=0.0)
    fig = best["sets"]["s"]
    assert best["admissible"] and best["min_keep_iou"] >= 0.5 and fig["d_iou"] == 0 and fig["refined_share"] == 0


def test_calibrate_job_writes_a_checkpoint_with_the_chosen_rules(tmp_path, capsys):
    from bpr_core.synthetic import write_dataset

    write_dataset(tmp_path / "val", 4, seed=9)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "m.pt", build_model("hrnet_lite"), BPRConfig(model="hrnet_lite", input_size=64), {"name": "t"})
    args = ["--checkpoint", str(tmp_path / "m.pt"), "--sets", str(tmp_path / "val"), "--out", str(tmp_path / "c.json"),
            "--write", str(tmp_path / "cal.pt"), "--threads", "1", "--records", str(tmp_path / "rec")]
    code = calibrate.main(args)
    assert "records reused" not in capsys.readouterr().err
    rep = json.loads((tmp_path / "c.json").read_text())
    assert code == (0 if rep["admissible"] else 1)
    n_points = int(np.prod([len(v) for v in calibrate.GRID.values()]))
    assert len(rep["points"]) == n_points and rep["official_figures"]["val"]["n"] > 5
    ck = load_checkpoint(tmp_path / "cal.pt")
    assert {k: getattr(ck.config, k) for k in rep["chosen"]} == rep["chosen"]
    assert ck.model_card["do_no_harm"]["calibrated_on"] == ["val"]
    # a second run reuses the network's outputs and decides the same; a changed set does not reuse them
    assert calibrate.main(args) == code and "records reused" in capsys.readouterr().err
    assert json.loads((tmp_path / "c.json").read_text()) == rep
    coarse = tmp_path / "val" / "coarse.json"
    coarse.write_text(json.dumps(json.loads(coarse.read_text())[:-1]))
    calibrate.main(args)
    assert "records reused" not in capsys.readouterr().err


def test_bucket_ap_equals_cocoeval_per_size():
    """The calibrator's per-size mask AP is COCOeval's: GT boxes of three sizes and two categories
    on one image, detections with varied IoU and scores (duplicates, false positives of each size,
    a missed GT), compared bucket by bucket with pycocotools at the same masks."""
    import io
    from contextlib import redirect_stdout

    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    h, w = 400, 600
    rng = np.random.default_rng(5)

    def box(x, y, bw, bh):
        m = np.zeros((h, w), np.uint8)
        m[y:y + bh, x:x + bw] = 1
        return m

    gts = [box(10, 10, 20, 20), box(50, 10, 25, 30), box(100, 10, 60, 60), box(200, 10, 80, 70),
           box(300, 10, 150, 120), box(10, 200, 200, 150), box(470, 10, 12, 12),  # never detected
           box(500, 100, 40, 40), box(500, 200, 90, 120), box(230, 100, 14, 14)]
    cats = [1, 1, 1, 2, 1, 2, 1, 2, 2, 2]
    dets = []  # (mask, score, gt index or None, category)
    for gi, g in enumerate(gts):
        if gi == 6:
            continue
        ys, xs = np.nonzero(g)
        for k in range(2 if gi in (2, 4, 8) else 1):  # duplicates
            shift = int(rng.integers(0, max(2, (xs.max() - xs.min()) // 6)))
            dets.append((np.roll(g, shift, axis=1), float(rng.uniform(0.3, 1.0)), gi, cats[gi]))
    dets += [(box(250, 300, 15, 15), 0.95, None, 1), (box(400, 300, 50, 40), 0.5, None, 1), (box(300, 200, 110, 100), 0.2, None, 2),
             (box(460, 300, 20, 20), 0.7, None, 2)]

    gt_json = {"images": [{"id": 1, "width": w, "height": h, "file_name": "x.png"}],
               "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}], "annotations": []}
    for i, g in enumerate(gts):
        r = mask_utils.encode(np.asfortranarray(g))
        r["counts"] = r["counts"].decode()
        gt_json["annotations"].append({"id": i + 1, "image_id": 1, "category_id": cats[i], "segmentation": r,
                                       "area": float(g.sum()), "bbox": list(mask_utils.toBbox(r)), "iscrowd": 0})
    results, recs, unmatched = [], [], []
    for m, score, gi, cat in dets:
        r = mask_utils.encode(np.asfortranarray(m))
        r["counts"] = r["counts"].decode()
        results.append({"image_id": 1, "category_id": cat, "segmentation": r, "score": score})
        if gi is None:
            unmatched.append({"score": score, "coarse_area": int(m.sum()), "category_id": cat})
        else:
            iou = float((m & gts[gi]).sum() / (m | gts[gi]).sum())
            assert iou >= 0.5
            recs.append({"score": score, "gt_id": gi + 1, "gt_area": float(gts[gi].sum()), "coarse_area": int(m.sum()), "iou": iou,
                         "category_id": cat})
    with redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt_json
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(results), "segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    want = dict(zip(("small", "medium", "large"), ev.stats[3:6]))
    ious = np.array([r["iou"] for r in recs])
    areas = [(float(g.sum()), c) for g, c in zip(gts, cats)]
    for name, lo, hi in calibrate.SIZES:
        assert calibrate.bucket_ap(ious, recs, unmatched, areas, lo, hi) == pytest.approx(want[name], abs=1e-12), name
    assert 0 < want["small"] < 1 and 0 < want["medium"] < 1 and 0 < want["large"] < 1  # the case is not trivial
