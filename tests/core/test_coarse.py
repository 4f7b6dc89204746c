"""Coarse-mask recipes: deterministic, plausible, and each one a different kind of error."""

import numpy as np
import pytest

from bpr_core.coarse import MIXTURE, RECIPES, apply_recipe, draw_recipe, make_coarse
from bpr_core.synthetic import mask_iou

from .masks import random_blob_mask


def _object(seed=0, h=160, w=200):
    import cv2

    m = np.zeros((h, w), np.uint8)
    cv2.ellipse(m, (w // 2, h // 2), (60, 40), 20, 0, 360, 1, -1)
    cv2.rectangle(m, (w // 2 - 5, h // 2), (w // 2 + 5, h - 10), 1, -1)  # a thin limb
    return m.astype(bool)


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_is_deterministic_and_order_independent(recipe):
    m = _object()
    a = apply_recipe(m, recipe, np.random.default_rng(3))
    b = apply_recipe(np.asfortranarray(m), recipe, np.random.default_rng(3))  # RLE decodes to Fortran order
    assert a.dtype == bool and a.shape == m.shape and np.array_equal(a, b)


@pytest.mark.parametrize("recipe", [r for r in RECIPES if r != "identity"])
def test_recipe_changes_the_mask_but_keeps_the_object(recipe):
    m = _object()
    ious = [mask_iou(apply_recipe(m, recipe, np.random.default_rng(s)), m) for s in range(8)]
    assert min(ious) > 0.5, ious  # still the same object
    assert np.mean(ious) < 0.995, ious  # but not the same mask


def test_identity_recipe_is_the_ground_truth_and_empty_stays_empty():
    m = _object()
    assert np.array_equal(apply_recipe(m, "identity", np.random.default_rng(0)), m)
    empty = np.zeros((30, 30), bool)
    for r in RECIPES:
        assert not apply_recipe(empty, r, np.random.default_rng(0)).any()


def test_mixture_draws_every_recipe_in_proportion():
    rng = np.random.default_rng(0)
    n = 20000
    used = [draw_recipe(rng) for _ in range(n)]
    for name, p in MIXTURE.items():
        assert abs(used.count(name) / n - p) < 4 * np.sqrt(p * (1 - p) / n), (name, used.count(name))
    assert set(MIXTURE) == set(RECIPES) and abs(sum(MIXTURE.values()) - 1) < 1e-9


def test_make_coarse_reports_the_recipe_it_used():
    m = random_blob_mask(np.random.default_rng(1), 80, 80)
    for seed in range(10):
        c, name = make_coarse(m, np.random.default_rng(seed), "mix")
        assert np.array_equal(c, apply_recipe(m, name, _after_draw(seed)))
    c, name = make_coarse(m, np.random.default_rng(0), "polygon")
    assert name == "polygon"


def _after_draw(seed):
    rng = np.random.default_rng(seed)
    draw_recipe(rng)
    return rng


def test_unknown_recipe_is_named():
    with pytest.raises(ValueError, match="unknown coarse recipe 'blurry'"):
        apply_recipe(_object(), "blurry", np.random.default_rng(0))
