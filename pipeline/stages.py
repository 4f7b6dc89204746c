"""The Ray Data stages of the refinement pipeline, each a thin wrapper around `bpr_core.flow`.

    instance rows (blocks of whole images) --ExtractPatches (CPU actors)--> one row per instance with
    its patches --RefinePatches (GPU/CPU actors)--> + uint8 probabilities --WriteParts (the grouping
    stage: CPU actors)--> refined rows written as Parquet parts by the workers; small receipts to
    the driver

No shuffle: an instance's patches travel in its own row (boxes, image and mask patches, then
probabilities as flat uint8 buffers), so the grouping stage receives every instance already grouped
and reassembly is a map. Every input row comes out exactly once, refined, passed through or
quarantined with the reason. Each stage is callable on one numpy batch without Ray
(tests/pipeline/test_stages.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import os

import cv2
import numpy as np

from bpr_core import BPRConfig
from bpr_core import flow
from bpr_core import rle as rle_utils
from bpr_core.imageio import DEFAULT_MAX_PIXELS, ImageHeader, ImageRejected, decode_image, read_header, size_mismatch_reason

from .storage import PathRejected, confine, read_bytes, resolve

__all__ = ["ImageReader", "ExtractPatches", "RefinePatches", "WriteParts", "decode_image"]

# Columns carried by every row from extraction to the grouping stage.
META = ("image_id", "instance_id", "category_id", "score", "rle_counts", "rle_h", "rle_w", "source_file", "position",
        "detector_fields", "shard")


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


def _column(rows: list, dtype=None) -> np.ndarray:
    """A numpy column from a list, one element per row (bytes stay an object array of bytes)."""
    if dtype is None:
        arr = np.empty(len(rows), dtype=object)
        arr[:] = rows
        return arr
    return np.asarray(rows, dtype=dtype)


PATCH_COLUMNS = ("status", "reason", "num_patches", "boxes", "img", "msk")


def actor_id(stage: str) -> str:
    """A name for one actor process (stage, host, pid, start time): the receipts carry it, so the
    manifest shows how many actors served the job (a restarted one counts again)."""
    import socket
    import time

    return f"{stage}:{socket.gethostname()}:{os.getpid()}:{time.time_ns()}"


class ExtractPatches:
    """Instance rows -> one row per instance with its patches (flat uint8/int32 buffers).

    A block holds whole images (the driver never splits one), so the per-image checks happen here,
    not on the driver: each image is read once, and an instance_id repeated within an image and
    source file is quarantined (the first by input position is kept)."""

    def __init__(self, images_uri: str, config: dict, exif: str = "stored", max_pixels: int = DEFAULT_MAX_PIXELS,
                 allow_absolute: bool = False, images_per_step: int | None = None):
        self.reader = ImageReader(images_uri, exif, max_pixels, allow_absolute)
        self.cfg = BPRConfig.from_dict(config)
        self.actor = actor_id("extract")
        # Images per output batch: an input block may hold a whole shard (one object put by the
        # driver), and its patches go downstream every `images_per_step` images (None: one batch).
        self.images_per_step = images_per_step
        cv2.setNumThreads(1)

    def _image(self, batch: dict, idx: list[int]) -> flow.PatchBatch:
        """One image's instances (row indices) -> their PatchBatch, in input order."""
        image_id, file_name = int(batch["image_id"][idx[0]]), str(batch["file_name"][idx[0]])
        preset: list[tuple[str, str] | None] = [None] * len(idx)
        masks: list[np.ndarray | None] = [None] * len(idx)
        seen: set = set()
        for n, i in enumerate(idx):
            key = (str(batch["source_file"][i]), int(batch["instance_id"][i]))
            if key in seen:
                preset[n] = (flow.QUARANTINED, f"duplicate instance_id {key[1]} for image_id {image_id} in {key[0]}")
            seen.add(key)
        image = None
        try:
            image, header, where = self.reader.read(file_name)
        except ImageUnusable as e:  # outside the root, missing, too large, corrupt: quarantine its instances
            preset = [p or (flow.QUARANTINED, str(e)) for p in preset]
        for n, i in enumerate(idx):
            if preset[n] is not None:
                continue
            h, w = int(batch["rle_h"][i]), int(batch["rle_w"][i])
            if image.shape[:2] != (h, w):
                preset[n] = (flow.QUARANTINED, size_mismatch_reason(where, image.shape[:2], (h, w), header, self.reader.exif))
                continue
            try:
                masks[n] = rle_utils.decode({"size": [h, w], "counts": batch["rle_counts"][i]})
            except Exception as e:
                preset[n] = (flow.QUARANTINED, f"invalid RLE for image_id {image_id} instance {batch['instance_id'][i]}: {e}")
        return flow.extract(image, masks, self.cfg, preset)

    def __call__(self, batch: dict):
        """Yields one output batch per `images_per_step` images of the input block (a generator:
        Ray Data streams each downstream as it is made, so a large block holds no more patches at
        once than a small one)."""
        n = len(batch["image_id"])
        # Rows of one image, in (source_file, position) order so the first of duplicates is kept.
        order = sorted(range(n), key=lambda i: (int(batch["image_id"][i]), str(batch["source_file"][i]), int(batch["position"][i])))
        images: dict[int, list[int]] = {}
        for i in order:
            images.setdefault(int(batch["image_id"][i]), []).append(i)
        groups = list(images.values())
        step = self.images_per_step or max(1, len(groups))
        for k in range(0, len(groups), step):
            yield self._extract(batch, groups[k : k + step])

    def _extract(self, batch: dict, groups: list[list[int]]) -> dict:
        """The instances of some images (row indices per image) -> their output rows with patches."""
        rows, cols = [], {k: [] for k in PATCH_COLUMNS}
        for idx in groups:
            pb = self._image(batch, idx)
            for j, i in enumerate(idx):
                span = pb.span(j)
                rows.append(i)
                cols["status"].append(pb.status[j])
                cols["reason"].append(pb.reason[j])
                cols["num_patches"].append(span.stop - span.start)
                cols["boxes"].append(pb.boxes[span].astype(np.int32).tobytes())
                cols["img"].append(pb.img[span].tobytes())
                cols["msk"].append(pb.msk[span].tobytes())
        out = {k: np.asarray(batch[k])[rows] for k in META}
        out.update(status=_column(cols["status"]), reason=_column(cols["reason"]),
                   num_patches=_column(cols["num_patches"], np.int64), boxes=_column(cols["boxes"]),
                   img=_column(cols["img"]), msk=_column(cols["msk"]), extract_actor=_column([self.actor] * len(rows)))
        return out


