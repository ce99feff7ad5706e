"""Decoding web images: awkward but valid encodings succeed, broken bodies fail by class."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from curation import demo_web
from curation.decode import ImageConfig, ImageResizer, decode_image
from curation.errors import DecodeError

CONFIG = ImageConfig(image_size=512)


def _reference(width=120, height=80) -> Image.Image:
    rng = np.random.default_rng(0)
    return demo_web.draw_concept(rng, "arrow", width, height)[0]


def _decoded(data: bytes, config: ImageConfig = CONFIG) -> tuple[Image.Image, object]:
    out = decode_image(data, config)
    return Image.open(io.BytesIO(out.jpeg)), out


@pytest.mark.parametrize("fmt", demo_web.AWKWARD_FORMATS)
def test_awkward_formats_decode_to_rgb_with_the_right_content(fmt):
    reference = _reference()
    data, _ = demo_web._awkward(reference, fmt)
    img, out = _decoded(data)
    assert img.mode == "RGB"
    assert (out.width, out.height) == (out.original_width, out.original_height) == reference.size
    expected = np.asarray(reference.convert("L"), dtype=float)
    got = np.asarray(img.convert("L"), dtype=float)
    if fmt == "rgba_png":  # the transparent strip is composited on white
        expected, got = expected[:, reference.width // 6 + 1 :], got[:, reference.width // 6 + 1 :]
    assert np.abs(expected - got).mean() < 12, "decoded content differs from the encoded image"


def test_exif_rotation_is_applied():
    reference = _reference(120, 80)
    data, _ = demo_web._awkward(reference, "exif_rotated_jpeg")
    assert Image.open(io.BytesIO(data)).size == (80, 120)  # stored sideways
    img, out = _decoded(data)
    assert img.size == (120, 80) and (out.original_width, out.original_height) == (120, 80)


def test_sixteen_bit_values_are_scaled_not_clipped():
    grey = np.full((32, 32), 40000, dtype=np.uint16)  # 40000 / 257 = 155 in 8 bits
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, format="PNG")
    img, _ = _decoded(buf.getvalue())
    assert abs(np.asarray(img).mean() - 155) < 3


def test_animated_gif_gives_its_first_frame():
    reference = _reference()
    data, _ = demo_web._awkward(reference, "animated_gif")
    img, _ = _decoded(data)
    first = np.asarray(reference.convert("L"), dtype=float)
    assert np.abs(np.asarray(img.convert("L"), dtype=float) - first).mean() < 12


@pytest.mark.parametrize(
    ("data", "error_class"),
    [
        (b"", "empty_body"),
        (b"<!DOCTYPE html><html><body>hi</body></html>", "not_an_image"),
        (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"></svg>', "unsupported_format"),
        (bytes(np.random.default_rng(1).integers(0, 256, 2000, dtype=np.uint8)), "undecodable_image"),
        (demo_web._jpeg(_reference())[:700], "truncated_image"),
        (demo_web._bomb_png(), "too_many_pixels"),
    ],
    ids=["empty", "html", "svg", "random", "truncated", "bomb"],
)
def test_broken_bodies_fail_with_their_class(data, error_class):
    with pytest.raises(DecodeError) as err:
        decode_image(data, CONFIG)
    assert err.value.error_class == error_class


def test_pixel_limit_is_configurable():
    data = demo_web._jpeg(_reference(120, 80))
    with pytest.raises(DecodeError, match="too_many_pixels"):
        decode_image(data, ImageConfig(max_pixels=120 * 80 - 1))


def test_resize_keeps_aspect_and_sets_the_shorter_side():
    img, out = _decoded(demo_web._jpeg(_reference(200, 100)), ImageConfig(image_size=50))
    assert img.size == (100, 50) and (out.original_width, out.original_height) == (200, 100)


def test_small_images_are_not_upscaled_by_default():
    img, _ = _decoded(demo_web._jpeg(_reference(60, 40)), ImageConfig(image_size=50))
    assert img.size == (60, 40)


def test_resizer_speaks_img2dataset_interface():
    resizer = ImageResizer(ImageConfig(image_size=50))
    jpeg, width, height, ow, oh, err = resizer(io.BytesIO(demo_web._jpeg(_reference(200, 100))))
    assert err is None and (width, height, ow, oh) == (100, 50, 200, 100) and jpeg[:2] == b"\xff\xd8"
    assert resizer(io.BytesIO(b""))[-1].startswith("empty_body")


@pytest.mark.parametrize("bad", [dict(image_size=2), dict(encode_quality=0), dict(max_pixels=0)])
def test_bad_image_config_says_the_valid_range(bad):
    with pytest.raises(ValueError, match="must|quality"):
        ImageConfig(**bad)
