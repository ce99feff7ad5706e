"""The backbone to evaluate and its frozen features.

``load_backbone`` accepts every form a run leaves behind: the teacher export
(``teacher_backbone.safetensors`` with its ``.json``, ``teacher_backbone.pt``, or the OUTPUT_DIR that
holds them) and a checkpoint folder ``checkpoints/step-XXXXXXX`` (whose ``model.pt`` holds the
teacher). ``extract_features`` runs it over a dataset of (image, target) pairs in batches and keeps
the CLS, the mean patch token and, on request, every patch token.

Images are preprocessed as in DINO's evaluations: shorter side resized to the image size (bicubic),
centre crop, ImageNet normalisation. The image size defaults to the backbone's reference size (the
global crop size it was trained on).
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode, v2
from tqdm import tqdm

from pretrain.checkpoint import CONFIG_FILE, MODEL_FILE
from pretrain.config import PretrainConfig
from pretrain.config_io import load_config
from pretrain.data.augment import IMAGENET_MEAN, IMAGENET_STD
from pretrain.data.sources import ImageFolderSource
from pretrain.export import (
    EXPORT_WEIGHTS_FILE,
    TEACHER_BACKBONE_PREFIX,
    TORCH_EXPORT_FILE,
    teacher_backbone_state,
)
from pretrain.models import VisionTransformer, build_vit

__all__ = [
    "EvalInputError",
    "FeatureSet",
    "LabelledImages",
    "LoadedBackbone",
    "check_same_classes",
    "eval_transform",
    "extract_features",
    "load_backbone",
    "random_backbone",
    "train_val_features",
]

CHECKPOINT_HELP = (
    f"pass a teacher export (OUTPUT_DIR/{EXPORT_WEIGHTS_FILE}, OUTPUT_DIR/{TORCH_EXPORT_FILE} or OUTPUT_DIR "
    "itself) or a checkpoint folder (OUTPUT_DIR/checkpoints/step-XXXXXXX) written by pretrain/train.py"
)
_STEP_FOLDER = re.compile(r"step-(\d+)")


class EvalInputError(ValueError):
    """A checkpoint, folder or dataset that cannot be evaluated; the message says what to change."""


@dataclass(frozen=True)
class LoadedBackbone:
    """A teacher backbone in eval mode without gradients, and where it came from."""

    model: VisionTransformer
    spec: dict[str, Any]  # build_vit keyword arguments: build_vit(**spec) has the same shape
    source: Path
    iteration: int | None  # iterations trained, when the files say

    @property
    def image_size(self) -> int:
        """The reference input size: the learned position grid's, i.e. the global crop size."""
        return self.model.ref_grid[0] * self.model.patch_size


def _build(spec: dict[str, Any], weights: dict[str, Tensor], source: Path, iteration: int | None) -> LoadedBackbone:
    try:
        model = build_vit(**spec)
    except (ValueError, TypeError) as error:
        raise EvalInputError(f"the backbone config in {source} does not build a ViT: {error}") from error
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        raise EvalInputError(
            f"the weights in {source} do not fit the {spec.get('name')!r} backbone its config describes "
            f"({error}); re-export them from the run that trained them"
        ) from error
    return LoadedBackbone(model.eval().requires_grad_(False), spec, source, iteration)


def _from_checkpoint(folder: Path) -> LoadedBackbone:
    try:
        state = torch.load(folder / MODEL_FILE, map_location="cpu", mmap=True, weights_only=True)
    except Exception as error:  # pickle, zip and mmap errors alike: not a checkpoint we can read
        raise EvalInputError(f"{folder / MODEL_FILE} is not a readable checkpoint ({error}); {CHECKPOINT_HELP}") from error
    weights = teacher_backbone_state(state)
    if not weights:
        prefixes = sorted({name.split(".", 1)[0] for name in state})
        raise EvalInputError(
            f"checkpoint {folder} holds no teacher: {MODEL_FILE} has no '{TEACHER_BACKBONE_PREFIX}*' weights "
            f"(its top-level names: {', '.join(prefixes) or 'none'}); {CHECKPOINT_HELP}"
        )
    try:
        spec = load_config(PretrainConfig, folder / CONFIG_FILE).backbone_spec()
    except (OSError, ValueError) as error:
        raise EvalInputError(
            f"cannot read the backbone config of checkpoint {folder} from its {CONFIG_FILE}: {error}; "
            f"pass its teacher export {folder / EXPORT_WEIGHTS_FILE} instead"
        ) from error
    match = _STEP_FOLDER.fullmatch(folder.name)
    return _build(spec, weights, folder, int(match.group(1)) if match else None)


