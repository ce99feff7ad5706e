import numpy as np
import torch
from PIL import Image, ImageDraw

from curation.demo_web import CONCEPTS, draw_concept
from curation.embed import check_spec, load_embedder
from curation.shape_descriptor import DIM, SIDE, descriptors, preprocess


def star(centre: tuple[int, int], colour, background, size=(96, 80)) -> Image.Image:
    image = Image.new("RGB", size, background)
    cx, cy = centre
    points = []
    for i in range(10):
        radius = 22 if i % 2 == 0 else 9
        angle = np.pi / 5 * i - np.pi / 2
        points.append((cx + radius * np.cos(angle), cy + radius * np.sin(angle)))
    ImageDraw.Draw(image).polygon(points, fill=colour)
    return image


def square(centre: tuple[int, int], colour, background, size=(96, 80)) -> Image.Image:
    image = Image.new("RGB", size, background)
    cx, cy = centre
    ImageDraw.Draw(image).rectangle([cx - 16, cy - 16, cx + 16, cy + 16], fill=colour)
    return image


def describe(images: list[Image.Image]) -> np.ndarray:
    return descriptors(torch.stack([preprocess(image) for image in images]))


def test_unit_vectors_of_the_documented_size_from_any_image_size():
    images = [star((40, 40), (255, 0, 0), (0, 0, 90)), Image.new("RGB", (13, 300), "white"), Image.new("L", (64, 64))]
    assert preprocess(images[1]).shape == (3, SIDE, SIDE)
    vectors = describe(images)
    assert vectors.shape == (3, DIM) and vectors.dtype == np.float32 and DIM == 300
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert load_embedder("hog").embed(images).shape == (3, DIM)
    info = check_spec("hog")
    assert (info.dim, info.image_size, info.weights) == (DIM, SIDE, None)


def test_same_outline_matches_across_position_and_colour_better_than_another_outline():
    moved = describe([star((36, 34), (250, 40, 40), (10, 10, 120)), star((58, 46), (20, 200, 30), (240, 240, 240))])
    other = describe([square((36, 34), (250, 40, 40), (10, 10, 120))])
    same_outline = float(moved[0] @ moved[1])
    # Shifted by 22 and 12 pixels, other colours, light instead of dark background.
    assert same_outline > 0.97, same_outline
    assert float(moved[0] @ other[0]) < same_outline - 0.05


def test_nearest_neighbour_finds_the_concept_of_demo_web_images():
    """The reason the demo uses it: its concepts are outlines drawn anywhere, in any colour."""
    rng = np.random.default_rng(0)
    concepts = CONCEPTS[:6]
    labels = np.repeat(np.arange(len(concepts)), 12)
    images = [draw_concept(rng, concepts[label], 96, 80)[0] for label in labels]
    vectors = describe(images)
    similarity = vectors @ vectors.T
    np.fill_diagonal(similarity, -np.inf)
    accuracy = float((labels[similarity.argmax(axis=1)] == labels).mean())
    assert accuracy >= 0.6, accuracy  # chance: 1/6
