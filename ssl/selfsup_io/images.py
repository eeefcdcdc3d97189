"""Image safety shared by the trainer's decoder, the evaluator and ``selfsup-shards``.

* :func:`to_8bit`: 16-bit images (PNG and PGM store grayscale as 16 bits, PIL opens them as
  ``I;16``/``I``) are scaled to 8 bits by their high byte. PIL's own ``convert("L"/"RGB")``
  clips such values at 255 instead, which turns a 16-bit photo into a black-and-white mask of
  {0, 255}. 16-bit colour PNGs already arrive as 8-bit RGB(A) from PIL, so nothing else changes.
* :func:`check_pixels`: how many pixels a reader may decode, *or produce by resizing*. A PNG of
  a hundred bytes can declare 20,000 x 20,000 pixels (a "decompression bomb"), and an innocent
  1 x 20,000 strip becomes 256 x 5,120,000 pixels when its shorter side is resized to 256 (4.6
  GB seen in evaluation). Both are refused before anything is allocated, as a sample problem
  (skipped and counted, or named by ``selfsup-shards``). The limit is PIL's own warning threshold
  (``Image.MAX_IMAGE_PIXELS``, about 89 M pixels, ~270 MB as RGB) unless ``SELFSUP_MAX_PIXELS``
  says otherwise: PIL only *refuses* at twice that, and every loader worker may hold one.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # 16-bit (or 32-bit int) grayscale
MAX_PIXELS_ENV = "SELFSUP_MAX_PIXELS"


class ImageTooLarge(ValueError):
    """An image whose decoding or resizing would allocate more than :func:`max_pixels`."""


def max_pixels() -> int:
    value = os.environ.get(MAX_PIXELS_ENV)
    if value:
        return int(value)
    return int(Image.MAX_IMAGE_PIXELS or 89_478_485)


def check_pixels(width: int, height: int, what: str = "image") -> None:
    """Raise :class:`ImageTooLarge` if a ``width`` x ``height`` image (decoded, or the result of
    a resize) exceeds :func:`max_pixels`. Call it with the size a step *will* allocate."""
    limit = max_pixels()
    if width * height > limit:
        raise ImageTooLarge(f"{what} of {width}x{height} pixels is more than the {limit} a reader "
                            f"allocates ({MAX_PIXELS_ENV})")


def to_8bit(img: Image.Image) -> Image.Image:
    """``img`` with 8 bits per channel: 16-bit (and 32-bit integer) grayscale → ``L`` by the
    high byte of 16 bits (values above 65535 saturate); any other mode is returned as it is."""
    if img.mode not in WIDE_MODES:
        return img
    arr = np.asarray(img).astype(np.int64)
    return Image.fromarray(np.clip(arr >> 8, 0, 255).astype(np.uint8))  # 2-D uint8: mode L
