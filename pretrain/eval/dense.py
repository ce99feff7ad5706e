"""Dense probe: linear segmentation of the demo web's object masks on frozen patch features.

The demo web (curation/demo_web.py) writes the object mask of each concept image (``mask_path`` in
pages.parquet). A seeded split of those images trains a per-patch linear classifier on the frozen
patch tokens; the rest measure its mean intersection-over-union at pixel resolution (the patch
logits upsampled bilinearly to the image). The same probe on a randomly initialised network of the
same shape is the baseline: the gap is what pretraining put into the patch features.

Classes (``--classes``):

- ``object`` (default): background vs object, 2 classes. Asks whether patch features localise the
  object, the emergent-segmentation property of DINO; it does not depend on telling concepts apart.
- ``concept``: background plus one class per concept (13 on the demo web), semantic segmentation as
  on ADE20k or VOC: the patch must also say which object it belongs to.

Each patch is trained towards the share of each class among its pixels (soft targets), a grid of
learning rates in one pass as in the linear probe; the best head on the evaluation split is reported.

    python -m pretrain.eval.dense --checkpoint OUTPUT_DIR/teacher_backbone.safetensors --demo DEMO_ROOT
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import Dataset
from torchvision import tv_tensors

from pretrain.eval.cli import (
    add_probe_arguments,
    default_output,
    load_for_cli,
    parse_floats,
    run,
    write_json,
)
from pretrain.eval.features import EvalInputError, eval_transform, extract_features, random_backbone
from pretrain.eval.linear import (
    DEFAULT_LEARNING_RATES,
    HeadSetting,
    ParallelLinearHeads,
    head_grid,
    train_linear_heads,
)

__all__ = [
    "MaskedImage",
    "SegmentationImages",
    "class_shares",
    "confusion_matrix",
    "evaluate_segmentation_heads",
    "iou_per_class",
    "main",
    "masked_images",
    "mean_iou",
    "run_dense",
    "segmentation_probe",
    "split_masked_images",
]

ClassMode = Literal["object", "concept"]
BACKGROUND = "background"


@dataclass(frozen=True)
class MaskedImage:
    image: Path
    mask: Path  # L image, > 127 = object
    concept: str


def masked_images(demo_root: Path) -> list[MaskedImage]:
    """The demo web's concept images with their object masks, sorted by file name."""
    pages_path = Path(demo_root) / "pages.parquet"
    if not pages_path.is_file():
        raise EvalInputError(
            f"{pages_path} not found: --demo must be the root of a demo web written by "
            "curation.demo_web.generate (make demo writes one under runs/demo/)"
        )
    pages = pq.read_table(pages_path, columns=["url_template", "kind", "concept", "mask_path"]).to_pylist()
    images = sorted(
        (
            MaskedImage(demo_root / "web" / page["url_template"].rsplit("/", 1)[1], demo_root / page["mask_path"], page["concept"])
            for page in pages
            if page["kind"] == "concept" and page["mask_path"]
        ),
        key=lambda item: item.image.name,
    )
    if len(images) < 2:
        raise EvalInputError(
            f"{pages_path} lists {len(images)} concept images with a mask; the dense probe needs at least 2 "
            "(one to train on, one to measure): generate a larger demo web"
        )
    return images


def split_masked_images(
    images: Sequence[MaskedImage], train_fraction: float, seed: int
) -> tuple[list[MaskedImage], list[MaskedImage]]:
    """A seeded random split: (train, evaluation), each with at least one image."""
    if not 0.0 < train_fraction < 1.0:
        raise EvalInputError(f"the train fraction must be in (0, 1), got {train_fraction}")
    order = np.random.default_rng(seed).permutation(len(images))
    count = min(max(round(train_fraction * len(images)), 1), len(images) - 1)
    return [images[i] for i in order[:count]], [images[i] for i in order[count:]]