def _patches(batch: dict, name: str, shape: tuple) -> np.ndarray:
    """The flat buffers of a column, concatenated into one writable array -> (K, *shape)."""
    bufs = batch[name]
    out = np.empty(sum(len(b) for b in bufs), np.uint8)
    at = 0
    for b in bufs:
        out[at : at + len(b)] = np.frombuffer(b, np.uint8)
        at += len(b)
    return out.reshape(-1, *shape)


class RefinePatches:
    """Instance rows with patches -> the same rows with uint8 probabilities (0..255) instead of the
    image and mask patches. The model is loaded once per actor; the patches of every row in the
    batch share network batches of `net_batch`."""

    def __init__(self, method: str, checkpoint: str | None, device: str, config: dict, threads: int = 1,
                 fail_on_batch: int | None = None, net_batch: int = 64):
        import torch

        from bpr_core.refiner import make_patch_refiner

        torch.set_num_threads(max(1, threads))
        from .storage import local_file

        self.refiner, self.cfg, _ = make_patch_refiner(method, local_file(checkpoint), device, BPRConfig.from_dict(config))
        self.calls = 0
        self.net_batch = net_batch
        self.actor = actor_id("refine")
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
        s = self.cfg.crop_size
        img, msk = _patches(batch, "img", (s, s, 3)), _patches(batch, "msk", (s, s))
        probs = flow.predict_u8(self.refiner, img, msk, self.net_batch)
        ends = np.cumsum(np.asarray(batch["num_patches"], np.int64))
        starts = ends - np.asarray(batch["num_patches"], np.int64)
        out = {k: v for k, v in batch.items() if k not in ("img", "msk")}
        out["prob"] = _column([probs[a:b].tobytes() for a, b in zip(starts, ends)])
        out["refine_actor"] = _column([self.actor] * len(starts))
        return out


def _plain(v):
    """numpy scalars -> Python values (what pyarrow's from_pylist takes)."""
    return v.item() if isinstance(v, np.generic) else v


