"""Random and hand-made masks for the core tests (generated, no files)."""

import cv2
import numpy as np


def random_blob_mask(rng, h, w):
    m = np.zeros((h, w), np.uint8)
    for _ in range(rng.integers(1, 4)):
        cx, cy = int(rng.integers(0, w)), int(rng.integers(0, h))
        ax, ay = int(rng.integers(1, max(2, w // 2))), int(rng.integers(1, max(2, h // 2)))
        cv2.ellipse(m, (cx, cy), (ax, ay), float(rng.uniform(0, 180)), 0, 360, 1, -1)
    if rng.random() < 0.5:  # holes / ragged edges
        noise = rng.random((h, w)) < 0.15
        m[noise] ^= 1
    return m.astype(bool)
