import numpy as np
import pytest

from bpr_core import rle

from .masks import random_blob_mask


def test_encode_decode_roundtrip():
    rng = np.random.default_rng(0)
    for _ in range(5):
        m = random_blob_mask(rng, 37, 53)
        r = rle.encode(m)
        assert isinstance(r["counts"], str) and r["size"] == [37, 53]
        assert np.array_equal(rle.decode(r), m)
        assert rle.area(r) == int(m.sum())
    ms = np.stack([random_blob_mask(rng, 20, 30) for _ in range(3)])
    assert [rle.decode(r).tolist() for r in rle.encode_many(ms)] == ms.tolist()


def test_uncompressed_and_polygon_inputs():
    m = np.zeros((10, 8), bool)
    m[2:5, 1:4] = True
    # uncompressed RLE: column-major runs starting with zeros
    flat = m.flatten(order="F").astype(int)
    counts, cur, run = [], 0, 0
    for v in flat:
        if v != cur:
            counts.append(run)
            cur, run = v, 0
        run += 1
    counts.append(run)
    r = rle.segmentation_to_rle({"size": [10, 8], "counts": counts}, 10, 8)
    assert np.array_equal(rle.decode(r), m)
    poly = [[1.0, 2.0, 4.0, 2.0, 4.0, 5.0, 1.0, 5.0]]
    pm = rle.decode(rle.segmentation_to_rle(poly, 10, 8))
    assert pm.sum() > 0 and pm[3, 2]


def test_corrupt_rle_raises():
    with pytest.raises(ValueError):
        rle.segmentation_to_rle({"size": [4, 4], "counts": [3, 2]}, 4, 4)