def _from_safetensors(weights_path: Path) -> LoadedBackbone:
    config_path = weights_path.with_suffix(".json")
    for path in (weights_path, config_path):
        if not path.is_file():
            raise EvalInputError(f"teacher export incomplete: {path} is missing; {CHECKPOINT_HELP}")
    try:
        described = json.loads(config_path.read_text())
        weights = load_file(weights_path)
    except (json.JSONDecodeError, SafetensorError, OSError) as error:
        raise EvalInputError(f"cannot read the teacher export {weights_path}: {error}; {CHECKPOINT_HELP}") from error
    if not isinstance(described, dict) or not isinstance(described.get("build_vit"), dict):
        raise EvalInputError(
            f"{config_path} lacks the 'build_vit' keyword arguments of a teacher export; {CHECKPOINT_HELP}"
        )
    return _build(described["build_vit"], weights, weights_path, described.get("iteration"))


def _from_torch_export(path: Path) -> LoadedBackbone:
    try:
        export = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as error:  # pickle, zip and mmap errors alike
        raise EvalInputError(f"{path} is not a readable torch file ({error}); {CHECKPOINT_HELP}") from error
    if not isinstance(export, dict) or not {"config", "state_dict"} <= export.keys():
        found = sorted(export) if isinstance(export, dict) else type(export).__name__
        raise EvalInputError(
            f"{path} holds no teacher: it lacks the 'config' and 'state_dict' entries of a teacher export "
            f"(found {found}); {CHECKPOINT_HELP}"
        )
    return _build(dict(export["config"]), export["state_dict"], path, None)


def load_backbone(path: str | Path) -> LoadedBackbone:
    """The teacher backbone of a teacher export or a checkpoint folder, on the CPU, in eval mode."""
    path = Path(path)
    if path.is_dir():
        if (path / MODEL_FILE).is_file():
            return _from_checkpoint(path)
        if (path / EXPORT_WEIGHTS_FILE).is_file():
            return _from_safetensors(path / EXPORT_WEIGHTS_FILE)
        raise EvalInputError(
            f"{path} holds neither a checkpoint ({MODEL_FILE}) nor a teacher export ({EXPORT_WEIGHTS_FILE}); "
            f"{CHECKPOINT_HELP}"
        )
    if not path.exists():
        raise EvalInputError(f"checkpoint not found: {path}; {CHECKPOINT_HELP}")
    if path.suffix == ".pt":
        return _from_torch_export(path)
    if path.suffix in (".safetensors", ".json"):
        return _from_safetensors(path.with_suffix(".safetensors"))
    raise EvalInputError(f"{path} is neither a .safetensors, .json nor .pt teacher export; {CHECKPOINT_HELP}")


def random_backbone(spec: dict[str, Any], seed: int = 0) -> VisionTransformer:
    """A randomly initialised network of the same shape: the baseline that shows what training added."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_vit(**spec).eval().requires_grad_(False)


def eval_transform(size: int) -> v2.Compose:
    """PIL image -> (3, size, size) float tensor: shorter side to ``size``, centre crop, normalised.

    Called on an (image, ``tv_tensors.Mask``) pair it crops the mask alike, with nearest-neighbour
    resizing and its values kept."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(size, interpolation=InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def load_eval_images(paths: Sequence[Path], size: int) -> Tensor:
    """Image files through ``eval_transform(size)``, stacked: (N, 3, size, size). For small sets that
    fit in memory (benchmarks, probe sets)."""
    transform = eval_transform(size)
    images = []
    for path in paths:
        with Image.open(path) as image:
            images.append(transform(image.convert("RGB")))
    return torch.stack(images)