def finish_row(row: dict, cfg: BPRConfig, provenance: dict) -> dict:
    """One instance row with its probabilities -> its output row (REFINED_SCHEMA)."""
    status, reason = str(row["status"]), str(row["reason"])
    h, w = int(row["rle_h"]), int(row["rle_w"])
    counts, coarse_area, refined_area, npatch = row["rle_counts"], -1, -1, int(row["num_patches"])
    if status != flow.QUARANTINED:
        coarse = rle_utils.decode({"size": [h, w], "counts": counts})
        coarse_area = refined_area = int(coarse.sum())
        if npatch:
            s = cfg.crop_size
            boxes = np.frombuffer(row["boxes"], np.int32).reshape(-1, 4).astype(np.int64)
            probs = np.frombuffer(row["prob"], np.uint8).reshape(-1, s, s)
            refined, rejected = flow.finish_instance(coarse, boxes, probs, cfg)
            if rejected:
                status, reason = flow.PASSED, rejected
            else:
                counts = rle_utils.encode(refined)["counts"]
                refined_area = int(refined.sum())
    out = {k: _plain(row[k]) for k in META if k != "shard"}
    out.update(rle_counts=counts, status=status, reason=reason, coarse_area=coarse_area, refined_area=refined_area,
               num_patches=npatch, **provenance)
    return out


RESULT_JSON = "result_json"  # a part's column holding each row's refined.json entry, serialised


def part_schema():
    """The schema of a written part: REFINED_SCHEMA plus the serialised refined.json entry."""
    import pyarrow as pa

    from bpr_core.formats import REFINED_SCHEMA

    return REFINED_SCHEMA.append(pa.field(RESULT_JSON, pa.string()))


def part_name(rows: list[dict]) -> str:
    """A part's file name from its content: the instances it holds (source file and position)."""
    h = hashlib.sha256()
    for r in rows:
        h.update(f"{r['source_file']}#{r['position']}|".encode())
    return f"part-{h.hexdigest()[:20]}.parquet"


class WriteParts:
    """The grouping stage: instance rows (each already holding all of its patches) -> pasted, RLE
    encoded output rows, written by the worker as one Parquet part per shard present in the batch
    under OUT/parts/shard-NNNNN/ (atomically, named by content, so a retried task rewrites the same
    file). Returns one small receipt per part for the driver's commit bookkeeping: the shard, its
    instance and patch counts, and the images that could not be read."""

    def __init__(self, out_uri: str, config: dict, model_name: str, model_version: str, config_hash: str,
                 with_source: bool = False):
        self.out_uri, self.cfg = out_uri, BPRConfig.from_dict(config)
        self.provenance = {"model_name": model_name, "model_version": model_version, "config_hash": config_hash}
        self.with_source = with_source  # refined.json entries name their source file (inputs of several files)

    def __call__(self, batch: dict) -> dict:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from bpr_core.formats import row_to_result

        from .storage import write_bytes_atomic

        n = len(batch["image_id"])
        by_shard: dict[int, list[dict]] = {}
        for i in range(n):
            row = finish_row({k: batch[k][i] for k in batch}, self.cfg, self.provenance)
            # The row's refined.json entry, serialised here by the worker: the driver only concatenates.
            row[RESULT_JSON] = json.dumps(row_to_result(row, self.with_source), separators=(",", ":"))
            by_shard.setdefault(int(batch["shard"][i]), []).append(row)
        receipts = {"shard": [], "part": [], "instances": [], "patches": [], "failed_images": [], "actors": []}
        actors = sorted({str(a) for col in ("extract_actor", "refine_actor") if col in batch for a in batch[col]})
        out = resolve(self.out_uri)
        for shard, rows in sorted(by_shard.items()):
            rows.sort(key=lambda r: (r["image_id"], r["instance_id"], r["source_file"], r["position"]))
            name = part_name(rows)
            buf = io.BytesIO()
            pq.write_table(pa.Table.from_pylist(rows, schema=part_schema()), buf)
            write_bytes_atomic(out.join("parts", f"shard-{shard:05d}", name), buf.getvalue())
            failed: dict[str, list] = {}  # image_id -> [its first read error, instances on it]
            for r in rows:
                if r["status"] == flow.QUARANTINED and is_read_failure(r["reason"]):
                    failed.setdefault(str(r["image_id"]), [r["reason"], 0])[1] += 1
            receipts["shard"].append(shard)
            receipts["part"].append(name)
            receipts["instances"].append(len(rows))
            receipts["patches"].append(sum(r["num_patches"] for r in rows))
            receipts["failed_images"].append(json.dumps(failed))
            receipts["actors"].append(json.dumps(actors))
        return {"shard": np.asarray(receipts["shard"], np.int64), "part": _column(receipts["part"]),
                "instances": np.asarray(receipts["instances"], np.int64), "patches": np.asarray(receipts["patches"], np.int64),
                "failed_images": _column(receipts["failed_images"]), "actors": _column(receipts["actors"])}
