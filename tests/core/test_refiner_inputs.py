"""The library takes what detectors give: bool, 0/1, 0/255 and float masks; HxWx3 uint8, 3xHxW
float and grey images; numpy or torch; one image or a list (batched together); a thread cap; and
can return probabilities."""

import numpy as np
import pytest
import torch

from bpr_core import BPRConfig, Refiner
from bpr_core.flow import batch_bounds
from bpr_core.refiner import IdentityPatchRefiner, as_masks

from .masks import random_blob_mask

CFG = BPRConfig(patch_size=16)


def _scene(seed=0, h=64, w=80):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    masks = np.stack([random_blob_mask(rng, h, w) for _ in range(3)])
    return image, masks


class Recording:
    """Identity patches, recording each network call's batch size and torch's thread count."""

    name = "recording"

    def __init__(self, value=None):
        self.calls, self.threads, self.value = [], [], value

    def predict(self, img, msk):
        self.calls.append(len(img))
        self.threads.append(torch.get_num_threads())
        if self.value is not None:
            return np.full(msk.shape, self.value, np.float32)
        return (msk > 0).astype(np.float32)


def test_every_mask_kind_means_the_same_masks():
    image, masks = _scene()
    r = Refiner(method=IdentityPatchRefiner(), config=CFG)
    want = r.refine(image, masks)
    assert np.array_equal(want, masks)  # identity: bit for bit
    soft = np.where(masks, 0.7, 0.3).astype(np.float32)  # a 0.3 background is background, not "non-zero"
    kinds = {"uint8 0/1": masks.astype(np.uint8), "uint8 0/255": masks.astype(np.uint8) * 255, "float probs": soft,
             "float64": soft.astype(np.float64), "int64": masks.astype(np.int64), "list of HxW": list(masks),
             "torch bool": torch.from_numpy(masks), "torch float": torch.from_numpy(soft)}
    for kind, m in kinds.items():
        got = r.refine(image, m)
        if isinstance(m, torch.Tensor):
            assert isinstance(got, torch.Tensor) and got.device == m.device and got.dtype == torch.bool, kind
            got = got.numpy()
        assert isinstance(got, np.ndarray) and got.dtype == bool and np.array_equal(got, want), kind


def test_float_threshold_is_strictly_above_half():
    m, _ = as_masks(np.array([[0.5, 0.5000001, 0.0, 1.0]], np.float32), (1, 4))
    assert m.tolist() == [[[False, True, False, True]]]


def test_image_kinds_give_the_same_result():
    image, masks = _scene(1)
    r = Refiner(method="guided-filter", config=CFG)
    want = r.refine(image, masks)
    chw_float = torch.from_numpy(image.astype(np.float32) / 255.0).permute(2, 0, 1)
    assert np.array_equal(r.refine(chw_float, masks), want)
    assert np.array_equal(r.refine(image.astype(np.float64) / 255.0, masks), want)
    grey = image[:, :, 0]
    assert np.array_equal(r.refine(grey, masks), r.refine(np.repeat(grey[:, :, None], 3, 2), masks))


def test_a_list_of_images_is_batched_together_and_matches_single_calls():
    scenes = [_scene(s) for s in (2, 3, 4)]
    rec = Recording()
    r = Refiner(method=rec, config=CFG, batch_size=10_000)
    out = r.refine([s[0] for s in scenes], [s[1] for s in scenes], return_info=True)
    single = Refiner(method=Recording(), config=CFG)
    for (image, masks), (got, infos) in zip(scenes, out):
        want, want_infos = single.refine(image, masks, return_info=True)
        assert np.array_equal(got, want) and [i.reason for i in infos] == [i.reason for i in want_infos]
    # the three images' patches share one run of batches (full ones, then powers of two), not one per image
    per_image = [sum(i.num_patches for i in infos) for _, infos in out]
    assert rec.calls == [b - a for a, b in batch_bounds(sum(per_image), 10_000)]
    assert rec.calls[0] > max(per_image)


