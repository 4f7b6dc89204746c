import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from bpr_core import BPRConfig, IdentityPatchRefiner, Refiner, load_checkpoint, save_checkpoint
from bpr_core.model import build_model
from bpr_core.refiner import DEFAULT_WEIGHTS, NetworkPatchRefiner

from .masks import random_blob_mask


def _image(rng, h, w):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


CASES = {
    "touching_borders": (96, 80, lambda m: m.__setitem__((slice(None), slice(0, 10)), True)),
    "one_pixel": (50, 60, lambda m: (m.fill(False), m.__setitem__((20, 30), True))),
    "one_pixel_in_corner": (50, 60, lambda m: (m.fill(False), m.__setitem__((0, 59), True))),
    "empty": (40, 40, lambda m: m.fill(False)),
    "whole_image": (70, 90, lambda m: m.fill(True)),
    "smaller_than_patch": (20, 33, None),
    "non_square": (37, 150, None),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("cfg", [BPRConfig(), BPRConfig(patch_size=16, context_pad=3), BPRConfig(patch_size=31, nms_iou=0.55)])
def test_identity_refiner_returns_input_bit_for_bit(case, cfg):
    h, w, edit = CASES[case]
    rng = np.random.default_rng(hash(case) % 2**32)
    masks = np.stack([random_blob_mask(rng, h, w) for _ in range(3)])
    if edit is not None:
        edit(masks[0])
    refiner = Refiner(method=IdentityPatchRefiner(), config=cfg)
    out, info = refiner.refine(_image(rng, h, w), masks, return_info=True)
    assert out.dtype == bool and out.shape == masks.shape
    assert np.array_equal(out, masks)
    if case == "empty":
        assert info[0].reason == "empty" and info[0].num_patches == 0
    else:
        assert info[0].reason == "refined" and info[0].num_patches > 0


def test_identity_through_network_path_geometry():
    """The network refiner's resize in and out is exact for a 2x nearest/bilinear pair, so a
    model that copies the mask channel to the logits returns the coarse masks bit for bit."""

    class CopyMask(torch.nn.Module):
        def forward(self, image, mask):
            return torch.cat([1 - mask, mask], dim=1) * 20.0

    cfg = BPRConfig(patch_size=64, input_size=128)
    pr = NetworkPatchRefiner(CopyMask(), cfg, device="cpu")
    rng = np.random.default_rng(5)
    masks = np.stack([random_blob_mask(rng, 150, 130) for _ in range(2)])
    out = Refiner(method=pr, config=cfg).refine(_image(rng, 150, 130), masks)
    assert np.array_equal(out, masks)


def test_min_area_passes_small_instances_through():
    rng = np.random.default_rng(1)
    masks = np.zeros((2, 60, 60), bool)
    masks[0, 10:13, 10:13] = True
    masks[1, 20:50, 20:50] = True
    out, info = Refiner(method="guided-filter", config=BPRConfig(min_area=20)).refine(_image(rng, 60, 60), masks, return_info=True)
    assert info[0].reason == "too_small" and np.array_equal(out[0], masks[0])
    assert info[1].reason == "refined"


def test_bad_inputs_are_named():
    r = Refiner(method="identity")
    with pytest.raises(ValueError, match=r"image must be HxWx3 \(or 3xHxW, or HxW grey\), got shape \(10, 10, 4\)"):
        r.refine(np.zeros((10, 10, 4), np.uint8), np.zeros((1, 10, 10), bool))
    with pytest.raises(ValueError, match=r"float image must hold values in \[0, 1\]"):
        r.refine(np.full((10, 10, 3), 200.0), np.zeros((1, 10, 10), bool))
    with pytest.raises(ValueError, match="image size"):
        r.refine(np.zeros((10, 10, 3), np.uint8), np.zeros((1, 10, 11), bool))


@pytest.mark.parametrize("name", ["hrnet18s", "hrnet_lite"])
def test_models_forward_shape(name):
    net = build_model(name).eval()
    with torch.inference_mode():
        y = net(torch.randn(2, 3, 128, 128), torch.ones(2, 1, 128, 128))
    assert y.shape == (2, 2, 128, 128)


def test_hrnet18s_has_the_official_branch_channels():
    net = build_model("hrnet18s")
    # FCN head over the concat of 18+36+72+144 channels
    assert net.head[0][0].in_channels == 18 + 36 + 72 + 144
    assert net.conv_mask.in_channels == 1 and net.conv_mask.stride == (2, 2)


def test_checkpoint_roundtrip_and_refine(tmp_path):
    cfg = BPRConfig(model="hrnet_lite", patch_size=32, input_size=64)
    net = build_model(cfg.model)
    path = tmp_path / "m.pt"
    save_checkpoint(path, net, cfg, {"name": "test", "version": "0"})
    loaded = load_checkpoint(path)
    assert loaded.config == cfg and loaded.model_card["name"] == "test"
    for k, v in net.state_dict().items():
        assert torch.equal(v, loaded.model.state_dict()[k])
    r = Refiner(checkpoint=path, device="cpu")
    assert r.config.patch_size == 32
    rng = np.random.default_rng(0)
    masks = np.stack([random_blob_mask(rng, 90, 70)])
    out = r.refine(_image(rng, 90, 70), masks)
    assert out.shape == masks.shape and out.dtype == bool


class _Evil:
    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))

    def __init__(self, marker):
        self.marker = marker


def test_malicious_pickle_checkpoint_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"format": "bpr-checkpoint/1", "payload": _Evil(marker)}, f)
    with pytest.raises(ValueError, match="refusing to load"):
        load_checkpoint(path)
    assert not marker.exists()
    pickle.loads(path.read_bytes())  # the payload is live: a plain unpickle runs it
    assert marker.exists()


def test_no_shipped_model_message(tmp_path, monkeypatch):
    import bpr_core.refiner as R

    monkeypatch.setattr(R, "DEFAULT_WEIGHTS", tmp_path / "absent.pt")
    with pytest.raises(FileNotFoundError, match="guided-filter"):
        Refiner()


def test_importing_bpr_core_does_not_import_ray():
    code = "import sys, bpr_core; bpr_core.Refiner; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_precision_is_fp32_on_cpu_by_default_and_bf16_autocast_stays_close():
    """The GPU benchmark compares precisions; on CPU, bf16 autocast must change the arithmetic
    (so the option takes effect) without changing what the shipped model predicts."""
    ck = load_checkpoint(DEFAULT_WEIGHTS)
    rng = np.random.default_rng(3)
    s = ck.config.crop_size
    img = rng.integers(0, 256, (8, s, s, 3), dtype=np.uint8)
    msk = np.zeros((8, s, s), np.uint8)
    msk[:, : s // 2] = 1
    default = NetworkPatchRefiner(ck.model, ck.config, "cpu")
    fp32 = NetworkPatchRefiner(ck.model, ck.config, "cpu", precision="fp32")
    bf16 = NetworkPatchRefiner(ck.model, ck.config, "cpu", precision="bf16")
    assert default.precision == "fp32"
    p32, pbf = fp32.predict(img, msk), bf16.predict(img, msk)
    assert np.array_equal(default.predict(img, msk), p32)
    diff = np.abs(p32 - pbf)
    assert 0 < diff.max() < 0.1 and diff.mean() < 0.005
    assert ((p32 > 0.5) == (pbf > 0.5)).mean() > 0.99
    with pytest.raises(ValueError, match="precision"):
        NetworkPatchRefiner(ck.model, ck.config, "cpu", precision="int8")
