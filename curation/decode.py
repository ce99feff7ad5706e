"""Decode, check, orient, resize and re-encode one downloaded image.

This replaces img2dataset's OpenCV resizer (same call signature, so its Downloader uses it
unchanged) because web images need what that resizer does not do: the pixel count is checked
from the header before any decoding (decompression bombs), EXIF orientation is applied,
16-bit, CMYK, palette and alpha images become plain 8-bit RGB, animated images give their first
frame, and each failure carries an error class that the pool manifest can count.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from curation.errors import DecodeError

# Orientations 5-8 swap width and height when applied.
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION_TAG = 0x0112


@dataclass(frozen=True)
class ImageConfig:
    """How downloaded images are stored."""

    image_size: int = 512  # shorter side of the stored image
    resize_only_if_bigger: bool = True
    max_pixels: int = 2**26  # 67 MP: a 8k x 8k photo passes, a decompression bomb does not
    encode_quality: int = 95

    def __post_init__(self) -> None:
        if self.image_size < 8:
            raise ValueError(f"image_size must be at least 8 pixels, got {self.image_size}")
        if not 1 <= self.encode_quality <= 100:
            raise ValueError(f"encode_quality is a JPEG quality in [1, 100], got {self.encode_quality}")
        if self.max_pixels <= 0:
            raise ValueError(f"max_pixels must be positive, got {self.max_pixels}")


@dataclass(frozen=True)
class DecodedImage:
    jpeg: bytes
    width: int
    height: int
    original_width: int
    original_height: int


def _sniff_non_image(data: bytes) -> None:
    head = data[:512].lstrip().lower()
    if b"<svg" in head or (head.startswith(b"<?xml") and b"svg" in data[:4096].lower()):
        raise DecodeError("unsupported_format", "SVG vector images are not rasterised")
    if head.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        raise DecodeError("not_an_image", "the server sent an HTML page instead of an image")


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # PIL's own conversion clips 16-bit values at 255; scale to 8 bits instead.
        array = np.asarray(img, dtype=np.uint32)
        shift = 8 if array.max(initial=0) > 255 else 0
        img = Image.fromarray((array >> shift).clip(0, 255).astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def decode_image(data: bytes, config: ImageConfig) -> DecodedImage:
    """Return the stored JPEG and sizes, or raise ``DecodeError`` with an error class."""
    if not data:
        raise DecodeError("empty_body", "the server returned no bytes")
    _sniff_non_image(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise DecodeError("too_many_pixels", str(err)) from err
    except UnidentifiedImageError as err:
        raise DecodeError("undecodable_image", "not a known image format") from err
    width, height = img.size
    if width * height > config.max_pixels:
        raise DecodeError(
            "too_many_pixels", f"{width}x{height} exceeds the limit of {config.max_pixels} pixels"
        )
    orientation = img.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    if orientation in _TRANSPOSING_ORIENTATIONS:
        width, height = height, width
    if img.format == "JPEG":
        # Decode at a reduced DCT scale when the stored size allows it: much faster.
        target = config.image_size
        img.draft(img.mode, (target, target))
    try:
        img.seek(0)  # first frame of an animation
        img.load()
    except OSError as err:
        if "truncated" in str(err):
            raise DecodeError("truncated_image", str(err)) from err
        raise DecodeError("undecodable_image", str(err)) from err
    except (SyntaxError, ValueError, EOFError) as err:
        raise DecodeError("undecodable_image", str(err) or type(err).__name__) from err
    img = _to_rgb(ImageOps.exif_transpose(img))
    short = min(img.size)
    if short > config.image_size or (not config.resize_only_if_bigger and short != config.image_size):
        scale = config.image_size / short
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=config.encode_quality)
    return DecodedImage(out.getvalue(), img.width, img.height, width, height)


class ImageResizer:
    """img2dataset's resizer interface: ``(stream, bbox_list) -> (bytes, w, h, ow, oh, error)``."""

    def __init__(self, config: ImageConfig):
        self.config = config

    def __call__(self, img_stream, blurring_bbox_list=None):
        img_stream.seek(0)
        try:
            out = decode_image(img_stream.read(), self.config)
        except DecodeError as err:
            return None, None, None, None, None, str(err)
        return out.jpeg, out.width, out.height, out.original_width, out.original_height, None
