"""`bpr import-official`: the paper's released HRNet-18s checkpoints (mmseg layout) -> our hrnet18s.

The real files cannot be downloaded here, so the test builds a state dict with the official key
layout and shapes, enumerated from the official config (configs/bpr/hrnet18s_128.py: stem 64, one
bottleneck stage of 2 blocks at 64 planes, then 1/3/2 modules of 2 basic blocks over 18/36/72/144
channels, FCN head of 270 channels and 2 classes) by mmseg HRNet's naming rules, each tensor
filled with distinct random values; every one must land, unchanged, in the right place of ours.
"""

import pytest
import torch

from bpr_core.model import build_model
from bpr_core.official import convert_state_dict, import_official, official_to_ours
from bpr_core.refiner import load_checkpoint

CH = (18, 36, 72, 144)
MODULES = {2: 1, 3: 3, 4: 2}  # stage -> modules; 2 blocks per branch everywhere


def _bn(prefix: str, c: int) -> dict:
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,), f"{prefix}.running_var": (c,),
            f"{prefix}.num_batches_tracked": ()}


def official_layout() -> dict[str, tuple]:
    """{key: shape} of EncoderDecoderRefine(HRNetRefine, FCNHead) for hrnet18s_128."""
    s: dict[str, tuple] = {"backbone.conv1.weight": (64, 3, 3, 3), "backbone.conv_mask.weight": (64, 1, 3, 3),
                           "backbone.conv2.weight": (64, 64, 3, 3)}
    s.update(_bn("backbone.bn1", 64))
    s.update(_bn("backbone.bn2", 64))
    cin = 64
    for k in range(2):  # layer1: bottlenecks, 64 planes, expansion 4
        p = f"backbone.layer1.{k}"
        s[f"{p}.conv1.weight"] = (64, cin, 1, 1)
        s[f"{p}.conv2.weight"] = (64, 64, 3, 3)
        s[f"{p}.conv3.weight"] = (256, 64, 1, 1)
        for n, c in ((1, 64), (2, 64), (3, 256)):
            s.update(_bn(f"{p}.bn{n}", c))
        if cin != 256:
            s[f"{p}.downsample.0.weight"] = (256, cin, 1, 1)
            s.update(_bn(f"{p}.downsample.1", 256))
        cin = 256
    prev = (256,)
    for stage in (2, 3, 4):
        cur = CH[:stage]
        t = f"backbone.transition{stage - 1}"
        for b, c in enumerate(cur):
            if b < len(prev):
                if prev[b] != c:
                    s[f"{t}.{b}.0.weight"] = (c, prev[b], 3, 3)
                    s.update(_bn(f"{t}.{b}.1", c))
            else:
                s[f"{t}.{b}.0.0.weight"] = (c, prev[-1], 3, 3)
                s.update(_bn(f"{t}.{b}.0.1", c))
        for m in range(MODULES[stage]):
            p = f"backbone.stage{stage}.{m}"
            for b, c in enumerate(cur):
                for k in range(2):
                    for n in (1, 2):
                        s[f"{p}.branches.{b}.{k}.conv{n}.weight"] = (c, c, 3, 3)
                        s.update(_bn(f"{p}.branches.{b}.{k}.bn{n}", c))
            for i, ci in enumerate(cur):
                for j, cj in enumerate(cur):
                    if j > i:
                        s[f"{p}.fuse_layers.{i}.{j}.0.weight"] = (ci, cj, 1, 1)
                        s.update(_bn(f"{p}.fuse_layers.{i}.{j}.1", ci))
                    elif j < i:
                        for k in range(i - j):
                            out = ci if k == i - j - 1 else cj
                            s[f"{p}.fuse_layers.{i}.{j}.{k}.0.weight"] = (out, cj, 3, 3)
                            s.update(_bn(f"{p}.fuse_layers.{i}.{j}.{k}.1", out))
        prev = cur
    s["decode_head.convs.0.conv.weight"] = (270, 270, 1, 1)
    s.update(_bn("decode_head.convs.0.bn", 270))
    s["decode_head.conv_seg.weight"] = (2, 270, 1, 1)
    s["decode_head.conv_seg.bias"] = (2,)
    return s