class SegmentationImages(Dataset):
    """(image tensor, pixel label map (S, S) int64) pairs; the mask is cropped like the image."""

    def __init__(self, images: Sequence[MaskedImage], image_size: int, object_label: dict[str, int]) -> None:
        self.images = list(images)
        self.object_label = object_label  # concept -> label of its object pixels (background is 0)
        self.transform = eval_transform(image_size)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        item = self.images[index]
        with Image.open(item.image) as image, Image.open(item.mask) as mask:
            rgb, is_object = image.convert("RGB"), np.asarray(mask.convert("L")) > 127
        labels = tv_tensors.Mask(torch.from_numpy(is_object.astype(np.int64) * self.object_label[item.concept]))
        pixels, labels = self.transform(rgb, labels)
        return pixels, labels.as_subclass(Tensor)


def class_shares(label_maps: Tensor, num_classes: int, patch_size: int) -> Tensor:
    """Pixel label maps (N, H, W) -> the share of each class among each patch's pixels (N, h*w, C)."""
    one_hot = F.one_hot(label_maps, num_classes).permute(0, 3, 1, 2).float()
    shares = F.avg_pool2d(one_hot, patch_size)  # (N, C, h, w)
    return shares.flatten(2).transpose(1, 2)


def confusion_matrix(predicted: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """(C, C) counts, rows the true class and columns the predicted one."""
    pairs = target.flatten().long() * num_classes + predicted.flatten().long()
    return torch.bincount(pairs, minlength=num_classes**2).reshape(num_classes, num_classes)


def iou_per_class(confusion: Tensor) -> Tensor:
    """Intersection over union of each class; NaN for a class neither present nor predicted."""
    confusion = confusion.double()
    intersection = confusion.diagonal()
    union = confusion.sum(dim=0) + confusion.sum(dim=1) - intersection
    return torch.where(union > 0, intersection / union.clamp_min(1), torch.nan)


def mean_iou(confusion: Tensor) -> float:
    """Mean IoU over the classes present in the labels or the predictions (dataset-wide counts)."""
    return float(iou_per_class(confusion).nanmean())


@torch.no_grad()
def evaluate_segmentation_heads(
    heads: ParallelLinearHeads, patches: Tensor, grid: tuple[int, int], label_maps: Tensor, chunk_size: int = 64
) -> Tensor:
    """Confusion matrices (heads, C, C) at pixel resolution: each head's patch logits (N, P, C) are
    upsampled bilinearly to the label maps' size (N, H, W) and the arg-max class is compared."""
    count, num_classes = len(heads.heads), heads.heads[0].out_features
    confusion = torch.zeros(count, num_classes, num_classes, dtype=torch.long)
    size = label_maps.shape[-2:]
    for chunk, labels in zip(patches.split(chunk_size), label_maps.split(chunk_size)):
        logits = heads(chunk.flatten(0, 1))  # (heads, n * P, C)
        logits = logits.reshape(count * len(chunk), *grid, num_classes).permute(0, 3, 1, 2)
        predicted = F.interpolate(logits, size=size, mode="bilinear", align_corners=False).argmax(dim=1).cpu()
        for head, head_predicted in enumerate(predicted.reshape(count, len(chunk), *size)):
            confusion[head] += confusion_matrix(head_predicted, labels, num_classes)
    return confusion


def segmentation_probe(
    model: nn.Module,
    train: SegmentationImages,
    test: SegmentationImages,
    class_names: Sequence[str],
    settings: Sequence[HeadSetting],
    *,
    epochs: int = 10,
    probe_batch_size: int = 1024,
    batch_size: int = 64,
    num_workers: int = 0,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Train the per-patch heads on ``train``'s frozen patch features of ``model`` (on its device) and
    report each head's mIoU on ``test``; ``best`` is the highest, with its IoU per class."""
    options: dict[str, Any] = {"batch_size": batch_size, "num_workers": num_workers, "progress": progress}
    train_features = extract_features(model, train, keep_patches=True, description="train patches", **options)
    test_features = extract_features(model, test, keep_patches=True, description="test patches", **options)
    device = next(model.parameters()).device
    targets = class_shares(train_features.targets, len(class_names), model.patch_size)
    heads = train_linear_heads(
        train_features.patches.flatten(0, 1).to(device), targets.flatten(0, 1), len(class_names), settings,
        epochs=epochs, batch_size=probe_batch_size, seed=seed, progress=progress,
    )  # fmt: skip
    confusions = evaluate_segmentation_heads(
        heads, test_features.patches.to(device), test_features.grid, test_features.targets
    )
    rows = [
        {**asdict(setting), "miou": mean_iou(confusion) if finite else None}
        for setting, confusion, finite in zip(settings, confusions, heads.finite())
    ]
    finished = [index for index, row in enumerate(rows) if row["miou"] is not None]
    if not finished:
        return {"heads": rows, "best": None}
    best = max(finished, key=lambda index: rows[index]["miou"])
    per_class = iou_per_class(confusions[best]).tolist()
    iou_by_class = {name: None if np.isnan(iou) else iou for name, iou in zip(class_names, per_class)}
    return {"heads": rows, "best": {**rows[best], "iou_per_class": iou_by_class}}


def run_dense(
    model: nn.Module,
    demo_root: Path,
    image_size: int,
    settings: Sequence[HeadSetting],
    *,
    classes: ClassMode = "object",
    train_fraction: float = 0.5,
    seed: int = 0,
    **probe_options: Any,
) -> dict[str, Any]:
    """The dense probe of ``model`` on the demo web under ``demo_root``: split, classes, results."""
    images = masked_images(Path(demo_root))
    train, test = split_masked_images(images, train_fraction, seed)
    if classes == "object":
        class_names, object_label = [BACKGROUND, "object"], {item.concept: 1 for item in images}
    else:
        concepts = sorted({item.concept for item in images})
        class_names, object_label = [BACKGROUND, *concepts], {c: i + 1 for i, c in enumerate(concepts)}
    result = segmentation_probe(
        model,
        SegmentationImages(train, image_size, object_label),
        SegmentationImages(test, image_size, object_label),
        class_names,
        settings,
        seed=seed,
        **probe_options,
    )
    return {"classes": class_names, "train_images": len(train), "test_images": len(test), **result}


def _main(argv: Sequence[str] | None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pretrain.eval.dense", description=__doc__.split("\n\n")[0])
    add_probe_arguments(parser)
    parser.add_argument("--demo", type=Path, required=True, help="root of a demo web (holds pages.parquet)")
    parser.add_argument("--classes", choices=("object", "concept"), default="object", help="see the module docs")
    parser.add_argument("--train-fraction", type=float, default=0.5, help="share of the masked images trained on")
    parser.add_argument("--learning-rates", type=parse_floats, default=list(DEFAULT_LEARNING_RATES))
    parser.add_argument("--weight-decays", type=parse_floats, default=[0.0])
    parser.add_argument("--epochs", type=int, default=10, help="passes over the cached training patches")
    parser.add_argument("--probe-batch-size", type=int, default=1024, help="patches per SGD step")
    args = parser.parse_args(argv)
    settings = head_grid(args.learning_rates, args.weight_decays)
    backbone, device, image_size = load_for_cli(args)
    options: dict[str, Any] = {
        "classes": args.classes, "train_fraction": args.train_fraction, "seed": args.seed, "epochs": args.epochs,
        "probe_batch_size": args.probe_batch_size, "batch_size": args.batch_size, "num_workers": args.num_workers,
        "progress": sys.stderr.isatty(),
    }  # fmt: skip
    trained = run_dense(backbone.model, args.demo, image_size, settings, **options)
    random_model = random_backbone(backbone.spec, args.seed).to(device)
    random_result = run_dense(random_model, args.demo, image_size, settings, **options)
    results = {
        "checkpoint": str(backbone.source),
        "iteration": backbone.iteration,
        "image_size": image_size,
        "demo": str(args.demo),
        "classes": trained.pop("classes"),
        "train_images": trained.pop("train_images"),
        "test_images": trained.pop("test_images"),
        "trained": trained,
        "random": {"heads": random_result["heads"], "best": random_result["best"]},
    }
    write_json(args.output or default_output(args.checkpoint, "dense"), results)
    summary = {
        name: "diverged" if result["best"] is None else f"{100 * result['best']['miou']:.1f}%"
        for name, result in (("trained", trained), ("random", random_result))
    }
    print(f"dense probe ({args.classes}) mIoU: trained {summary['trained']}, random {summary['random']}")


def main(argv: Sequence[str] | None = None) -> int:
    return run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