class LabelledImages(Dataset):
    """An ImageFolder tree (``folder/<class>/<image>``) as (image tensor, class index) pairs; class
    indices follow the sorted class folder names. ``role`` names the folder in error messages."""

    def __init__(self, folder: str | Path, image_size: int, role: str) -> None:
        try:
            self.source = ImageFolderSource(folder)
        except FileNotFoundError as error:
            raise EvalInputError(f"the {role} does not exist ({error}); pass an ImageFolder tree") from error
        except ValueError as error:
            raise EvalInputError(
                f"the {role} is empty: {error}; put images into its class folders or pass another folder"
            ) from error
        self.folder = self.source.path
        self.role = role
        self.transform = eval_transform(image_size)

    @property
    def classes(self) -> list[str]:
        return self.source.classes

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        # A corrupt image is replaced by the next readable one, with that one's label (and a warning).
        index, image = self.source.load_indexed(index)
        return self.transform(image), self.source.label(index)


def check_same_classes(train: LabelledImages, val: LabelledImages) -> None:
    """Labels are matched by class folder name, so both trees must hold the same class folders."""
    only_train = sorted(set(train.classes) - set(val.classes))
    only_val = sorted(set(val.classes) - set(train.classes))
    if only_train or only_val:
        raise EvalInputError(
            f"the classes of the {train.role} {train.folder} and the {val.role} {val.folder} do not match: "
            f"only in the first: {only_train or 'none'}; only in the second: {only_val or 'none'}. Both must "
            "hold the same <class> folders (labels are matched by folder name): add, rename or remove these"
        )


@dataclass(frozen=True)
class FeatureSet:
    """Frozen features of a dataset, float32 on the CPU, in dataset order."""

    cls: Tensor  # (N, D), after the final norm
    patch_mean: Tensor  # (N, D), mean of the normed patch tokens
    patches: Tensor | None  # (N, P, D) when asked for, else None
    grid: tuple[int, int]  # patch grid (h, w), P = h * w
    targets: Tensor  # what the dataset yields beside each image: class indices (N,) or label maps (N, H, W)


@torch.no_grad()
def extract_features(
    model: VisionTransformer,
    dataset: Dataset,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    keep_patches: bool = False,
    progress: bool = False,
    description: str = "features",
) -> FeatureSet:
    """Run ``model`` (on its device, as it is) over a dataset of (image, target) pairs in batches;
    bf16 autocast on CUDA."""
    device = next(model.parameters()).device
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=device.type == "cuda")
    autocast = (
        torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    )
    cls, patch_mean, patches, targets = [], [], [], []
    grid = (0, 0)
    for images, batch_targets in tqdm(loader, desc=description, unit="batch", disable=not progress):
        with autocast:
            features = model.forward_features(images.to(device, non_blocking=True))
        grid = features["grid"]
        cls.append(features["cls"].float().cpu())
        patch_mean.append(features["patches"].float().mean(dim=1).cpu())
        if keep_patches:
            patches.append(features["patches"].float().cpu())
        targets.append(torch.as_tensor(batch_targets))
    return FeatureSet(
        torch.cat(cls),
        torch.cat(patch_mean),
        torch.cat(patches) if keep_patches else None,
        grid,
        torch.cat(targets),
    )


def train_val_features(
    model: VisionTransformer,
    train_folder: str | Path,
    val_folder: str | Path,
    image_size: int,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = False,
) -> tuple[FeatureSet, FeatureSet, list[str]]:
    """Features of a labelled training and validation ImageFolder with the same classes, and the
    class names (label i is ``classes[i]``). Both folders are checked before any forward."""
    train = LabelledImages(train_folder, image_size, "training folder (--train)")
    val = LabelledImages(val_folder, image_size, "validation folder (--val)")
    check_same_classes(train, val)
    options: dict[str, Any] = {"batch_size": batch_size, "num_workers": num_workers, "progress": progress}
    return (
        extract_features(model, train, description="train features", **options),
        extract_features(model, val, description="val features", **options),
        train.classes,
    )
