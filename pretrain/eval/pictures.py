"""Pictures of what a backbone sees, as PNG (docs/evaluation.md shows how to read them).

- ``attention.png``: the last block's attention from the CLS token to every patch, one panel per
  head (DINO's "emergent segmentation" figure): a trained head attends to the object, a random one
  spreads its attention evenly.
- ``pca.png``: the first three principal components of the patch tokens shown as RGB (DINOv2's
  figure): parts that the features consider alike get alike colours. The components are fitted over
  the patches of all the pictured images together, so colours compare across images.

    python -m pretrain.eval.pictures --checkpoint OUTPUT_DIR/teacher_backbone.safetensors \\
        --images DIR_OR_FILES [--max-images 6] [--output-dir DIR] [--random-baseline]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from pretrain.data.augment import IMAGENET_MEAN, IMAGENET_STD
from pretrain.data.sources import IMAGE_EXTENSIONS
from pretrain.eval.cli import add_backbone_arguments, eval_folder, load_for_cli, run
from pretrain.eval.features import EvalInputError, load_eval_images, random_backbone
from pretrain.models import VisionTransformer

__all__ = [
    "ATTENTION_FILE",
    "PCA_FILE",
    "Pictures",
    "cls_attention_maps",
    "compute_pictures",
    "displayable",
    "main",
    "pca_colours",
    "save_attention_figure",
    "save_pca_figure",
    "save_pictures",
]

ATTENTION_FILE = "attention.png"
PCA_FILE = "pca.png"
PANEL_INCHES = 1.6


@torch.no_grad()
def cls_attention_maps(model: VisionTransformer, images: Tensor) -> Tensor:
    """(B, heads, h, w): the last block's attention weights from the CLS token to each patch (the
    rest of each row, up to 1, goes to the CLS token itself and the registers)."""
    weights = model.get_last_self_attention(images)  # (B, heads, N, N), explicit attention path
    height, width = images.shape[-2] // model.patch_size, images.shape[-1] // model.patch_size
    return weights[:, :, 0, model.num_prefix_tokens :].float().reshape(len(images), -1, height, width)


def pca_colours(patches: Tensor, grid: tuple[int, int]) -> Tensor:
    """Patch tokens (B, P, D) -> RGB (B, h, w, 3) in [0, 1]: the projections on the first three
    principal components of all B × P tokens, each min-max scaled over all images."""
    tokens = patches.flatten(0, 1).float()
    centred = tokens - tokens.mean(dim=0)
    components = torch.linalg.svd(centred, full_matrices=False).Vh[:3]  # (≤3, D), by variance
    projected = centred @ components.T
    low, high = projected.min(dim=0).values, projected.max(dim=0).values
    colours = torch.zeros(len(tokens), 3)  # fewer than 3 components (tiny inputs): the rest stay black
    colours[:, : projected.shape[1]] = (projected - low) / (high - low).clamp_min(1e-12)
    return colours.reshape(len(patches), *grid, 3)


def displayable(images: Tensor) -> np.ndarray:
    """Normalised images (B, 3, H, W) -> uint8 (B, H, W, 3) for display."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    pixels = (images.detach().float().cpu() * std + mean).clamp(0, 1)
    return (pixels.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()


def _figure(rows: int, columns: int) -> tuple[Figure, np.ndarray]:
    figure = Figure(figsize=(columns * PANEL_INCHES, rows * PANEL_INCHES), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False)
    for axis in axes.flat:
        axis.set_axis_off()
    return figure, axes


def save_attention_figure(images: np.ndarray, maps: Tensor, path: Path) -> None:
    """One row per image: the image, then each head's CLS attention map (each scaled to its maximum)."""
    count, heads = maps.shape[:2]
    figure, axes = _figure(count, heads + 1)
    extent = (0, images.shape[2], images.shape[1], 0)  # the maps cover the image they come from
    for row in range(count):
        axes[row, 0].imshow(images[row])
        for head in range(heads):
            attention = maps[row, head]
            axes[row, head + 1].imshow(
                (attention / attention.max().clamp_min(1e-12)).numpy(), cmap="inferno", vmin=0, vmax=1,
                interpolation="nearest", extent=extent,
            )  # fmt: skip
    axes[0, 0].set_title("image", fontsize=8)
    for head in range(heads):
        axes[0, head + 1].set_title(f"head {head + 1}", fontsize=8)
    figure.savefig(path, dpi=100)


def save_pca_figure(images: np.ndarray, colours: Tensor, path: Path) -> None:
    """Two rows: the images, and below each its patch tokens' PCA colours."""
    figure, axes = _figure(2, len(images))
    extent = (0, images.shape[2], images.shape[1], 0)
    for column, (image, colour) in enumerate(zip(images, colours)):
        axes[0, column].imshow(image)
        axes[1, column].imshow(colour.numpy(), interpolation="nearest", extent=extent)
    axes[0, 0].set_title("image", fontsize=8, loc="left")
    axes[1, 0].set_title("patch PCA → RGB", fontsize=8, loc="left")
    figure.savefig(path, dpi=100)


@dataclass(frozen=True)
class Pictures:
    """What the two figures show, computed (every process under FSDP) apart from saving (rank 0)."""

    images: np.ndarray  # (B, S, S, 3) uint8
    attention: Tensor  # (B, heads, h, w), from cls_attention_maps
    pca: Tensor  # (B, h, w, 3), from pca_colours


@torch.no_grad()
def compute_pictures(model: VisionTransformer, images: Tensor) -> Pictures:
    """The pictures of normalised ``images`` (B, 3, S, S) on ``model``'s device, ``model`` in eval mode."""
    features = model.forward_features(images)
    return Pictures(
        displayable(images),
        cls_attention_maps(model, images).cpu(),
        pca_colours(features["patches"].cpu(), features["grid"]),
    )


def save_pictures(pictures: Pictures, folder: Path) -> list[Path]:
    """attention.png and pca.png in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / ATTENTION_FILE, folder / PCA_FILE]
    save_attention_figure(pictures.images, pictures.attention, paths[0])
    save_pca_figure(pictures.images, pictures.pca, paths[1])
    return paths


def _image_files(sources: Sequence[Path], limit: int) -> list[Path]:
    files: list[Path] = []
    for source in sources:
        if source.is_dir():
            files += sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        elif source.is_file():
            files.append(source)
        else:
            raise EvalInputError(f"--images {source} is neither an image file nor a folder")
    if not files:
        raise EvalInputError(
            f"no image in --images {' '.join(map(str, sources))}: give image files or folders holding images "
            f"with an extension in {sorted(IMAGE_EXTENSIONS)}"
        )
    return files[:limit]


def _main(argv: Sequence[str] | None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.eval.pictures", description=__doc__.split("\n\n")[0]
    )
    add_backbone_arguments(parser)
    parser.add_argument("--images", type=Path, nargs="+", required=True, help="image files or folders")
    parser.add_argument("--max-images", type=int, default=6, help="the first N images, in sorted order")
    parser.add_argument("--output-dir", type=Path, default=None, help="default: eval/pictures beside the checkpoint")
    parser.add_argument(
        "--random-baseline",
        action="store_true",
        help="also draw a randomly initialised network of the same shape, in OUTPUT_DIR/random/",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random baseline network")
    args = parser.parse_args(argv)
    files = _image_files(args.images, args.max_images)
    backbone, device, image_size = load_for_cli(args)
    folder = args.output_dir or eval_folder(args.checkpoint) / "pictures"
    batch = load_eval_images(files, image_size).to(device)
    drawn = {folder: backbone.model}
    if args.random_baseline:
        drawn[folder / "random"] = random_backbone(backbone.spec, args.seed).to(device)
    for destination, model in drawn.items():
        for path in save_pictures(compute_pictures(model, batch), destination):
            print(f"wrote {path}")


def main(argv: Sequence[str] | None = None) -> int:
    return run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
