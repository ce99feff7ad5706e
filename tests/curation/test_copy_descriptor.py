import io

import numpy as np
import pdqhash
import pytest
from PIL import Image, ImageDraw, ImageEnhance

from curation.copy_descriptor import (
    DECONTAMINATION_THRESHOLD,
    DEDUP_THRESHOLD,
    MIN_QUALITY,
    DescriptorConfig,
    describe,
    descriptors,
)
from curation.dedup import DedupConfig, copy_components


def draw(rng: np.random.Generator, size=(320, 240)) -> Image.Image:
    """Random filled shapes and lines on a random background."""
    width, height = size
    image = Image.new("RGB", size, tuple(int(v) for v in rng.integers(0, 256, 3)))
    canvas = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(4, 12))):
        x0, y0 = int(rng.integers(-40, width)), int(rng.integers(-40, height))
        box = [x0, y0, x0 + int(rng.integers(10, width // 2)), y0 + int(rng.integers(10, height // 2))]
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        kind = rng.integers(0, 4)
        if kind == 0:
            canvas.ellipse(box, fill=colour)
        elif kind == 1:
            canvas.rectangle(box, fill=colour)
        elif kind == 2:
            canvas.polygon([tuple(int(v) for v in rng.integers(0, width, 2)) for _ in range(3)], fill=colour)
        else:
            canvas.line(box, fill=colour, width=int(rng.integers(2, 12)))
    return image


def distinct_images(count: int, seed: int = 0) -> list[Image.Image]:
    """Drawn images whose PDQ hash is trustworthy (flat drawings are excluded, as in the pipeline)."""
    rng = np.random.default_rng(seed)
    images: list[Image.Image] = []
    while len(images) < count:
        image = draw(rng)
        if describe([image], with_mirrored=False).quality[0] >= MIN_QUALITY:
            images.append(image)
    return images


def jpeg_q50(image):
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=50)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def half_size(image):
    return image.resize((image.width // 2, image.height // 2), Image.Resampling.BILINEAR)


def centre_crop_90(image):
    dx, dy = image.width // 20, image.height // 20
    return image.crop((dx, dy, image.width - dx, image.height - dy))


def brighter(image):
    return ImageEnhance.Brightness(image).enhance(1.3)


def with_text(image):
    image = image.copy()
    ImageDraw.Draw(image).text((5, image.height - 15), "(c) example.com", fill=(255, 255, 255))
    return image


COPY_TRANSFORMS = [jpeg_q50, half_size, centre_crop_90, brighter, with_text]


@pytest.fixture(scope="module")
def originals():
    return distinct_images(12)


def test_descriptors_are_unit_vectors(originals):
    vectors = descriptors(originals)
    assert vectors.shape == (12, 256) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("transform", COPY_TRANSFORMS, ids=lambda t: t.__name__)
def test_copies_stay_above_the_dedup_threshold(originals, transform):
    similarity = (descriptors(originals) * descriptors([transform(image) for image in originals])).sum(axis=1)
    assert similarity.min() > DEDUP_THRESHOLD


def test_distinct_images_stay_below_the_thresholds(originals):
    result = describe(originals)
    direct = result.vectors @ result.vectors.T
    mirror = result.vectors @ result.mirrored.T
    off_diagonal = ~np.eye(len(originals), dtype=bool)
    assert direct[off_diagonal].max() < DECONTAMINATION_THRESHOLD < DEDUP_THRESHOLD
    assert mirror[off_diagonal].max() < DECONTAMINATION_THRESHOLD


def test_mirrored_descriptors_catch_flips(originals):
    result = describe(originals)
    flipped = descriptors([image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for image in originals])
    np.testing.assert_allclose((flipped * result.mirrored).sum(axis=1), 1.0, atol=1e-5)
    assert (flipped * result.vectors).sum(axis=1).max() < DEDUP_THRESHOLD  # the limitation mirrors fix


def test_single_scale_is_plain_pdq_with_the_hamming_relation(originals):
    first, second = (image.resize((160, 120)) for image in originals[:2])  # small: hashed as they are
    vectors = descriptors([first, second], DescriptorConfig(scales=(1.0,)))
    bits = [pdqhash.compute(np.asarray(image))[0] for image in (first, second)]
    hamming = int((bits[0] != bits[1]).sum())
    assert float(vectors[0] @ vectors[1]) == pytest.approx(1 - 2 * hamming / 256, abs=1e-6)


def test_dedup_groups_each_image_with_its_copies(originals):
    images = list(originals)
    groups = list(range(len(originals)))
    for transform in [*COPY_TRANSFORMS, lambda image: image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]:
        images += [transform(image) for image in originals]
        groups += list(range(len(originals)))
    result = describe(images)
    dedup = copy_components(
        result.vectors, DedupConfig(k=16, threshold=DEDUP_THRESHOLD), mirrored=result.mirrored
    )
    groups = np.array(groups)
    np.testing.assert_array_equal(
        dedup.component[:, None] == dedup.component[None, :], groups[:, None] == groups[None, :]
    )


def test_flat_images_have_low_quality():
    flat = Image.new("RGB", (200, 150), (120, 40, 200))
    assert describe([flat], with_mirrored=False).quality[0] < MIN_QUALITY


def test_config_validation():
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        DescriptorConfig(scales=(1.0, 1.2))
    with pytest.raises(ValueError, match="non-empty"):
        DescriptorConfig(scales=())
