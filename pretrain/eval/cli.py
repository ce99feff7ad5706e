"""What the evaluation commands share: common arguments, the device, JSON results and error exits."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from pretrain.eval.features import EvalInputError, LoadedBackbone, load_backbone

__all__ = [
    "add_backbone_arguments",
    "add_probe_arguments",
    "default_output",
    "eval_folder",
    "load_for_cli",
    "parse_floats",
    "run",
    "write_json",
]


def parse_floats(text: str) -> list[float]:
    """'1e-3,0.01' -> [0.001, 0.01] (argparse type)."""
    try:
        return [float(value) for value in text.split(",") if value]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from error


def add_backbone_arguments(parser: argparse.ArgumentParser) -> None:
    """--checkpoint, --image-size and --device: what ``load_for_cli`` reads."""
    parser.add_argument(
        "--checkpoint",
        type=Path,
        required=True,
        help="teacher export (OUTPUT_DIR/teacher_backbone.safetensors or .pt, or OUTPUT_DIR) or a checkpoint "
        "folder OUTPUT_DIR/checkpoints/step-XXXXXXX",
    )
    parser.add_argument(
        "--image-size", type=int, default=None, help="input size (default: the backbone's global crop size)"
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when available")


def add_probe_arguments(parser: argparse.ArgumentParser) -> None:
    """The backbone's arguments, and batching, seed and the results file of a probe."""
    add_backbone_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward")
    parser.add_argument("--num-workers", type=int, default=2, help="image decoding processes")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random baseline network and the probes")
    parser.add_argument(
        "--output", type=Path, default=None, help="results JSON (default: eval/NAME.json beside the checkpoint)"
    )


def load_for_cli(args: argparse.Namespace) -> tuple[LoadedBackbone, torch.device, int]:
    """(backbone on the chosen device, that device, image size) from the common arguments."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise EvalInputError("--device cuda but no CUDA device is available: use --device cpu or auto")
    backbone = load_backbone(args.checkpoint)
    device = torch.device("cpu" if args.device == "cpu" or not torch.cuda.is_available() else "cuda")
    backbone.model.to(device)
    image_size = args.image_size or backbone.image_size
    if image_size % backbone.model.patch_size:
        raise EvalInputError(
            f"--image-size {image_size} is not divisible by the patch size {backbone.model.patch_size}: use a "
            f"multiple of {backbone.model.patch_size}"
        )
    return backbone, device, image_size


def eval_folder(checkpoint: Path) -> Path:
    """Where results go by default: eval/ in the checkpoint folder (or OUTPUT_DIR), or beside an export file."""
    return (checkpoint if checkpoint.is_dir() else checkpoint.parent) / "eval"


def default_output(checkpoint: Path, name: str) -> Path:
    return eval_folder(checkpoint) / f"{name}.json"


def write_json(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)


def run(main: Callable[[Sequence[str] | None], None], argv: Sequence[str] | None = None) -> int:
    """Run a command's ``main``; bad input prints ``error: ...`` (no traceback) and returns 2."""
    try:
        main(argv)
    except EvalInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
