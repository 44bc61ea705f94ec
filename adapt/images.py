"""Decoded images to the 8-bit RGB every path works on: one rule for the server, the edge and the data.

PIL's convert("RGB") clips deeper pixels at 255, so a 16-bit grayscale PNG or TIFF (mode I;16)
would come out almost white and still get a confident answer. Its values are scaled to 8 bits
instead (round(v / 257), so 0 -> 0 and 65535 -> 255). 32-bit integer and float pixels (modes I, F)
have no agreed range, so they are refused with the mode named rather than guessed at. Everything
else converts as open_clip's pipeline does. No torch here.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


class UnsupportedImage(ValueError):
    """Pixels with no agreed 8-bit reading (32-bit integer or float, signed or packed 16-bit)."""


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB; the image itself when it is RGB already."""
    if image.mode == "RGB":
        return image
    if image.mode in SIXTEEN_BIT:
        wide = np.asarray(image).astype(np.uint32)
        image = Image.fromarray(((wide + 128) // 257).astype(np.uint8))  # mode L
    elif image.mode == "F" or image.mode.startswith("I"):
        kind = {"F": "32-bit float", "I": "32-bit integer"}.get(image.mode, "signed or packed 16-bit")
        raise UnsupportedImage(f"mode {image.mode} ({kind}) pixels have no agreed 8-bit range; "
                               f"send an 8- or 16-bit unsigned image")
    return image.convert("RGB")
