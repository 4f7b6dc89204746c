"""Slow, obviously-correct pure-Python references for steps 1-2 of BPR (boundary and proposal).

Loops over pixels and uses the general box IoU formula, so they share no code or shortcut with the
vectorised versions in bpr_core.patches.
"""


def boundary_scores(mask):
    h, w = len(mask), len(mask[0])
    out = [[0.0] * w for _ in range(h)]
    for y in range(h):
        for x in range(w):
            s = 0
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    yy, xx = y + dy, x + dx
                    if 0 <= yy < h and 0 <= xx < w and mask[yy][xx]:
                        s += 1
            out[y][x] = min(abs(s - 9), abs(s)) / 4.5
    return out


def _iou(a, b):
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def propose(mask, patch_size, nms_iou):
    h, w = len(mask), len(mask[0])
    scores = boundary_scores(mask)
    cands = []  # raster order
    for y in range(h):
        for x in range(w):
            if scores[y][x] > 0:
                x1, y1 = x - patch_size // 2, y - patch_size // 2
                cands.append((scores[y][x], (x1, y1, x1 + patch_size, y1 + patch_size)))
    cands = sorted(cands, key=lambda c: -c[0])  # Python's sort is stable
    kept = []
    for _, box in cands:
        if all(_iou(box, k) <= nms_iou for k in kept):
            kept.append(box)
    out = []
    for x1, y1, _, _ in kept:
        x1 = min(max(x1, 0), max(w - patch_size, 0))
        y1 = min(max(y1, 0), max(h - patch_size, 0))
        box = (x1, y1, x1 + patch_size, y1 + patch_size)
        if box not in out:
            out.append(box)
    return out
