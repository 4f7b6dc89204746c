"""The Ray Data stages of the refinement pipeline, each a thin wrapper around bpr_core.

    instance rows --ExtractPatches (CPU actors)--> patch rows --RefinePatches (GPU/CPU actors)-->
    probability rows --groupby(image_id, instance_id) + reassemble--> one refined row per instance

Every instance yields at least one row through the flow: instances without patches (empty, too
small, no boundary, unreadable image, bad RLE) travel as a single row with has_patch=False and come
out of reassembly passed through or quarantined, with the reason. Only what pasting needs (coarse
RLE, boxes, uint8 probabilities) goes through the shuffle, never images.
"""

from __future__ import annotations

import os

import cv2
import numpy as np

from bpr_core import BPRConfig, crop_patches, propose_patches, reassemble, skip_reason
from bpr_core import rle as rle_utils
from bpr_core.imageio import DEFAULT_MAX_PIXELS, ImageHeader, ImageRejected, decode_image, read_header, size_mismatch_reason

from .storage import PathRejected, confine, read_bytes, resolve

__all__ = ["ImageReader", "ExtractPatches", "RefinePatches", "reassemble_image", "decode_image"]

# Columns carried by every row from extraction to reassembly.
META = ("image_id", "instance_id", "category_id", "score", "rle_counts", "rle_h", "rle_w", "source_file", "position",
        "detector_fields")


READ_FAILED = " unreadable: "  # marks a reason as a read failure (retried by the next run), see is_read_failure


def is_read_failure(reason: str | None) -> bool:
    """Could the image's bytes not be read (missing, no access, network)? Such instances are
    quarantined for this run only: their shard is not marked done, so a re-run retries them."""
    return bool(reason) and reason.startswith("image ") and READ_FAILED in reason


class ImageReader:
    """Reads an index's file_name under the images root with the job's policies: the path confined
    to the root (storage.confine), the pixel limit checked from the header, and the EXIF policy
    (bpr_core.imageio). `read` raises ImageUnusable with the reason an instance is quarantined for.

    Transient read errors (timeouts, throttling, connection resets: any OSError but a missing file
    or a refused permission) are retried `retries` times with exponential backoff from `backoff` s.
    """

    def __init__(self, images_uri: str, exif: str = "stored", max_pixels: int = DEFAULT_MAX_PIXELS,
                 allow_absolute: bool = False, retries: int = 3, backoff: float = 0.5):
        self.root = resolve(images_uri)
        self.exif, self.max_pixels, self.allow_absolute = exif, max_pixels, allow_absolute
        self.retries, self.backoff = retries, backoff

    def _read_bytes(self, loc) -> bytes:
        import time

        for attempt in range(self.retries + 1):
            try:
                return read_bytes(loc)
            except (FileNotFoundError, PermissionError, IsADirectoryError):
                raise
            except OSError:
                if attempt == self.retries:
                    raise
                time.sleep(self.backoff * 2 ** attempt)
        raise AssertionError("unreachable")

    def read(self, file_name: str) -> tuple[np.ndarray, ImageHeader, str]:
        """-> (HxWx3 RGB, header, the URI it was read from)."""
        try:
            loc = confine(self.root, file_name, self.allow_absolute)
        except PathRejected as e:
            raise ImageUnusable(str(e)) from None
        try:
            data = self._read_bytes(loc)
        except Exception as e:  # missing, no access, or still failing after the retries
            raise ImageUnusable(f"image {loc.uri}{READ_FAILED}{e.__class__.__name__}: {str(e)[:200]}") from None
        try:
            header = read_header(data, loc.uri)
            return decode_image(data, loc.uri, self.exif, self.max_pixels, header), header, loc.uri
        except ImageRejected as e:
            raise ImageUnusable(str(e)) from None
        except Exception as e:  # a decoder failure: the file is there but not a usable image
            raise ImageUnusable(f"cannot decode image {loc.uri}: {e.__class__.__name__}: {str(e)[:200]}") from None


class ImageUnusable(ValueError):
    """Why an image cannot be used (its instances are quarantined with this reason)."""


