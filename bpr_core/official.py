"""Import the paper's released checkpoints (chenhang98/BPR, mmsegmentation format) as bpr checkpoints.

The official models are `HRNetRefine` + `FCNHead` (configs/bpr/hrnet18s_128.py): an mmseg HRNetV2
whose stem adds a 1->64 stride-2 `conv_mask` over the coarse mask to the image's `conv1`, and an
FCN head over the resize-concat of the four branches (270 channels, one 1x1 ConvModule, then
`conv_seg` to 2 classes). Our `hrnet18s` (bpr_core.model) is the same network written from the
HRNet paper, with its own module names; this module maps the names, key by key, and checks every
shape. The mapping was written against the official model definition (read, not copied): mmseg's
HRNet names its stem `conv1/bn1/conv2/bn2`, its stage-1 bottlenecks `layer1.K.convN/bnN/downsample`,
its branch transitions `transitionT.B` (a conv-bn-relu, nested one level deeper for a new
lower-resolution branch), its modules `stageS.M.branches.B.K.convN/bnN` and
`stageS.M.fuse_layers.I.J...`, and the head `decode_head.convs.0.conv/bn` and `decode_head.conv_seg`.

Never unpickles objects: the file is read with `torch.load(weights_only=True)` (mmcv checkpoints
are a dict of tensors plus plain `meta`), so a file that needs arbitrary classes is refused.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch

from .config import BPRConfig
from .model import build_model

# (official regex, our replacement); applied after the "backbone."/"decode_head." split below.
_BACKBONE_RULES = [
    (r"^conv1\.weight$", r"conv1.weight"),
    (r"^conv_mask\.weight$", r"conv_mask.weight"),
    (r"^bn1\.(.+)$", r"stem.0.\1"),
    (r"^conv2\.weight$", r"stem.2.0.weight"),
    (r"^bn2\.(.+)$", r"stem.2.1.\1"),
    (r"^layer1\.(\d+)\.downsample\.0\.(.+)$", r"layer1.\1.shortcut.0.\2"),
    (r"^layer1\.(\d+)\.downsample\.1\.(.+)$", r"layer1.\1.shortcut.1.\2"),
    # transitions: an existing branch's conv-bn-relu, or (one level deeper) a new branch's
    (r"^transition(\d)\.(\d+)\.0\.0\.(.+)$", lambda m: f"transitions.{int(m[1]) - 1}.{m[2]}.0.{m[3]}"),
    (r"^transition(\d)\.(\d+)\.0\.1\.(.+)$", lambda m: f"transitions.{int(m[1]) - 1}.{m[2]}.1.{m[3]}"),
    (r"^transition(\d)\.(\d+)\.([01])\.(.+)$", lambda m: f"transitions.{int(m[1]) - 1}.{m[2]}.{m[3]}.{m[4]}"),
    (r"^stage(\d)\.(\d+)\.branches\.(.+)$", lambda m: f"stages.{int(m[1]) - 2}.{m[2]}.branches.{m[3]}"),
    (r"^stage(\d)\.(\d+)\.fuse_layers\.(.+)$", lambda m: f"stages.{int(m[1]) - 2}.{m[2]}.fuse.{m[3]}"),
]
_BLOCK_RULES = [  # inside layer1 bottlenecks and branch basic blocks
    (r"^(layer1\.\d+)\.conv(\d)\.weight$", lambda m: f"{m[1]}.body.{int(m[2]) - 1}.0.weight"),
    (r"^(layer1\.\d+)\.bn(\d)\.(.+)$", lambda m: f"{m[1]}.body.{int(m[2]) - 1}.1.{m[3]}"),
    (r"^(stages\.\d+\.\d+\.branches\.\d+\.\d+)\.conv(\d)\.weight$", r"\1.conv\2.0.weight"),
    (r"^(stages\.\d+\.\d+\.branches\.\d+\.\d+)\.bn(\d)\.(.+)$", r"\1.conv\2.1.\3"),
]
_HEAD_RULES = [
    (r"^convs\.0\.conv\.weight$", r"head.0.0.weight"),
    (r"^convs\.0\.bn\.(.+)$", r"head.0.1.\1"),
    (r"^conv_seg\.(weight|bias)$", r"head.1.\1"),
]


def _apply(rules, key: str) -> str | None:
    for pattern, repl in rules:
        m = re.match(pattern, key)
        if m:
            return repl(m) if callable(repl) else m.expand(repl)
    return None


def official_to_ours(key: str) -> str | None:
    """One official state-dict key -> our hrnet18s key (None: not part of the refinement model)."""
    if key.startswith("backbone."):
        ours = _apply(_BACKBONE_RULES, key[len("backbone."):])
        if ours is None and key.startswith("backbone.layer1."):
            ours = key[len("backbone."):]
        return None if ours is None else (_apply(_BLOCK_RULES, ours) or ours)
    if key.startswith("decode_head."):
        return _apply(_HEAD_RULES, key[len("decode_head."):])
    return None


def official_state_dict(blob) -> dict[str, torch.Tensor]:
    """The model's tensors from an mmcv checkpoint ({"state_dict": ..., "meta": ...}), a bare
    state dict, or one saved from a DataParallel/DDP wrapper ("module." prefixes)."""
    sd = blob.get("state_dict", blob) if isinstance(blob, dict) else None
    if not isinstance(sd, dict) or not sd:
        raise ValueError("not an mmseg checkpoint: no state_dict")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def convert_state_dict(official: dict[str, torch.Tensor], model: str = "hrnet18s") -> dict[str, torch.Tensor]:
    """Map every official key onto ours and check the result covers our model exactly, shape by
    shape. Raises ValueError naming the first keys that do not fit."""
    net = build_model(model)
    ours = net.state_dict()
    out: dict[str, torch.Tensor] = {}
    unmapped, bad_shape = [], []
    for k, v in official.items():
        if k.startswith("auxiliary_head."):  # training-only head, if a config had one
            continue
        target = official_to_ours(k)
        if target is None or target not in ours:
            unmapped.append(k)
            continue
        if tuple(v.shape) != tuple(ours[target].shape):
            bad_shape.append(f"{k} {tuple(v.shape)} -> {target} {tuple(ours[target].shape)}")
            continue
        out[target] = v.to(ours[target].dtype)
    missing = sorted(set(ours) - set(out))
    if unmapped or bad_shape or missing:
        parts = []
        if unmapped:
            parts.append(f"{len(unmapped)} keys with no place in {model} (e.g. {', '.join(unmapped[:3])})")
        if bad_shape:
            parts.append(f"{len(bad_shape)} shape mismatches (e.g. {bad_shape[0]})")
        if missing:
            parts.append(f"{len(missing)} of our keys not provided (e.g. {', '.join(missing[:3])})")
        raise ValueError("the checkpoint is not an official BPR HRNet-18s: " + "; ".join(parts))
    return out


def import_official(path: str | Path, out: str | Path, name: str | None = None, patch_size: int = 64,
                    nms_iou: float = 0.25) -> dict:
    """Convert an official BPR checkpoint into a bpr checkpoint at `out`; returns its model card.

    The config is the paper's inference setting: hrnet18s, 128 px network input, the given patch
    size (64 for the released COCO/Cityscapes models), ImageNet normalisation, and the official
    reassembly (no do-no-harm rules: calibrate them with `jobs.calibrate` on your dev set)."""
    from .refiner import save_checkpoint

    path = Path(path)
    try:
        blob = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ValueError(f"cannot read {path} as a plain-data torch checkpoint ({e.__class__.__name__}: "
                         f"{(str(e).splitlines() or [''])[0][:200]})") from None
    try:
        state = convert_state_dict(official_state_dict(blob))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    config = BPRConfig(model="hrnet18s", patch_size=patch_size, input_size=128, nms_iou=nms_iou)
    net = build_model("hrnet18s")
    net.load_state_dict(state, strict=True)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    card = {"name": name or f"bpr-official-{path.stem}", "version": digest[:12], "source": "chenhang98/BPR release (mmseg)",
            "source_file": path.name, "source_sha256": digest,
            "note": "converted by bpr import-official; the paper's reassembly (no do-no-harm rules)"}
    save_checkpoint(out, net, config, card)
    return card
