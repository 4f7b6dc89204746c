"""Patch refiners (step 4 of BPR) and the `Refiner` that runs the whole algorithm on one image.

A patch refiner maps a batch of image patches (K, S, S, 3) uint8 and coarse-mask patches (K, S, S)
uint8 in {0, 1} to foreground probabilities (K, S, S) float32, all at crop size S. Three exist:
  - `NetworkPatchRefiner`: the BPR network (resize to the input size, normalise, forward, resize
    back);
  - `GuidedFilterPatchRefiner`: the non-learned baseline a user without a model would try;
  - `IdentityPatchRefiner`: returns the coarse patch, so the whole flow must return the input
    masks bit for bit (the tests' exact invariant).
The Ray pipeline calls the same objects, one per actor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from .config import DEFAULT_WEIGHTS, BPRConfig
from .model import RefineNet, build_model
from .preprocess import normalise, to_network_inputs
from . import flow
from .patches import probability_map

CHECKPOINT_FORMAT = "bpr-checkpoint/1"


class PatchRefiner(Protocol):
    name: str

    def predict(self, image_patches: np.ndarray, mask_patches: np.ndarray) -> np.ndarray: ...


class IdentityPatchRefiner:
    name = "identity"

    def predict(self, image_patches: np.ndarray, mask_patches: np.ndarray) -> np.ndarray:
        return (np.asarray(mask_patches) > 0).astype(np.float32)


def _box_mean(x: torch.Tensor, r: int) -> torch.Tensor:
    return F.avg_pool2d(x, 2 * r + 1, stride=1, padding=r, count_include_pad=False)


class GuidedFilterPatchRefiner:
    """Edge-aware smoothing of the coarse mask guided by the image (He et al., "Guided Image
    Filtering", TPAMI 2013), grey-level guide, box means by average pooling, batched over patches.
    Defaults (radius 3, eps 1e-4) were the best of a small grid on a synthetic tuning set (seed 1,
    30 images; README), which no reported figure is measured on."""

    name = "guided-filter"

    def __init__(self, radius: int = 3, eps: float = 1e-4):
        self.radius, self.eps = radius, eps

    def predict(self, image_patches: np.ndarray, mask_patches: np.ndarray) -> np.ndarray:
        img = torch.from_numpy(np.ascontiguousarray(image_patches)).float().div_(255.0)
        guide = (img @ torch.tensor([0.299, 0.587, 0.114])).unsqueeze(1)  # K1SS
        p = torch.from_numpy((np.asarray(mask_patches) > 0).astype(np.float32)).unsqueeze(1)
        r = self.radius
        mean_i, mean_p = _box_mean(guide, r), _box_mean(p, r)
        cov_ip = _box_mean(guide * p, r) - mean_i * mean_p
        var_i = _box_mean(guide * guide, r) - mean_i * mean_i
        a = cov_ip / (var_i + self.eps)
        b = mean_p - a * mean_i
        q = _box_mean(a, r) * guide + _box_mean(b, r)
        return q.clamp_(0.0, 1.0)[:, 0].numpy()


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


class NetworkPatchRefiner:
    """The BPR network on patches. Inputs stay uint8 until they are on the device.

    precision: "auto" (fp16 autocast on CUDA, fp32 elsewhere), "fp32", "fp16" or "bf16" (autocast;
    bf16 also runs on CPU). On CUDA the model and inputs are channels_last.
    """

    def __init__(self, model: RefineNet, config: BPRConfig, device: str | torch.device = "auto", name: str = "network",
                 precision: str = "auto"):
        self.config = config
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.name = name
        if precision == "auto":
            precision = "fp16" if self.device.type == "cuda" else "fp32"
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be auto or one of {sorted(PRECISIONS)}, got {precision!r}")
        self.precision, self.amp_dtype = precision, PRECISIONS[precision]
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)

    def prepare(self, image_patches, mask_patches) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (K,S,S,3) and (K,S,S) numpy/tensors -> normalised network inputs at input_size
        (the same path training uses, `bpr_core.preprocess`)."""
        img, msk, _ = to_network_inputs(image_patches, mask_patches, self.config, self.device)
        img = normalise(img, self.config)
        if self.device.type == "cuda":
            img = img.contiguous(memory_format=torch.channels_last)
        return img, msk

    @torch.inference_mode()
    def predict_tensor(self, image_patches, mask_patches) -> torch.Tensor:
        img, msk = self.prepare(image_patches, mask_patches)
        prob = self._forward(img, msk)
        if self.config.tta_flip:  # mean with the mirrored patch's prediction, mirrored back
            prob = 0.5 * (prob + self._forward(img.flip(-1), msk.flip(-1)).flip(-1))
        s = self.config.crop_size
        if prob.shape[-1] != s:
            prob = F.interpolate(prob, size=(s, s), mode="bilinear", align_corners=False)
        return prob[:, 0]

    def _forward(self, img: torch.Tensor, msk: torch.Tensor) -> torch.Tensor:
        if self.amp_dtype is None:
            logits = self.model(img, msk)
        else:
            with torch.autocast(self.device.type, dtype=self.amp_dtype):
                logits = self.model(img, msk)
        return logits.float().softmax(dim=1)[:, 1:2]

    def predict(self, image_patches: np.ndarray, mask_patches: np.ndarray) -> np.ndarray:
        if len(image_patches) == 0:
            s = self.config.crop_size
            return np.zeros((0, s, s), dtype=np.float32)
        return self.predict_tensor(image_patches, mask_patches).cpu().numpy()

    @torch.inference_mode()
    def predict_u8(self, image_patches: np.ndarray, mask_patches: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """All patches in batches of `batch_size` (`flow.batch_bounds`) -> (K, S, S) uint8
        probabilities (0..255), equal bit for bit to quantising `predict` (bpr_core.flow.quantise).
        On CUDA the inputs go over as uint8 from pinned host memory with non-blocking copies, the
        quantisation runs on the device, the uint8 results come back into pinned memory without
        blocking, and the host waits once per call, not once per batch, so the copies overlap the
        next batch's kernels."""
        s, k = self.config.crop_size, len(image_patches)
        img = torch.from_numpy(np.ascontiguousarray(image_patches, dtype=np.uint8))
        msk = torch.from_numpy(np.ascontiguousarray(mask_patches, dtype=np.uint8))
        cuda = self.device.type == "cuda"
        if cuda:
            img, msk = img.pin_memory(), msk.pin_memory()
        out = torch.empty((k, s, s), dtype=torch.uint8, pin_memory=cuda)
        for a, b in flow.batch_bounds(k, batch_size):  # a few batch shapes only: the heap stays flat
            p = self.predict_tensor(img[a:b], msk[a:b])
            out[a:b].copy_(p.mul(255.0).round_().clamp_(0, 255).to(torch.uint8), non_blocking=cuda)
        if cuda:
            torch.cuda.current_stream(self.device).synchronize()
        return out.numpy()


# --- checkpoints -----------------------------------------------------------------------------


def save_checkpoint(path, model: RefineNet, config: BPRConfig, model_card: dict | None = None) -> None:
    """Plain tensors + plain Python values only, so `torch.load(weights_only=True)` reads it.
    `path` is a file path or a binary file object."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(
        {"format": CHECKPOINT_FORMAT, "config": config.to_dict(), "state_dict": state, "model_card": model_card or {}},
        path if hasattr(path, "write") else str(path),
    )


@dataclass
class LoadedCheckpoint:
    model: RefineNet
    config: BPRConfig
    model_card: dict = field(default_factory=dict)


def load_checkpoint(path: str | Path) -> LoadedCheckpoint:
    """Load a checkpoint written by `save_checkpoint`. Never unpickles arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        blob = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        if "Weights only load failed" in str(e):  # torch refused a pickled object: never unpickle it
            raise ValueError(f"refusing to load checkpoint {path}: it holds Python objects, not plain data "
                             f"(bpr checkpoints are plain tensors and values; {first})") from None
        raise ValueError(f"cannot read checkpoint {path}: not a torch checkpoint, or truncated "
                         f"({e.__class__.__name__}: {first})") from None
    if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a bpr checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    if not isinstance(blob.get("config"), dict) or not isinstance(blob.get("state_dict"), dict):
        raise ValueError(f"checkpoint {path} lacks its config or state_dict")
    try:
        config = BPRConfig.from_dict(blob["config"])
    except (ValueError, TypeError) as e:
        raise ValueError(f"checkpoint {path} has an invalid config: {e}") from None
    model = build_model(config.model)
    try:
        model.load_state_dict(blob["state_dict"])
    except RuntimeError as e:  # missing/unexpected keys or shape mismatches: one line, not 170
        lines = [l.strip() for l in str(e).splitlines() if l.strip()]
        detail = "; ".join(lines[1:3]) if len(lines) > 1 else lines[0] if lines else ""
        raise ValueError(f"checkpoint {path}: its weights do not fit the {config.model!r} architecture its config "
                         f"declares ({detail[:300]})") from None
    return LoadedCheckpoint(model=model, config=config, model_card=dict(blob.get("model_card") or {}))


# Fields a checkpoint owns: the geometry and input normalisation it was trained with.
CHECKPOINT_OWNED = ("model", "input_size", "mean", "std", "mask_resize", "patch_size", "context_pad")


def resolve_config(checkpoint_config: BPRConfig, config: BPRConfig | dict | None, where: str) -> BPRConfig:
    """The config in force for a network checkpoint.

    The checkpoint owns its geometry (CHECKPOINT_OWNED): a dict of overrides may repeat those
    values but not change them, and a full BPRConfig must agree on patch_size and context_pad
    (its model/input/normalisation fields are replaced by the checkpoint's). Everything else
    (proposal NMS, threshold, min_area, the do-no-harm rules) is the caller's where given: a dict
    changes only the keys it names, while a full BPRConfig replaces them all, including the
    checkpoint's calibrated do-no-harm rules (so pass a dict, e.g. {"nms_iou": 0.3}, to keep them).
    """
    if config is None:
        return checkpoint_config
    if isinstance(config, dict):
        bad = {k: v for k, v in config.items() if k in CHECKPOINT_OWNED and v is not None
               and BPRConfig.from_dict({**checkpoint_config.to_dict(), k: v}).to_dict()[k] != checkpoint_config.to_dict()[k]}
        if bad:
            k = sorted(bad)[0]
            raise ValueError(f"{where} was trained with {k}={checkpoint_config.to_dict()[k]!r}; {k}={bad[k]!r} was asked for. "
                             "The checkpoint owns its patch geometry: drop the option, or train a model with it")
        return BPRConfig.from_dict({**checkpoint_config.to_dict(), **{k: v for k, v in config.items() if v is not None}})
    for k in ("patch_size", "context_pad"):
        if getattr(config, k) != getattr(checkpoint_config, k):
            raise ValueError(f"{where} was trained with {k}={getattr(checkpoint_config, k)}; the config asks for "
                             f"{k}={getattr(config, k)}. The checkpoint owns its patch geometry")
    return config.replace(**{k: getattr(checkpoint_config, k) for k in CHECKPOINT_OWNED})


def make_patch_refiner(method: str = "network", checkpoint: str | Path | None = None, device: str = "auto",
                       config: BPRConfig | dict | None = None, precision: str = "auto") -> tuple[PatchRefiner, BPRConfig, dict]:
    """Build a patch refiner by name. Returns (refiner, config in force, model card).

    For "network" the config comes from the checkpoint (see `resolve_config`: the geometry it was
    trained with and its calibrated do-no-harm rules); `config` may be a dict of explicit
    overrides or a full BPRConfig. `checkpoint=None` means the model shipped in bpr_core/weights/.
    """
    if method == "network":
        ckpt = Path(checkpoint) if checkpoint is not None else DEFAULT_WEIGHTS
        if checkpoint is None and not ckpt.is_file():
            raise FileNotFoundError(
                f"no shipped model at {ckpt}; pass a checkpoint trained with `python -m jobs.train`, "
                "or choose the non-learned baseline with method='guided-filter'"
            )
        loaded = load_checkpoint(ckpt)
        cfg = resolve_config(loaded.config, config, f"checkpoint {ckpt}")
        card = dict(loaded.model_card)
        card.setdefault("name", ckpt.stem)
        return NetworkPatchRefiner(loaded.model, cfg, device, name=f"network:{card['name']}", precision=precision), cfg, card
    if isinstance(config, dict):
        cfg = BPRConfig.from_dict({k: v for k, v in config.items() if v is not None})
    else:
        cfg = config or BPRConfig()
    if method == "guided-filter":
        return GuidedFilterPatchRefiner(), cfg, {"name": "guided-filter", "version": "1"}
    if method == "identity":
        return IdentityPatchRefiner(), cfg, {"name": "identity", "version": "1"}
    raise ValueError(f"unknown refiner {method!r}; choose network, guided-filter or identity")


# --- whole-image API -------------------------------------------------------------------------


@dataclass
class InstanceInfo:
    num_patches: int
    # "refined", or why it was passed through: "empty", "too_small", "no_boundary", or
    # "change_rejected" (the do-no-harm acceptance rule kept the coarse mask)
    reason: str


def _to_numpy(x, what: str) -> tuple[np.ndarray, object]:
    """numpy array, torch tensor (any device) or nested list -> (numpy array, torch device or None)."""
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu").numpy(), x.device
    try:
        return np.asarray(x), None
    except Exception as e:
        raise TypeError(f"{what} must be a numpy array or a torch tensor, got {type(x).__name__}") from e


def as_image(image) -> tuple[np.ndarray, object]:
    """An image as HxWx3 uint8 RGB. Accepts HxWx3 or (torch style) 3xHxW, uint8 or float in
    [0, 1] (scaled by 255 and rounded), HxW grey; numpy or torch on any device."""
    arr, device = _to_numpy(image, "image")
    if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[2] != 3:
        arr = arr.transpose(1, 2, 0)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"image must be HxWx3 (or 3xHxW, or HxW grey), got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr), device
    if np.issubdtype(arr.dtype, np.floating):
        if arr.size and (np.nanmin(arr) < 0 or np.nanmax(arr) > 1):
            raise ValueError("a float image must hold values in [0, 1]; pass uint8 for 0..255")
        return np.clip(np.rint(np.nan_to_num(arr) * 255.0), 0, 255).astype(np.uint8), device
    raise ValueError(f"image must be uint8 or float in [0, 1], got {arr.dtype}")


def as_masks(masks, shape: tuple[int, int]) -> tuple[np.ndarray, object]:
    """Instance masks as NxHxW bool. bool as is; integers: non-zero is foreground (0/1 and 0/255
    alike); floats (probabilities, soft masks): foreground where > 0.5. HxW is one mask; a list
    of masks is stacked; numpy or torch on any device."""
    if isinstance(masks, (list, tuple)):
        if not masks:
            return np.zeros((0, *shape), bool), None
        parts = [as_masks(m, shape) for m in masks]
        return np.concatenate([p[0] for p in parts]), parts[0][1]
    arr, device = _to_numpy(masks, "masks")
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[1:] != tuple(shape):
        raise ValueError(f"masks must be NxHxW with HxW = image size {tuple(shape)}, got {arr.shape}")
    if arr.dtype == bool:
        return arr, device
    if np.issubdtype(arr.dtype, np.floating):
        return arr > 0.5, device
    if np.issubdtype(arr.dtype, np.integer):
        return arr != 0, device
    raise ValueError(f"masks must be bool, integer or float, got {arr.dtype}")


def _like(arr: np.ndarray, device):
    """Give results back in the caller's kind: a torch tensor on its device, or numpy."""
    return arr if device is None else torch.from_numpy(np.ascontiguousarray(arr)).to(device)


class _Threads:
    """torch and OpenCV intra-op threads for the duration of a call (None: leave as they are)."""

    def __init__(self, n: int | None):
        self.n = n

    def __enter__(self):
        if self.n:
            import cv2

            self.saved = (torch.get_num_threads(), cv2.getNumThreads())
            torch.set_num_threads(self.n)
            cv2.setNumThreads(self.n)
        return self

    def __exit__(self, *exc):
        if self.n:
            import cv2

            torch.set_num_threads(self.saved[0])
            cv2.setNumThreads(self.saved[1])
        return False


class Refiner:
    """Refine one image's instance masks, or a list of images' (their patches share network
    batches).

    >>> refiner = Refiner(checkpoint="model.pt")          # or method="guided-filter"
    >>> refined = refiner.refine(image, masks)            # HxWx3 uint8, NxHxW bool -> NxHxW bool

    Inputs are what detectors give: images HxWx3 or 3xHxW, uint8 or float in [0, 1]; masks bool,
    0/1 or 0/255 integers, or float probabilities (foreground > 0.5); numpy arrays or torch tensors
    on any device (results come back as the masks came: torch on their device, or numpy).
    `threads` caps torch/OpenCV threads during a call (1 is fastest beside other work).
    `return_probs=True` also returns NxHxW float32 foreground probabilities: the network's mean
    over the patches covering a pixel, the coarse mask (0/1) elsewhere; the boolean masks are the
    decision after the do-no-harm rules. Patch probabilities are held as uint8 (steps of 1/255)
    between the network and pasting, as in `jobs.refine`, so both give the same masks bit for bit
    (the per-instance flow is `bpr_core.flow`).
    """

    def __init__(self, checkpoint: str | Path | None = None, config: BPRConfig | dict | None = None, device: str = "auto",
                 method: str | PatchRefiner = "network", batch_size: int = 64, threads: int | None = None):
        if isinstance(method, str):
            self.patch_refiner, self.config, self.model_card = make_patch_refiner(method, checkpoint, device, config)
        else:
            cfg = BPRConfig.from_dict(config) if isinstance(config, dict) else (config or BPRConfig())
            self.patch_refiner, self.config, self.model_card = method, cfg, {"name": method.name}
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.batch_size, self.threads = batch_size, threads

    def refine(self, image, masks, return_info: bool = False, return_probs: bool = False):
        """One image (HxWx3) and its masks (NxHxW) -> refined NxHxW bool [, infos][, probs]; or a
        list of images and a list of their masks -> a list of those results, in order."""
        if isinstance(image, (list, tuple)):
            if not isinstance(masks, (list, tuple)) or len(masks) != len(image):
                raise ValueError("a list of images needs a list of mask stacks of the same length")
            with _Threads(self.threads):
                jobs = [self._prepare(im, m) for im, m in zip(image, masks)]
                self._predict(jobs)
                return [self._finish(job, return_info, return_probs) for job in jobs]
        with _Threads(self.threads):
            job = self._prepare(image, masks)
            self._predict([job])
            return self._finish(job, return_info, return_probs)

    def _prepare(self, image, masks) -> dict:
        image, _ = as_image(image)
        masks, device = as_masks(masks, image.shape[:2])
        batch = flow.extract(image, masks, self.config)  # the one per-instance flow (bpr_core.flow)
        infos = [InstanceInfo(int(k), "refined" if st == flow.REFINED else why)
                 for st, why, k in zip(batch.status, batch.reason, batch.counts())]
        return {"masks": masks, "device": device, "batch": batch, "infos": infos}

    def _predict(self, jobs: list[dict]) -> None:
        """One pass of the network over every job's patches, in batches that cross images."""
        merged = flow.PatchBatch.concat([job["batch"] for job in jobs], self.config.crop_size)
        probs = flow.predict_u8(self.patch_refiner, merged.img, merged.msk, self.batch_size)
        start = 0
        for job in jobs:
            k = job["batch"].num_patches
            job["batch"].probs = probs[start : start + k]
            start += k

    def _finish(self, job: dict, return_info: bool, return_probs: bool):
        cfg, masks, infos, batch = self.config, job["masks"], job["infos"], job["batch"]
        out = masks.copy()
        soft = masks.astype(np.float32) if return_probs else None
        for n in range(len(masks)):
            span = batch.span(n)
            if span.stop > span.start:
                boxes, p = batch.boxes[span], batch.probs[span]
                out[n], rejected = flow.finish_instance(masks[n], boxes, p, cfg)
                if rejected:
                    infos[n].reason = rejected
                if return_probs:
                    soft[n] = probability_map(masks[n], boxes, p, cfg)
        result = [_like(out, job["device"])]
        if return_info:
            result.append(infos)
        if return_probs:
            result.append(_like(soft, job["device"]))
        return result[0] if len(result) == 1 else tuple(result)
