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


def build_model(name: str) -> RefineNet:
    if name not in SPECS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(SPECS)}")
    return RefineNet(SPECS[name])