def test_threads_apply_during_the_call_only():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        rec = Recording()
        image, masks = _scene(5)
        Refiner(method=rec, config=CFG, threads=1).refine(image, masks)
        assert rec.threads and set(rec.threads) == {1} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="threads must be >= 1"):
        Refiner(method=rec, config=CFG, threads=0)


def test_probabilities_are_the_patch_mean_where_covered_and_the_coarse_mask_elsewhere():
    image, masks = _scene(6)
    r = Refiner(method=Recording(value=0.2), config=CFG)
    refined, infos, probs = r.refine(image, masks, return_info=True, return_probs=True)
    assert probs.shape == masks.shape and probs.dtype == np.float32
    for n, info in enumerate(infos):
        covered = probs[n] == np.float32(0.2)  # 0.2 = 51/255: exact after the uint8 hand-over
        assert info.num_patches > 0 and covered.any()
        assert np.array_equal(probs[n][~covered], masks[n][~covered].astype(np.float32))
        assert not refined[n][covered].any()  # 0.2 < 0.5: background wherever a patch covers
        assert np.array_equal(refined[n][~covered], masks[n][~covered])
    t_refined, t_probs = r.refine(image, torch.from_numpy(masks), return_probs=True)
    assert isinstance(t_probs, torch.Tensor) and np.array_equal(t_probs.numpy(), probs)


def test_network_uint8_path_equals_quantising_its_float_output():
    """NetworkPatchRefiner.predict_u8 (the GPU-feeding path: uint8 in, quantised on the device, one
    synchronisation per call) gives what bpr_core.flow.quantise makes of `predict`, bit for bit."""
    from bpr_core.flow import predict_u8, quantise
    from bpr_core.refiner import make_patch_refiner

    net, cfg, _ = make_patch_refiner("network", None, "cpu")
    rng = np.random.default_rng(3)
    s = cfg.crop_size
    img = rng.integers(0, 256, (70, s, s, 3), dtype=np.uint8)
    msk = (rng.random((70, s, s)) > 0.5).astype(np.uint8)
    got = predict_u8(net, img, msk, batch_size=32)  # 32 + 32 + 4 + 2: the rest in powers of two
    # one short last batch instead (32 + 32 + 6): a patch's output does not depend on its batch
    want = np.concatenate([quantise(net.predict(img[i : i + 32], msk[i : i + 32])) for i in range(0, 70, 32)])
    assert got.dtype == np.uint8 and got.shape == (70, s, s)
    assert np.array_equal(got, want) and 0 < got.mean() < 255


def test_network_sees_only_shape_stable_batches():
    """Calls of any size reach the network in full batches and then powers of two (flow.batch_bounds),
    so its batch shapes come from a fixed set (variable shapes let the CPU heap grow without bound)."""
    from bpr_core.refiner import make_patch_refiner

    net, cfg, _ = make_patch_refiner("network", None, "cpu")
    s, seen = cfg.crop_size, []

    def record(img, msk):
        seen.append(len(img))
        return torch.zeros((len(img), s, s))

    net.predict_tensor = record
    for k in (101, 64, 7):
        seen.clear()
        out = net.predict_u8(np.zeros((k, s, s, 3), np.uint8), np.zeros((k, s, s), np.uint8), 64)
        assert out.shape == (k, s, s) and sum(seen) == k
        assert seen == {101: [64, 32, 4, 1], 64: [64], 7: [4, 2, 1]}[k]


def test_batch_bounds_cover_every_patch_once_in_few_shapes():
    for batch in (64, 48, 1):
        sizes = set()
        for k in range(0, 300):
            bounds = batch_bounds(k, batch)
            if k == 0:
                assert bounds == []
                continue
            assert [a for a, _ in bounds] == [0] + [b for _, b in bounds[:-1]]  # contiguous from 0
            assert bounds[-1][1] == k
            steps = [b - a for a, b in bounds]
            assert steps == sorted(steps, reverse=True)  # full batches first, then the rest shrinking
            sizes.update(steps)
        assert sizes == {batch} | {1 << i for i in range(batch.bit_length()) if 1 << i < batch}
    with pytest.raises(ValueError, match="batch_size"):
        batch_bounds(5, 0)
