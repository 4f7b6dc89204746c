"""The one preprocessing path from uint8 patches to network inputs, shared by training and
inference (so a model always sees at inference what it was trained on).

    uint8 image patches (K,S,S,3) + mask patches (K,S,S) [+ GT patches]
      -> on the device: float image Kx3xIxI in [0, 255] (bilinear resize to input_size),
         mask Kx1xIxI in {0, 1} (config.mask_resize), GT Kx1xIxI in {0, 1} (nearest)
    normalise(image, config): (image - mean) / std, the checkpoint's own normalisation.

Training augments between the two steps (photometric changes act on [0, 255] pixels).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import BPRConfig


def _resize_binary(m: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    if mode == "nearest":
        return F.interpolate(m, size=size, mode="nearest")
    return (F.interpolate(m, size=size, mode="bilinear", align_corners=False) > 0.5).float()


def to_network_inputs(image_patches, mask_patches, config: BPRConfig, device, gt_patches=None):
    """uint8 numpy arrays or tensors -> (image, mask, gt or None) at config.input_size on `device`.
    Inputs travel as uint8 and become float only on the device."""
    img = torch.as_tensor(image_patches).to(device, non_blocking=True).permute(0, 3, 1, 2).float()
    msk = (torch.as_tensor(mask_patches).to(device, non_blocking=True) > 0).float().unsqueeze(1)
    gt = None if gt_patches is None else (torch.as_tensor(gt_patches).to(device, non_blocking=True) > 0).float().unsqueeze(1)
    size = (config.input_size, config.input_size)
    if img.shape[-1] != config.input_size:
        img = F.interpolate(img, size=size, mode="bilinear", align_corners=False)
        msk = _resize_binary(msk, size, config.mask_resize)
        if gt is not None:
            gt = F.interpolate(gt, size=size, mode="nearest")
    return img, msk, gt


def normalise(img: torch.Tensor, config: BPRConfig) -> torch.Tensor:
    mean = torch.tensor(config.mean, device=img.device, dtype=img.dtype).view(1, 3, 1, 1)
    std = torch.tensor(config.std, device=img.device, dtype=img.dtype).view(1, 3, 1, 1)
    return (img - mean) / std
