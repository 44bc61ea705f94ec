"""Decoded images to 8-bit RGB: deeper pixels scaled or refused, never clipped into a white picture."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from adaptclip.adapt.images import UnsupportedImage, to_rgb
from adaptclip.server.decode import decode_image
from adaptclip.server.errors import RequestError


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def _sixteen_bit() -> tuple[np.ndarray, Image.Image]:
    values = np.array([[0, 1, 128, 129], [257, 32767, 65407, 65535]], np.uint16)
    return values, Image.fromarray(values)  # uint16: mode I;16


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_sixteen_bit_grey_is_scaled_not_clipped(fmt: str) -> None:
    values, image = _sixteen_bit()
    decoded = Image.open(io.BytesIO(_encoded(image, fmt)))
    assert decoded.mode.startswith("I;16")
    got = np.asarray(to_rgb(decoded))
    want = np.rint(values / 257.0).astype(np.uint8)
    assert got.shape == (2, 4, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, np.repeat(want[..., None], 3, axis=2))
    assert (np.asarray(decoded.convert("RGB"))[1] == 255).all(), "PIL's own conversion clips: why to_rgb scales"


def test_big_endian_sixteen_bit_reads_the_same() -> None:
    values, image = _sixteen_bit()
    big = Image.frombytes("I;16B", image.size, values.astype(">u2").tobytes())
    np.testing.assert_array_equal(np.asarray(to_rgb(big)), np.asarray(to_rgb(image)))


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "LA", "1", "YCbCr"])
def test_eight_bit_modes_convert_as_pil_does(mode: str) -> None:
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8))
    image = rgb.convert(mode)
    np.testing.assert_array_equal(np.asarray(to_rgb(image)), np.asarray(image.convert("RGB")))
    assert to_rgb(rgb) is rgb


@pytest.mark.parametrize("mode,value", [("F", 0.5), ("I", 70000)])
def test_wide_pixels_are_refused_with_the_mode_named(mode: str, value: float) -> None:
    image = Image.new(mode, (4, 4), value)
    with pytest.raises(UnsupportedImage, match=f"mode {mode} "):
        to_rgb(image)
    with pytest.raises(RequestError) as err:  # the server: INVALID_ARGUMENT naming the field
        decode_image(_encoded(image, "TIFF"), max_bytes=10**6, max_pixels=10**6, field="images[3]")
    assert err.value.field == "images[3]" and f"mode {mode}" in str(err.value)
