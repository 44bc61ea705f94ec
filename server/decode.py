"""Image decoding with byte and pixel limits, checked before pixels are decoded."""
from __future__ import annotations

import io
import re
import warnings

from PIL import Image, UnidentifiedImageError

from adaptclip.adapt.images import to_rgb
from adaptclip.server.errors import invalid

def check_image_bytes(data: bytes, max_bytes: int, field: str = "image") -> None:
    """The checks that need no decoding: present, and within the byte limit."""
    if not data:
        raise invalid(field, "empty image bytes")
    if len(data) > max_bytes:
        raise invalid(field, f"{len(data)} bytes is over the limit of {max_bytes} bytes")


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int, field: str = "image") -> Image.Image:
    """Decode an encoded image to 8-bit RGB (adapt/images.py); raise INVALID_ARGUMENT naming `field` when it is bad.

    The size is read from the header first, so an oversized image (or a decompression bomb)
    is refused without allocating its pixels.
    """
    check_image_bytes(data, max_bytes, field)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise invalid(field, f"{width}x{height} = {width * height} pixels is over the limit of {max_pixels} pixels")
            img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        # PIL's messages may carry object addresses; keep them stable so the same file gives the same error.
        detail = re.sub(r" at 0x[0-9a-fA-F]+", "", str(exc))
        raise invalid(field, f"cannot decode image ({exc.__class__.__name__}: {detail})") from None
    if width == 0 or height == 0:
        raise invalid(field, "image has zero width or height")
    try:
        return to_rgb(img)
    except ValueError as exc:  # UnsupportedImage, or a mode PIL cannot convert to RGB
        raise invalid(field, f"cannot convert to RGB ({exc})") from None
