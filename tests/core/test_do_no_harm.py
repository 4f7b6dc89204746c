"""Do-no-harm rules (confidence gate, per-instance acceptance, small objects), checkpoint-owned
geometry, and the shipped model on masks that are already right."""

import numpy as np
import pytest
import torch

from bpr_core import BPRConfig, IdentityPatchRefiner, Refiner, paste_patches, reassemble, save_checkpoint, skip_reason
from bpr_core.formats import InputError
from bpr_core.model import build_model
from bpr_core.refiner import make_patch_refiner

from .masks import random_blob_mask


def _image(rng, h, w):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_gate_keeps_coarse_where_the_network_is_unsure():
    cfg = BPRConfig(patch_size=4, gate_margin=0.2)
    coarse = np.zeros((4, 4), bool)
    coarse[:, :2] = True
    probs = np.array([[[0.9, 0.6, 0.6, 0.1]] * 4], dtype=np.float32)  # one patch covering everything
    probs[0, :, 0] = [0.9, 0.55, 0.25, 0.05]  # column 0 (coarse on): stays on unless p < 0.3
    out = paste_patches(coarse, np.array([[0, 0, 4, 4]]), probs, cfg)
    # column 0: on, on (0.55 unsure), off (0.25 < 0.3), off; column 1 (coarse on, p 0.6 unsure): on;
    # column 2 (coarse off, p 0.6 unsure): off; column 3 (p 0.1): off
    assert out[:, 0].tolist() == [True, True, False, False]
    assert out[:, 1].all() and not out[:, 2].any() and not out[:, 3].any()
    # without the gate the official threshold decides every covered pixel
    official = paste_patches(coarse, np.array([[0, 0, 4, 4]]), probs, cfg.replace(gate_margin=0.0))
    assert official[:, 2].all() and official[:, 0].tolist() == [True, True, False, False]


@pytest.mark.parametrize("margin", [0.0, 0.1, 0.3])
def test_gate_matches_a_per_pixel_reference_over_overlapping_patches(margin):
    rng = np.random.default_rng(0)
    cfg = BPRConfig(patch_size=16, gate_margin=margin)
    coarse = random_blob_mask(rng, 40, 40)
    boxes = np.array([[0, 0, 16, 16], [8, 8, 24, 24], [20, 20, 36, 36], [30, 30, 46, 46]])
    probs = rng.random((4, 16, 16)).astype(np.float32)
    sums, counts = np.zeros((40, 40)), np.zeros((40, 40))
    for (x0, y0, x1, y1), p in zip(boxes, probs):
        h, w = min(y1, 40) - y0, min(x1, 40) - x0
        sums[y0 : y0 + h, x0 : x0 + w] += p[:h, :w]
        counts[y0 : y0 + h, x0 : x0 + w] += 1
    mean = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    expect = coarse.copy()
    cov = counts > 0
    if margin == 0:
        expect[cov] = mean[cov] > 0.5
    else:
        expect[cov & (mean > 0.5 + margin)] = True
        expect[cov & (mean < 0.5 - margin)] = False
    assert np.array_equal(paste_patches(coarse, boxes, probs, cfg), expect)


def test_acceptance_rule_rejects_a_redrawn_object_bit_for_bit():
    coarse = np.zeros((64, 64), bool)
    coarse[16:48, 16:48] = True
    boxes = np.array([[0, 0, 64, 64]])
    wipe = np.zeros((1, 64, 64), np.float32)  # the network erases the whole object
    out, reason = reassemble(coarse, boxes, wipe, BPRConfig(min_keep_iou=0.5))
    assert reason == "change_rejected" and np.array_equal(out, coarse)
    nudge = coarse[None].astype(np.float32)
    nudge[0, 16:48, 47] = 0.0  # one column off: IoU 31/32 with the coarse mask
    out, reason = reassemble(coarse, boxes, nudge, BPRConfig(min_keep_iou=0.9))
    assert reason == "" and out.sum() == coarse.sum() - 32
    out, reason = reassemble(coarse, boxes, wipe, BPRConfig(min_keep_iou=0.0))  # official: no rule
    assert reason == "" and not out.any()


def test_skip_reason_small_object_policy():
    cfg = BPRConfig(min_area=100)
    assert skip_reason(0, cfg) == "empty"
    assert skip_reason(99, cfg) == "too_small"
    assert skip_reason(100, cfg) == ""


@pytest.mark.parametrize("rules", [dict(gate_margin=0.3), dict(min_keep_iou=0.95), dict(gate_margin=0.1, min_keep_iou=0.5, min_area=50)])
def test_identity_refiner_bit_for_bit_under_every_rule(rules):
    rng = np.random.default_rng(7)
    masks = np.stack([random_blob_mask(rng, 90, 120) for _ in range(4)])
    out = Refiner(method=IdentityPatchRefiner(), config=BPRConfig(**rules)).refine(_image(rng, 90, 120), masks)
    assert np.array_equal(out, masks)


