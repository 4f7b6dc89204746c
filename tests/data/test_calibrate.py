"""jobs.calibrate: the grid search picks the admissible rule with the best boundary gain, and the
whole job writes a checkpoint that carries it."""

import json

import numpy as np
import torch

from bpr_core import BPRConfig, load_checkpoint, save_checkpoint
from bpr_core.model import build_model
from jobs import calibrate


def _rec(gt_area, before, after_by_margin, coarse_area=None):
    return {"set": "s", "gt_area": gt_area, "coarse_area": coarse_area or gt_area, "before": before, "after": after_by_margin}


def test_search_refuses_rules_that_hurt_and_breaks_ties_to_the_safest_rule():
    m = len(calibrate.GRID["gate_margin"])
    # A large object gains a lot at every margin; a small one loses badly unless min_area skips it
    # (the network is confident, so no gate margin saves it); a medium one is hurt only without a gate.
    large = _rec(20000, (0.80, 0.50), [(0.90, 0.70, 0.85)] * m)
    small = _rec(300, (0.90, 0.80), [(0.50, 0.30, 0.55)] * m)
    medium_after = [(0.70, 0.40, 0.80)] + [(0.86, 0.62, 0.95)] * (m - 1)
    medium = _rec(5000, (0.85, 0.60), medium_after)
    best, points = calibrate.search({"s": [large, small, medium] * 10}, max_worse=0.05)
    assert best["admissible"]
    # Every gate > 0 saves the medium object; min_area 400 and 1024 both skip the small one; the
    # large one's IoU with its coarse mask is 0.85, so acceptance thresholds up to 0.8 keep it.
    # All of those tie on gain: the safest wins.
    assert best["min_area"] == 1024 and best["gate_margin"] == 0.4 and best["min_keep_iou"] == 0.8
    official = next(p for p in points if p["min_area"] == 0 and p["gate_margin"] == 0 and p["min_keep_iou"] == 0)
    assert not official["admissible"] and official["sets"]["s"]["worse_gt_2pts"] > 0.5


def test_acceptance_rule_in_the_search_keeps_coarse_figures():
    m = len(calibrate.GRID["gate_margin"])
    recs = [_rec(20000, (0.8, 0.5), [(0.3, 0.1, 0.35)] * m)]  # a redrawn object: reject it
    best, _ = calibrate.search({"s": recs}, max_worse=0.0)
    fig = best["sets"]["s"]
    assert best["admissible"] and best["min_keep_iou"] >= 0.5 and fig["d_iou"] == 0 and fig["refined_share"] == 0


def test_calibrate_job_writes_a_checkpoint_with_the_chosen_rules(tmp_path):
    from bpr_core.synthetic import write_dataset

    write_dataset(tmp_path / "val", 4, seed=9)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "m.pt", build_model("hrnet_lite"), BPRConfig(model="hrnet_lite", input_size=64), {"name": "t"})
    code = calibrate.main(["--checkpoint", str(tmp_path / "m.pt"), "--sets", str(tmp_path / "val"), "--out", str(tmp_path / "c.json"),
                           "--write", str(tmp_path / "cal.pt"), "--threads", "1"])
    rep = json.loads((tmp_path / "c.json").read_text())
    assert code == (0 if rep["admissible"] else 1)
    n_points = int(np.prod([len(v) for v in calibrate.GRID.values()]))
    assert len(rep["points"]) == n_points and rep["official_figures"]["val"]["n"] > 5
    ck = load_checkpoint(tmp_path / "cal.pt")
    assert {k: getattr(ck.config, k) for k in rep["chosen"]} == rep["chosen"]
    assert ck.model_card["do_no_harm"]["calibrated_on"] == ["val"]
