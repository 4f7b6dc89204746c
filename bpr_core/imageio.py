"""Image decoding with one EXIF policy and a pixel limit, used everywhere bpr reads a photo
(refinement, training, calibration, overlays).

EXIF policy. Decoders disagree: OpenCV's default and Pillow's `exif_transpose` rotate a photo by
its EXIF orientation tag, while COCO's annotations and most mask files are sized to the *stored*
pixels. bpr decodes the stored pixels by default (`exif="stored"`): the image is exactly the array
in the file, so a mask sized to the file lines up whatever the tag says. Detectors that rotated
their input (detectron2's `read_image`, OpenCV's plain `imread`) produced masks sized to the
rotated picture; for those pass `exif="apply"` (`--exif apply` on the command line) and bpr rotates
the image the same way. A mask whose size matches neither is a size mismatch; the reason names the
tag when the file has one, so a rotated mask is never silently refined against the wrong pixels
(for square images the size cannot tell, which is why the policy is explicit, never guessed).

Pixel limit. The header is read (Pillow, no pixel data) before anything is decoded; an image with
more than `max_pixels` pixels is refused with a reason instead of decoding a few-KB file into
gigabytes (a 20000x20000 PNG of one colour is about 1 MB on disk, 1.2 GB decoded).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import cv2
import numpy as np

EXIF_POLICIES = ("stored", "apply")
DEFAULT_MAX_PIXELS = 100_000_000  # 100 MP: above any common camera; 48 MP phone photos pass
ORIENTATION_TAG = 0x0112
# Orientations 5-8 swap width and height; 2-4 flip/rotate in place.
TRANSPOSING = {5, 6, 7, 8}


class ImageRejected(ValueError):
    """The image cannot be used: unreadable header, over the pixel limit, or undecodable."""


@dataclass(frozen=True)
class ImageHeader:
    height: int  # stored pixels
    width: int
    orientation: int  # EXIF orientation tag, 1 (or absent) = as stored

    @property
    def pixels(self) -> int:
        return self.height * self.width

    def shape(self, exif: str = "stored") -> tuple[int, int]:
        """(height, width) of the decoded array under an EXIF policy."""
        if exif == "apply" and self.orientation in TRANSPOSING:
            return self.width, self.height
        return self.height, self.width


def read_header(data: bytes, where: str) -> ImageHeader:
    """Size and EXIF orientation from the file's header, without decoding pixels."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                try:
                    orientation = int(im.getexif().get(ORIENTATION_TAG, 1) or 1)
                except Exception:  # a broken EXIF block: treat as untagged, decoding decides
                    orientation = 1
    except Image.DecompressionBombError:  # Pillow's own bound (2x its MAX_IMAGE_PIXELS) refuses to parse it
        bound = 2 * Image.MAX_IMAGE_PIXELS
        raise ImageRejected(f"image {where} has more than {bound / 1e6:.0f} MP (Pillow's decompression-bomb bound, "
                            "the most bpr opens whatever --max-image-pixels says)") from None
    except UnidentifiedImageError:
        raise ImageRejected(f"image {where} is not a recognised image format") from None
    except Exception as e:
        raise ImageRejected(f"image {where} has an unreadable header ({e.__class__.__name__}: {str(e)[:120]})") from None
    return ImageHeader(int(h), int(w), orientation)


def check_pixels(header: ImageHeader, where: str, max_pixels: int) -> None:
    if max_pixels and header.pixels > max_pixels:
        raise ImageRejected(f"image {where} is {header.width}x{header.height} ({header.pixels / 1e6:.1f} MP), "
                            f"over the pixel limit of {max_pixels / 1e6:g} MP (--max-image-pixels)")


def decode_image(data: bytes, where: str, exif: str = "stored", max_pixels: int = DEFAULT_MAX_PIXELS,
                 header: ImageHeader | None = None) -> np.ndarray:
    """Encoded image bytes -> HxWx3 uint8 RGB (grey, RGBA, palette and 16-bit are converted).

    `exif` is the EXIF policy (module docstring); `max_pixels` (0 = no limit) is checked from the
    header before decoding. Raises ImageRejected with a message naming `where`.
    """
    if exif not in EXIF_POLICIES:
        raise ValueError(f"exif must be one of {EXIF_POLICIES}, got {exif!r}")
    header = header or read_header(data, where)
    check_pixels(header, where, max_pixels)
    flags = cv2.IMREAD_COLOR if exif == "apply" else cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if arr is None:
        raise ImageRejected(f"cannot decode image {where}")
    return cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)


def size_mismatch_reason(where: str, image_shape: tuple[int, int], mask_shape: tuple[int, int], header: ImageHeader,
                         exif: str) -> str:
    """Why a mask does not fit its image; names the EXIF tag when the other policy would fit."""
    (ih, iw), (mh, mw) = image_shape, mask_shape
    reason = f"image {where} is {ih}x{iw} but the mask RLE is {mh}x{mw}"
    if header.orientation != 1:
        other = "apply" if exif == "stored" else "stored"
        hint = f"; re-run with --exif {other}" if header.shape(other) == (mh, mw) else ""
        reason += f" (the file has EXIF orientation {header.orientation}; decoded with --exif {exif}{hint})"
    return reason