class ExtractPatches:
    """Instance rows (with file_name) -> patch rows. One image read per image in the batch."""

    def __init__(self, images_uri: str, config: dict, exif: str = "stored", max_pixels: int = DEFAULT_MAX_PIXELS,
                 allow_absolute: bool = False):
        self.reader = ImageReader(images_uri, exif, max_pixels, allow_absolute)
        self.cfg = BPRConfig.from_dict(config)
        cv2.setNumThreads(1)

    def __call__(self, batch: dict) -> dict:
        cfg = self.cfg
        s = cfg.crop_size
        out: dict[str, list] = {k: [] for k in META + ("status", "reason", "has_patch", "box", "img", "msk")}
        zero_img, zero_msk = np.zeros((s, s, 3), np.uint8), np.zeros((s, s), np.uint8)

        def emit(i, status, reason, boxes=None, img_p=None, msk_p=None):
            k = 1 if boxes is None else len(boxes)
            for key in META:
                out[key].extend([batch[key][i]] * k)
            out["status"].extend([status] * k)
            out["reason"].extend([reason] * k)
            out["has_patch"].extend([boxes is not None] * k)
            if boxes is None:
                out["box"].append(np.zeros(4, np.int32))
                out["img"].append(zero_img)
                out["msk"].append(zero_msk)
            else:
                out["box"].extend(boxes.astype(np.int32))
                out["img"].extend(img_p)
                out["msk"].extend(msk_p)

        order = np.argsort(batch["image_id"], kind="stable")
        image, image_key, image_err = None, None, None
        for i in order:
            key = (batch["image_id"][i], batch["file_name"][i])
            if key != image_key:
                image_key, image, image_err = key, None, None
                try:
                    image, header, where = self.reader.read(str(key[1]))
                except ImageUnusable as e:  # outside the root, missing, too large, corrupt: quarantine its instances
                    image_err = str(e)
            if image_err is not None:
                emit(i, "quarantined", image_err)
                continue
            h, w = int(batch["rle_h"][i]), int(batch["rle_w"][i])
            if image.shape[:2] != (h, w):
                emit(i, "quarantined", size_mismatch_reason(where, image.shape[:2], (h, w), header, self.reader.exif))
                continue
            try:
                mask = rle_utils.decode({"size": [h, w], "counts": batch["rle_counts"][i]})
            except Exception as e:
                emit(i, "quarantined", f"invalid RLE for image_id {batch['image_id'][i]} instance {batch['instance_id'][i]}: {e}")
                continue
            skip = skip_reason(int(mask.sum()), cfg)
            if skip:
                emit(i, "passed_through", skip)
                continue
            boxes = propose_patches(mask, cfg)
            if len(boxes) == 0:
                emit(i, "passed_through", "no_boundary")
                continue
            emit(i, "refined", "", boxes, crop_patches(image, boxes, cfg), crop_patches(mask.view(np.uint8), boxes, cfg))
        if not out["box"]:
            return _empty_patch_batch(s)
        result = {k: np.asarray(v) for k, v in out.items() if k not in ("box", "img", "msk")}
        result["box"] = np.stack(out["box"])
        result["img"] = np.stack(out["img"])
        result["msk"] = np.stack(out["msk"])
        return result


def _empty_patch_batch(s: int) -> dict:
    d = {k: np.zeros(0, dtype=np.int64) for k in ("image_id", "instance_id", "category_id", "rle_h", "rle_w", "position")}
    d.update({k: np.zeros(0, dtype=object) for k in ("rle_counts", "source_file", "detector_fields", "status", "reason")})
    d["score"] = np.zeros(0)
    d["has_patch"] = np.zeros(0, bool)
    d["box"] = np.zeros((0, 4), np.int32)
    d["img"] = np.zeros((0, s, s, 3), np.uint8)
    d["msk"] = np.zeros((0, s, s), np.uint8)
    return d


