"""One image file to an 8-bit RGB picture, read right or refused.

PIL's `convert("RGB")` clips 16-bit pixels to 255 (a 16-bit PNG turns white) and truncates
float pixels to 0 or 1 (a float TIFF turns black), and a huge image is PIL's
`DecompressionBombError` traceback. Here 16-bit images are scaled to 8 bits, float images in
[0, 1] are scaled by 255, other float ranges are refused, and an image larger than
`MAX_IMAGE_PIXELS` is refused from its header, before it is decoded, each with a `DataError`.
"""

from __future__ import annotations

import warnings
from typing import IO

import numpy as np
from PIL import Image

from dynify.errors import DataError

MAX_IMAGE_PIXELS = 89_478_485  # PIL's own limit: a 3.5-GB RGBA bitmap, ~9459 x 9459 pixels
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def open_rgb(file: IO[bytes], where: str) -> Image.Image:
    """The image in `file` as 8-bit RGB; `where` names it in messages."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked below
            image = Image.open(file)
    except Image.DecompressionBombError as exc:
        raise _too_large(where, str(exc)) from None
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise _too_large(where, f"{width} x {height} pixels")
    image.load()
    return to_rgb(image, where)


def _too_large(where: str, what: str) -> DataError:
    return DataError(
        f"Image {where} is too large to decode ({what}; the limit is {MAX_IMAGE_PIXELS:,} "
        "pixels), which is what a decompression bomb looks like. If it is a real image, "
        "shrink it on disk first."
    )


def to_rgb(image: Image.Image, where: str) -> Image.Image:
    """8-bit RGB with 16-bit and float pixels scaled, not clipped."""
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise DataError(
                f"Image {where} holds 32-bit integer pixels from {values.min()} to "
                f"{values.max()}; dynify reads integer images of up to 16 bits. Save it as an "
                "8- or 16-bit image."
            )
        return _gray(((values * 255 + 32767) // 65535).astype(np.uint8))
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if values.size and not np.isfinite(values).all():
            raise DataError(
                f"Image {where} holds NaN or infinite float pixels. Replace the file with a "
                "finite image."
            )
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if low < 0.0 or high > 1.0:
            raise DataError(
                f"Image {where} holds float pixels from {low:g} to {high:g}; dynify reads "
                "float images as intensities in [0, 1]. Rescale it to [0, 1] or save it as "
                "an 8-bit image."
            )
        return _gray(np.rint(values * 255.0).astype(np.uint8))
    return image.convert("RGB")


def _gray(values: np.ndarray) -> Image.Image:
    return Image.fromarray(values).convert("RGB")  # uint8 2-D: mode "L"
