"""Training-set builder: images + coarse results + COCO GT -> a Ray Dataset of patch triples.

Each coarse instance is matched to the same-category GT instance of highest mask IoU (official
tools/split_patches.py); matches below `min_iou` (default 0.5) are dropped, because a patch whose
"ground truth" is another object teaches the network to hallucinate. Patches are proposed with the
training NMS threshold (default 0.15, the official COCO recipe, denser than inference's 0.25).
Rows: img (S,S,3) uint8, msk (S,S) uint8 coarse, gt (S,S) uint8, plus image_id/instance_id.
No per-patch files: the dataset streams, and can be written to Parquet for reuse.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pyarrow as pa

from bpr_core import BPRConfig
from bpr_core import rle as rle_utils
from bpr_core.formats import load_coco_gt, load_image_index, read_results_json
from bpr_core.training import match_gt, training_patches

from .stages import ImageReader


def instance_table(images: str, coarse: str, gt: str, sample: int | None = None, seed: int = 0) -> pa.Table:
    """One row per coarse instance with its image file and the RLEs of same-category GT instances."""
    from .storage import local_file

    gt, coarse = local_file(gt, what="annotations"), local_file(coarse, what="coarse results")
    coco = load_coco_gt(gt)
    index = load_image_index(gt)
    rows = read_results_json(coarse, index)
    if sample is not None and sample < len(rows):
        pick = np.sort(np.random.default_rng(seed).choice(len(rows), sample, replace=False))
        rows = [rows[i] for i in pick]
    gts = defaultdict(list)
    for a in coco.loadAnns(coco.getAnnIds()):
        if a.get("iscrowd", 0):
            continue
        r = coco.annToRLE(a)
        c = r["counts"]
        gts[(a["image_id"], a["category_id"])].append(c.decode() if isinstance(c, bytes) else c)
    out = []
    for r in rows:
        if r["image_id"] not in index:
            continue
        out.append({"image_id": r["image_id"], "instance_id": r["instance_id"], "file_name": index[r["image_id"]].file_name,
                    "rle_counts": r["rle_counts"], "rle_h": r["rle_h"], "rle_w": r["rle_w"],
                    "gt_counts": gts.get((r["image_id"], r["category_id"]), [])})
    return pa.Table.from_pylist(out)


class MatchAndExtract:
    """Instance rows -> training patch rows (image, coarse mask, matched GT mask)."""

    def __init__(self, images_uri: str, config: dict, nms_iou: float, min_iou: float):
        import cv2

        cv2.setNumThreads(1)
        self.reader = ImageReader(images_uri)  # the same path confinement and EXIF policy as refinement
        self.cfg = BPRConfig.from_dict(config)
        self.nms_iou, self.min_iou = nms_iou, min_iou

    def __call__(self, batch: dict) -> dict:
        s = self.cfg.crop_size
        cols = {k: [] for k in ("image_id", "instance_id", "img", "msk", "gt")}
        cache_key, image = None, None
        for i in np.argsort(batch["image_id"], kind="stable"):
            if batch["file_name"][i] != cache_key:
                cache_key = batch["file_name"][i]
                image = self.reader.read(str(cache_key))[0]
            size = [int(batch["rle_h"][i]), int(batch["rle_w"][i])]
            coarse = rle_utils.decode({"size": size, "counts": batch["rle_counts"][i]})
            gts = [rle_utils.decode({"size": size, "counts": c}) for c in batch["gt_counts"][i]]
            j, _ = match_gt(coarse, gts, self.min_iou)
            if j < 0:
                continue
            boxes, img_p, msk_p, gt_p = training_patches(image, coarse, gts[j], self.cfg, self.nms_iou)
            cols["image_id"].extend([batch["image_id"][i]] * len(boxes))
            cols["instance_id"].extend([batch["instance_id"][i]] * len(boxes))
            cols["img"].extend(img_p)
            cols["msk"].extend(msk_p)
            cols["gt"].extend(gt_p)
        if not cols["img"]:
            return {"image_id": np.zeros(0, np.int64), "instance_id": np.zeros(0, np.int64),
                    "img": np.zeros((0, s, s, 3), np.uint8), "msk": np.zeros((0, s, s), np.uint8), "gt": np.zeros((0, s, s), np.uint8)}
        return {"image_id": np.asarray(cols["image_id"], np.int64), "instance_id": np.asarray(cols["instance_id"], np.int64),
                "img": np.stack(cols["img"]), "msk": np.stack(cols["msk"]), "gt": np.stack(cols["gt"])}


def build_patch_dataset(images: str, coarse: str, gt: str, config: BPRConfig, nms_iou: float = 0.15, min_iou: float = 0.5,
                        sample: int | None = None, seed: int = 0, actors: int = 1):
    import ray
    from ray.data import ActorPoolStrategy

    table = instance_table(images, coarse, gt, sample, seed)
    ds = ray.data.from_arrow(table)
    return ds.map_batches(MatchAndExtract, fn_constructor_args=(images, config.to_dict(), nms_iou, min_iou), batch_size=32,
                          compute=ActorPoolStrategy(size=actors), num_cpus=0.5, batch_format="numpy")
