"""Overlay pictures: size capped, legend drawn, lines visible on any background, change measured
on RLEs exactly."""

import numpy as np

from bpr_core import BPRConfig, rle
from pipeline.visualize import COARSE, HALO, REFINED, changed_pixels, overlay, side_by_side

CFG = BPRConfig(patch_size=16)


def _square(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_size_is_capped_and_small_images_are_enlarged():
    big = overlay(np.zeros((3000, 2000, 3), np.uint8), [_square(3000, 2000, 500, 2500, 400, 1600)], [], CFG, max_side=1600)
    assert max(big.shape[:2]) == 1600 and big.shape[:2] == (1600, 1067)
    small = overlay(np.zeros((50, 60, 3), np.uint8), [_square(50, 60, 10, 40, 10, 50)], [], CFG)
    assert small.shape[:2] == (100, 120)


def test_lines_have_a_halo_and_stay_visible_on_their_own_colour():
    for background in (COARSE, REFINED, (255, 0, 0), (255, 255, 255)):
        image = np.full((120, 160, 3), background, np.uint8)
        c, r = _square(120, 160, 40, 90, 50, 120), _square(120, 160, 42, 92, 52, 118)
        vis = overlay(image, [c], [r], CFG, legend=False)
        colours = {tuple(int(v) for v in px) for px in vis.reshape(-1, 3)}
        assert tuple(HALO) in colours and tuple(COARSE) in colours and tuple(REFINED) in colours
        # each coloured contour pixel has a halo pixel next to it
        ys, xs = np.nonzero(np.all(vis == REFINED, axis=2))
        assert len(ys) and all((vis[max(0, y - 2) : y + 3, max(0, x - 2) : x + 3] == HALO).all(axis=2).any() for y, x in zip(ys, xs))


def test_legend_names_each_colour():
    vis = overlay(np.full((200, 300, 3), 128, np.uint8), [], [], CFG)
    corner = vis[:70, :160]
    for colour in (COARSE, REFINED):
        assert np.all(corner == colour, axis=2).any()
    assert np.all(corner == (255, 255, 255), axis=2).sum() > 50  # the text
    assert not np.all(vis[100:, 200:] == (255, 255, 255), axis=2).any()


def test_changed_pixels_from_rles_is_the_xor_count():
    rng = np.random.default_rng(0)
    for _ in range(5):
        a, b = rng.random((40, 50)) < 0.3, rng.random((40, 50)) < 0.5
        assert changed_pixels(rle.encode(a), rle.encode(b)) == int((a ^ b).sum())


def test_side_by_side_rows():
    img = np.zeros((30, 40, 3), np.uint8)
    m = _square(30, 40, 5, 20, 5, 30)
    pic = side_by_side([(img, m, m, "a"), (img, m, ~m, "b")], cell=64)
    assert pic.shape == (2 * (64 + 20), 2 * 64 + 4, 3)