def test_refiner_reports_rejected_instances():
    class Eraser:
        name = "eraser"

        def predict(self, img, msk):
            return np.zeros(msk.shape, np.float32)

    masks = np.zeros((1, 80, 80), bool)
    masks[0, 20:60, 20:60] = True
    rng = np.random.default_rng(0)
    out, info = Refiner(method=Eraser(), config=BPRConfig(min_keep_iou=0.5)).refine(_image(rng, 80, 80), masks, return_info=True)
    assert info[0].reason == "change_rejected" and np.array_equal(out, masks)


# --- the checkpoint owns its geometry -------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt48(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "p48.pt"
    torch.manual_seed(0)
    save_checkpoint(path, build_model("hrnet_lite"), BPRConfig(model="hrnet_lite", input_size=64, patch_size=48, gate_margin=0.15),
                    {"name": "p48", "version": "t"})
    return path


def test_checkpoint_patch_size_wins_when_not_given(ckpt48):
    _, cfg, _ = make_patch_refiner("network", ckpt48, "cpu", {"nms_iou": 0.3})
    assert cfg.patch_size == 48 and cfg.nms_iou == 0.3 and cfg.gate_margin == 0.15


def test_overriding_the_checkpoint_patch_size_is_an_error(ckpt48):
    with pytest.raises(ValueError, match="patch_size=48"):
        make_patch_refiner("network", ckpt48, "cpu", {"patch_size": 64})
    with pytest.raises(ValueError, match="patch_size=48"):
        make_patch_refiner("network", ckpt48, "cpu", BPRConfig())  # a full config that disagrees
    with pytest.raises(ValueError, match="context_pad"):
        make_patch_refiner("network", ckpt48, "cpu", {"context_pad": 4})
    _, cfg, _ = make_patch_refiner("network", ckpt48, "cpu", {"patch_size": 48})  # repeating it is fine
    assert cfg.patch_size == 48


def test_refine_cli_keeps_the_checkpoint_patch_size_and_refuses_another(ckpt48, tmp_path):
    from jobs import refine
    from pipeline.refine_job import check_model

    args = refine.build_parser().parse_args(["--checkpoint", str(ckpt48), "--out", str(tmp_path)])
    opts = refine.options_from_args(args)
    assert "patch_size" not in opts.config
    _, cfg, _ = make_patch_refiner("network", ckpt48, "cpu", opts.config)
    assert cfg.patch_size == 48
    # an explicit conflicting flag fails before Ray starts, naming the checkpoint
    args = refine.build_parser().parse_args(["--checkpoint", str(ckpt48), "--out", str(tmp_path), "--patch-size", "64"])
    with pytest.raises(InputError, match="p48.pt.*patch_size=48"):
        check_model(refine.options_from_args(args))
    args = refine.build_parser().parse_args(["--checkpoint", str(ckpt48), "--out", str(tmp_path), "--official"])
    _, cfg, _ = make_patch_refiner("network", ckpt48, "cpu", refine.options_from_args(args).config)
    assert (cfg.gate_margin, cfg.min_keep_iou, cfg.min_area) == (0, 0, 0)


# --- the shipped model leaves right masks alone ---------------------------------------------


def test_shipped_model_does_no_harm_when_the_coarse_mask_is_already_right():
    """Coarse masks equal to the ground truth: the shipped model with its calibrated rules must
    keep every instance within 2 IoU points of the truth (it may not 'improve' a right mask)."""
    from bpr_core.synthetic import make_image, mask_iou

    torch.set_num_threads(1)
    refiner = Refiner(device="cpu")
    worst, n = 1.0, 0
    for seed in range(6):
        rng = np.random.default_rng([41, seed])
        image, objects = make_image(rng, 200, 260)
        gt = np.stack([m for _, m in objects])
        out = refiner.refine(image, gt)
        for g, o in zip(gt, out):
            worst = min(worst, mask_iou(o, g))
            n += 1
    assert n >= 10 and worst >= 0.98, (n, worst)


def test_tta_flip_averages_the_patch_and_its_mirror():
    from bpr_core.refiner import NetworkPatchRefiner

    class Ramp(torch.nn.Module):  # foreground logit grows left to right: not mirror-symmetric
        def forward(self, image, mask):
            x = torch.linspace(-3, 3, image.shape[-1]).view(1, 1, 1, -1).expand(image.shape[0], 1, image.shape[-2], -1)
            return torch.cat([torch.zeros_like(x), x], dim=1)

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    msk = rng.integers(0, 2, (2, 16, 16), dtype=np.uint8)
    cfg = BPRConfig(patch_size=16, input_size=16)
    plain = NetworkPatchRefiner(Ramp(), cfg, device="cpu").predict(img, msk)
    tta = NetworkPatchRefiner(Ramp(), cfg.replace(tta_flip=True), device="cpu").predict(img, msk)
    assert not np.allclose(plain, plain[..., ::-1])
    np.testing.assert_allclose(tta, 0.5 * (plain + plain[..., ::-1]), atol=1e-6)