class RefinePatches:
    """Patch rows -> probability rows (uint8, 0..255). The model is loaded once per actor."""

    def __init__(self, method: str, checkpoint: str | None, device: str, config: dict, threads: int = 1,
                 fail_on_batch: int | None = None, net_batch: int = 64):
        import torch

        from bpr_core.refiner import make_patch_refiner

        torch.set_num_threads(max(1, threads))
        from .storage import local_file

        self.refiner, self.cfg, _ = make_patch_refiner(method, local_file(checkpoint), device, BPRConfig.from_dict(config))
        self.calls = 0
        self.net_batch = net_batch
        # Fault injection for the reliability tests only: the actor process dies on its k-th batch
        # (once per run, marked by a file) and Ray must restart it and retry the batch.
        self.fail_on_batch = fail_on_batch

    def __call__(self, batch: dict) -> dict:
        self.calls += 1
        if self.fail_on_batch is not None and self.calls == self.fail_on_batch:
            marker = os.environ.get("BPR_FAULT_MARKER")
            if marker and not os.path.exists(marker):
                open(marker, "w").close()
                os._exit(1)
        has = np.asarray(batch["has_patch"], dtype=bool)
        s = self.cfg.crop_size
        probs = np.zeros((len(has), s, s), np.uint8)
        if has.any():
            # A block may hold several network batches (fewer, larger blocks for the shuffle);
            # the network always sees net_batch patches at a time.
            img, msk = batch["img"][has], batch["msk"][has]
            p = np.concatenate([self.refiner.predict(img[i : i + self.net_batch], msk[i : i + self.net_batch])
                                for i in range(0, len(img), self.net_batch)])
            probs[has] = np.clip(np.rint(p * 255.0), 0, 255).astype(np.uint8)
        out = {k: v for k, v in batch.items() if k not in ("img", "msk")}
        out["prob"] = probs
        return out


def reassemble_image(group: dict, config: dict, model_name: str, model_version: str, config_hash: str) -> dict:
    """All probability rows of one image -> one output row per instance (refined, passed through
    or quarantined). The groupby key is the image, not the instance: measured on 2 cores, Ray
    Data's per-group cost in map_groups was several times the paste itself, and an image holds
    ~4 instances on average (more on COCO)."""
    cfg = BPRConfig.from_dict(config)
    # An instance is (source file, instance_id): files of a multi-file input may each number from 0.
    members: dict[tuple, list[int]] = {}
    for j, key in enumerate(zip(group["instance_id"], group["source_file"])):
        members.setdefault((int(key[0]), str(key[1])), []).append(j)
    rows = []
    for key in sorted(members):
        idx = np.asarray(members[key])
        rows.append(reassemble_instance({k: v[idx] for k, v in group.items()}, cfg, model_name, model_version, config_hash))
    return {k: np.asarray([r[k] for r in rows]) for k in rows[0]}


def reassemble_instance(group: dict, cfg: BPRConfig, model_name: str, model_version: str, config_hash: str) -> dict:
    """All probability rows of one instance -> its one output row."""
    first = {k: group[k][0] for k in META}
    status, reason = str(group["status"][0]), str(group["reason"][0])
    h, w = int(first["rle_h"]), int(first["rle_w"])
    coarse_rle = {"size": [h, w], "counts": first["rle_counts"]}
    has = np.asarray(group["has_patch"], dtype=bool)
    counts, coarse_area, refined_area, npatch = first["rle_counts"], -1, -1, int(has.sum())
    if status != "quarantined":
        coarse = rle_utils.decode(coarse_rle)
        coarse_area = refined_area = int(coarse.sum())
        if npatch:
            refined, rejected = reassemble(coarse, group["box"][has], group["prob"][has], cfg)
            if rejected:
                status, reason = "passed_through", rejected
            else:
                counts = rle_utils.encode(refined)["counts"]
                refined_area = int(refined.sum())
    row = {**first, "rle_counts": counts, "status": status, "reason": reason, "coarse_area": coarse_area,
           "refined_area": refined_area, "num_patches": npatch, "model_name": model_name,
           "model_version": model_version, "config_hash": config_hash}
    return row
