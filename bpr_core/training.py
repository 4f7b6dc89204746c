"""Training pieces for the refinement network, framework-free (Ray Train calls them per worker).

- `match_gt`: each coarse instance's ground truth is the same-category GT instance of highest mask
  IoU (as the official tools/split_patches.py); matches below `min_iou` are dropped.
- `augment`: the official pipeline's RandomFlip(0.5) and PhotoMetricDistortion (brightness,
  contrast, saturation, hue; each applied with probability 0.5), batched on tensors.
- `poly_lr`: lr = (base - min) * (1 - step / max_steps) ** power + min (mmseg's poly policy).
- `PatchMetrics`: micro patch IoU of the refined mask and of the coarse input against GT, and the
  boundary F-score (boundary pixels matched within 1 px), summed so workers can all-reduce them.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .config import BPRConfig
from .patches import crop_patches, propose_patches
from .preprocess import normalise, to_network_inputs  # noqa: F401  (normalise is part of this module's API)


def match_gt(coarse: np.ndarray, gts: list[np.ndarray], min_iou: float = 0.5) -> tuple[int, float]:
    """Index of the GT mask with the highest IoU with `coarse` (-1 if below min_iou), and the IoU."""
    best, best_iou = -1, 0.0
    c = coarse.astype(bool)
    for i, g in enumerate(gts):
        union = np.logical_or(c, g).sum()
        iou = float(np.logical_and(c, g).sum() / union) if union else 0.0
        if iou > best_iou:
            best, best_iou = i, iou
    return (best, best_iou) if best_iou >= min_iou else (-1, best_iou)


def training_patches(image: np.ndarray, coarse: np.ndarray, gt: np.ndarray, config: BPRConfig, nms_iou: float = 0.15):
    """(K,S,S,3) image, (K,S,S) coarse and (K,S,S) GT uint8 patches along the coarse boundary."""
    boxes = propose_patches(coarse, config, nms_iou=nms_iou)
    return (boxes, crop_patches(image, boxes, config), crop_patches(coarse.view(np.uint8), boxes, config),
            crop_patches(gt.astype(np.uint8), boxes, config))


def poly_lr(step: int, max_steps: int, base: float = 0.01, power: float = 0.9, min_lr: float = 1e-4) -> float:
    return (base - min_lr) * (1 - min(step, max_steps) / max_steps) ** power + min_lr


def _rgb_to_gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _hue_rotate(x: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate hue by `degrees` (B,) via the YIQ chroma plane (keeps luma)."""
    t = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], device=x.device)
    ti = torch.linalg.inv(t)
    yiq = torch.einsum("ij,bjhw->bihw", t, x)
    a = degrees * math.pi / 180
    cos, sin = torch.cos(a)[:, None, None], torch.sin(a)[:, None, None]
    i, q = yiq[:, 1], yiq[:, 2]
    yiq = torch.stack([yiq[:, 0], i * cos - q * sin, i * sin + q * cos], dim=1)
    return torch.einsum("ij,bjhw->bihw", ti, yiq)


def augment(img: torch.Tensor, msk: torch.Tensor, gt: torch.Tensor, gen: torch.Generator):
    """img Bx3xSxS float in [0,255], msk/gt Bx1xSxS -> augmented copies (flip + photometric)."""
    b = img.shape[0]
    dev = img.device

    def coin():
        return (torch.rand(b, generator=gen) < 0.5).to(dev)

    flip = coin()[:, None, None, None]
    img = torch.where(flip, img.flip(-1), img)
    msk = torch.where(flip, msk.flip(-1), msk)
    gt = torch.where(flip, gt.flip(-1), gt)
    u = lambda lo, hi: (torch.rand(b, generator=gen) * (hi - lo) + lo).to(dev)[:, None, None, None]  # noqa: E731
    img = img + torch.where(coin()[:, None, None, None], u(-32, 32), torch.zeros(1, device=dev))
    img = img.clamp(0, 255)
    img = img * torch.where(coin()[:, None, None, None], u(0.5, 1.5), torch.ones(1, device=dev))
    img = img.clamp(0, 255)
    gray = _rgb_to_gray(img)
    s = torch.where(coin()[:, None, None, None], u(0.5, 1.5), torch.ones(1, device=dev))
    img = (gray + (img - gray) * s).clamp(0, 255)
    hue = torch.where(coin(), (torch.rand(b, generator=gen) * 36 - 18).to(dev), torch.zeros(b, device=dev))
    img = _hue_rotate(img, hue).clamp(0, 255)
    return img, msk, gt


def boundary_map(m: torch.Tensor) -> torch.Tensor:
    """Bx1xHxW {0,1} -> pixels whose 3x3 neighbourhood is mixed (BPR's boundary definition)."""
    mx = F.max_pool2d(m.float(), 3, stride=1, padding=1)
    mn = -F.max_pool2d(-m.float(), 3, stride=1, padding=1)
    return mx > mn


class PatchMetrics:
    """Sums over patches: IoU (refined and coarse vs GT) and boundary precision/recall counts."""

    KEYS = ("inter", "union", "c_inter", "c_union", "bp_hit", "bp_all", "br_hit", "br_all",
            "cbp_hit", "cbp_all", "cbr_hit", "cbr_all", "loss_sum", "n")

    def __init__(self, device="cpu"):
        self.t = torch.zeros(len(self.KEYS), dtype=torch.float64, device=device)

    def update(self, pred: torch.Tensor, coarse: torch.Tensor, gt: torch.Tensor, loss_sum: float = 0.0) -> None:
        p, c, g = pred.bool(), coarse.bool(), gt.bool()
        pb, cb, gb = boundary_map(p), boundary_map(c), boundary_map(g)
        dil = lambda b: F.max_pool2d(b.float(), 3, stride=1, padding=1) > 0  # noqa: E731  1 px tolerance
        gb_d, pb_d, cb_d = dil(gb), dil(pb), dil(cb)
        vals = [(p & g).sum(), (p | g).sum(), (c & g).sum(), (c | g).sum(), (pb & gb_d).sum(), pb.sum(),
                (gb & pb_d).sum(), gb.sum(), (cb & gb_d).sum(), cb.sum(), (gb & cb_d).sum(), gb.sum(),
                loss_sum, p.shape[0]]
        self.t += torch.tensor([float(v) for v in vals], dtype=torch.float64, device=self.t.device)

    def result(self) -> dict:
        d = dict(zip(self.KEYS, self.t.tolist()))
        def f_score(hit_p, all_p, hit_r, all_r):
            prec, rec = d[hit_p] / max(d[all_p], 1), d[hit_r] / max(d[all_r], 1)
            return 2 * prec * rec / max(prec + rec, 1e-12)

        return {
            "patch_iou": d["inter"] / max(d["union"], 1),
            "coarse_patch_iou": d["c_inter"] / max(d["c_union"], 1),
            "boundary_f": f_score("bp_hit", "bp_all", "br_hit", "br_all"),
            "coarse_boundary_f": f_score("cbp_hit", "cbp_all", "cbr_hit", "cbr_all"),
            "loss": d["loss_sum"] / max(d["n"], 1),
            "patches": int(d["n"]),
        }


def to_inputs(batch: dict, config: BPRConfig, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 batch {img BxSxSx3, msk BxSxS, gt BxSxS} -> float img Bx3xIxI in [0,255], msk, gt Bx1xIxI
    (the shared preprocessing path, `bpr_core.preprocess`)."""
    return to_network_inputs(batch["img"], batch["msk"], config, device, batch["gt"])