def official_state(seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randint(0, 1000, shape, generator=g) if k.endswith("num_batches_tracked") else torch.randn(shape, generator=g))
            for k, shape in official_layout().items()}


def test_every_official_tensor_lands_in_its_place():
    official = official_state()
    ours = convert_state_dict(official)
    model = build_model("hrnet18s")
    assert len(official) == len(ours) == len(model.state_dict())  # one to one, nothing left over
    model.load_state_dict(ours, strict=True)
    mine = model.state_dict()
    for k, v in official.items():
        assert torch.equal(mine[official_to_ours(k)], v.to(mine[official_to_ours(k)].dtype)), k


def test_mapping_names_spot_checks():
    assert official_to_ours("backbone.bn1.running_var") == "stem.0.running_var"
    assert official_to_ours("backbone.layer1.0.downsample.1.weight") == "layer1.0.shortcut.1.weight"
    assert official_to_ours("backbone.layer1.1.bn3.bias") == "layer1.1.body.2.1.bias"
    assert official_to_ours("backbone.transition1.0.1.weight") == "transitions.0.0.1.weight"
    assert official_to_ours("backbone.transition3.3.0.0.weight") == "transitions.2.3.0.weight"
    assert official_to_ours("backbone.stage4.1.branches.3.1.bn2.running_mean") == "stages.2.1.branches.3.1.conv2.1.running_mean"
    assert official_to_ours("backbone.stage3.2.fuse_layers.2.0.1.0.weight") == "stages.1.2.fuse.2.0.1.0.weight"
    assert official_to_ours("decode_head.conv_seg.bias") == "head.1.bias"
    assert official_to_ours("auxiliary_head.conv_seg.bias") is None


def test_a_foreign_or_damaged_state_dict_is_refused_by_name():
    official = official_state()
    official["backbone.stage2.0.branches.0.0.conv1.weight"] = torch.zeros(18, 18, 1, 1)
    with pytest.raises(ValueError, match=r"1 shape mismatches \(e\.g\. backbone\.stage2\.0\.branches\.0\.0\.conv1\.weight"):
        convert_state_dict(official)
    official = official_state()
    del official["decode_head.conv_seg.bias"]
    official["backbone.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"1 keys with no place in hrnet18s \(e\.g\. backbone\.extra\.weight\).*1 of our keys not provided \(e\.g\. head\.1\.bias\)"):
        convert_state_dict(official)


def test_import_writes_a_checkpoint_the_pipeline_loads(tmp_path):
    src = tmp_path / "bpr_hrnet18s_coco.pth"
    official = official_state(1)
    torch.save({"meta": {"mmseg_version": "0.9.0", "iter": 160000},
                "state_dict": {f"module.{k}": v for k, v in official.items()}}, src)
    out = tmp_path / "converted.pt"
    card = import_official(src, out)
    loaded = load_checkpoint(out)
    assert loaded.config.model == "hrnet18s" and loaded.config.patch_size == 64 and loaded.config.input_size == 128
    assert loaded.config.gate_margin == 0 and loaded.config.min_keep_iou == 0 and loaded.config.min_area == 0
    assert loaded.model_card["name"] == card["name"] == "bpr-official-bpr_hrnet18s_coco"
    sd = loaded.model.state_dict()
    assert torch.equal(sd["conv_mask.weight"], official["backbone.conv_mask.weight"])
    assert torch.equal(sd["head.0.1.running_var"], official["decode_head.convs.0.bn.running_var"])
    logits = loaded.model.eval()(torch.zeros(1, 3, 128, 128), torch.zeros(1, 1, 128, 128))
    assert logits.shape == (1, 2, 128, 128)
