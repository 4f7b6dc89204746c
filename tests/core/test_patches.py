import numpy as np
import pytest

from bpr_core import BPRConfig, boundary_points, crop_patches, float_boundary, paste_patches, propose_patches

from .masks import random_blob_mask
from .reference import boundary_scores, propose


@pytest.mark.parametrize("seed", range(6))
def test_float_boundary_matches_reference(seed):
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(5, 40)), int(rng.integers(5, 40))
    m = random_blob_mask(rng, h, w)
    np.testing.assert_allclose(float_boundary(m), np.array(boundary_scores(m.tolist())), rtol=0, atol=1e-7)


def test_boundary_is_nonzero_exactly_on_mixed_neighbourhoods():
    m = np.zeros((9, 9), bool)
    m[3:6, 3:6] = True
    score = float_boundary(m)
    # the 3x3 square's centre is interior, the ring 2..6 is mixed, the rest is pure background
    expected = np.zeros((9, 9), bool)
    expected[2:7, 2:7] = True
    expected[4, 4] = False
    assert np.array_equal(score > 0, expected)
    assert score.max() <= 1.0 and score.min() >= 0.0


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("patch_size,nms_iou", [(8, 0.25), (16, 0.15), (6, 0.55)])
def test_propose_matches_slow_reference_box_for_box(seed, patch_size, nms_iou):
    rng = np.random.default_rng(1000 + seed)
    h, w = int(rng.integers(4, 48)), int(rng.integers(4, 48))
    m = random_blob_mask(rng, h, w)
    cfg = BPRConfig(patch_size=patch_size, nms_iou=nms_iou)
    got = propose_patches(m, cfg)
    want = propose(m.tolist(), patch_size, nms_iou)
    assert [tuple(b) for b in got.tolist()] == want


@pytest.mark.parametrize("shape", [(120, 90), (64, 64), (30, 100), (10, 10)])
def test_boxes_are_in_bounds_and_exact_size(shape):
    rng = np.random.default_rng(7)
    m = random_blob_mask(rng, *shape)
    m[0, :] = True  # touch the border
    cfg = BPRConfig(patch_size=32)
    boxes = propose_patches(m, cfg)
    assert len(boxes) > 0
    assert np.all(boxes[:, 2] - boxes[:, 0] == 32) and np.all(boxes[:, 3] - boxes[:, 1] == 32)
    h, w = shape
    assert np.all(boxes[:, :2] >= 0)
    if h >= 32 and w >= 32:  # otherwise the box is padded beyond the small image
        assert np.all(boxes[:, 2] <= w) and np.all(boxes[:, 3] <= h)
    # every boundary pixel lies inside some box
    xs, ys, _ = boundary_points(m)
    inside = (xs[:, None] >= boxes[None, :, 0]) & (xs[:, None] < boxes[None, :, 2]) & (
        ys[:, None] >= boxes[None, :, 1]) & (ys[:, None] < boxes[None, :, 3])
    assert inside.any(axis=1).sum() > 0


def test_empty_and_full_masks():
    cfg = BPRConfig(patch_size=16)
    assert propose_patches(np.zeros((50, 40), bool), cfg).shape == (0, 4)
    # a full mask has a boundary along the image edge (the official zero padding)
    assert propose_patches(np.ones((50, 40), bool), cfg).shape[0] > 0


def test_crop_then_paste_is_exact_inverse_inside_boxes():
    rng = np.random.default_rng(3)
    coarse = random_blob_mask(rng, 70, 50)
    other = random_blob_mask(rng, 70, 50)
    for cfg in (BPRConfig(patch_size=16), BPRConfig(patch_size=16, context_pad=4)):
        boxes = propose_patches(coarse, cfg)
        probs = crop_patches(other.astype(np.float32), boxes, cfg)
        out = paste_patches(coarse, boxes, probs, cfg)
        covered = np.zeros_like(coarse)
        for x1, y1, x2, y2 in boxes:
            covered[y1:y2, x1:x2] = True
        assert np.array_equal(out[covered], other[covered])
        assert np.array_equal(out[~covered], coarse[~covered])


def test_crop_pads_outside_with_zeros_and_keeps_dtype():
    img = np.full((5, 7, 3), 200, np.uint8)
    cfg = BPRConfig(patch_size=8, context_pad=2)
    boxes = np.array([[0, 0, 8, 8]])
    patch = crop_patches(img, boxes, cfg)
    assert patch.shape == (1, 12, 12, 3) and patch.dtype == np.uint8
    assert np.all(patch[0, 2:7, 2:9] == 200)
    assert patch[0, :2].sum() == 0 and patch[0, 7:].sum() == 0 and patch[0, :, 9:].sum() == 0


def test_paste_averages_overlaps_and_thresholds():
    coarse = np.zeros((4, 6), bool)
    cfg = BPRConfig(patch_size=4, threshold=0.5)
    boxes = np.array([[0, 0, 4, 4], [2, 0, 6, 4]])
    probs = np.stack([np.full((4, 4), 0.9, np.float32), np.full((4, 4), 0.2, np.float32)])
    out = paste_patches(coarse, boxes, probs, cfg)
    assert out[:, :2].all()  # only the first patch: 0.9
    assert out[:, 2:4].all()  # mean 0.55
    assert not out[:, 4:].any()  # only the second: 0.2
    probs_u8 = (probs * 255).round().astype(np.uint8)
    assert np.array_equal(paste_patches(coarse, boxes, probs_u8, cfg), out)
