"""GPU-hours of the pretraining stages for ViT-L and ViT-g, from FLOP counts of our own networks.

    python bench/training_cost.py                 # Markdown tables on stdout (docs/scaling.md, training part)
    python bench/training_cost.py --mfu 0.3 --gpus 64 --json runs/bench/training_cost.json

No GPU is needed, nor any memory: every network is built on the meta device and its FLOPs counted
with ``FlopCounterMode`` (matmuls, convolutions, attention) for one image of each crop size. FLOPs
of one training image:

- student: forward and backward of the backbone over the 2 global and the local crops, and of the
  DINO head on each crop's CLS token and the iBOT head on the masked patches (2 global crops ×
  masking probability × mean mask ratio × patches; every patch of both global crops when distilling);
- EMA teacher: forward of the backbone over the 2 global crops and of the heads on the same tokens;
- Gram teacher (Gram stages): forward of the backbone over the 2 global crops at the Gram crop size.

Losses, AdamW, the EMA update and data loading are left out (well under 1% of the FLOPs). Then
GPU-hours = iterations × global batch × FLOPs per image / (peak FLOP/s × MFU) / 3600. The MFU is an
assumption (``--mfu``); the published runs of shared/RECIPE.md give the MFU they reached, computed
the same way, for comparison.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.config import PretrainConfig  # noqa: E402
from pretrain.models import DINOHead, build_vit  # noqa: E402
from pretrain.stages import plan  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PEAK_BF16 = {"A100": 312e12, "H100": 989e12}  # dense bf16 tensor-core FLOP/s (SXM)
# DINOv3's 7B backbone: 4096 wide, 40 blocks, 32 heads, SwiGLU with hidden 8192 (= 2/3 × 3 × 4096).
VIT_7B = {"embed_dim": 4096, "depth": 40, "num_heads": 32, "ffn": "swiglu", "mlp_ratio": 3.0}


@functools.cache
def _backbone_flops(spec: tuple, size: int, backward: bool) -> float:
    with torch.device("meta"):
        model = build_vit(**dict(spec))
        images = torch.empty(1, 3, size, size)
    counter = FlopCounterMode(display=False)
    with counter, torch.set_grad_enabled(backward):
        features = model.forward_features(images)
        if backward:
            (features["cls"].sum() + features["patches"].sum()).backward()
    return float(counter.get_total_flops())


@functools.cache
def _head_flops(in_dim: int, out_dim: int, hidden_dim: int, bottleneck_dim: int, backward: bool) -> float:
    """FLOPs of a DINO/iBOT head on one token."""
    with torch.device("meta"):
        head = DINOHead(in_dim, out_dim, hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim)
        token = torch.empty(1, in_dim)
    counter = FlopCounterMode(display=False)
    with counter, torch.set_grad_enabled(backward):
        logits = head(token)
        if backward:
            logits.sum().backward()
    return float(counter.get_total_flops())


def image_flops(config: PretrainConfig, spec: dict | None = None) -> dict[str, float]:
    """FLOPs of one training image under ``config``: student, EMA teacher and Gram teacher."""
    spec = spec or config.backbone_spec()
    key = tuple(sorted({**spec, "drop_path_rate": 0.0}.items()))
    augment, heads, masking = config.data.augment, config.heads, config.data.masking
    with torch.device("meta"):
        embed_dim = build_vit(**dict(key)).embed_dim
    patch = spec.get("patch_size", config.model.patch_size)
    n_patches = (augment.global_crop_size // patch) ** 2
    crops = [augment.global_crop_size] * 2 + [augment.local_crop_size] * augment.n_local_crops
    if config.distill.teacher is not None:
        ibot_tokens = 2 * n_patches
    else:
        ibot_tokens = 2 * masking.probability * sum(masking.ratio_range) / 2 * n_patches
    if config.losses.ibot_weight == 0:
        ibot_tokens = 0
    head = functools.partial(_head_flops, embed_dim, heads.out_dim, heads.hidden_dim, heads.bottleneck_dim)
    student = sum(_backbone_flops(key, size, True) for size in crops) + head(True) * (
        len(crops) + ibot_tokens
    )
    teacher = 2 * _backbone_flops(key, augment.global_crop_size, False) + head(False) * (2 + ibot_tokens)
    gram = 0.0
    if config.gram.enabled:
        gram_size = round(augment.global_crop_size * (augment.gram_crop_factor or 1.0))
        gram = 2 * _backbone_flops(key, gram_size, False)
    return {"student": student, "teacher": teacher, "gram_teacher": gram}


@dataclass(frozen=True)
class Estimate:
    model: str
    stage: str
    iterations: int
    global_batch: int
    crops: str
    tflop_per_image: float
    images_per_s_per_gpu: float
    gpu_hours: float


def estimate(model: str, stage: str, config: PretrainConfig, gpus: int, peak: float, mfu: float,
             spec: dict | None = None, iterations: int | None = None, global_batch: int | None = None) -> Estimate:  # fmt: skip
    flops = sum(image_flops(config, spec).values())
    iterations = iterations or config.schedule.total_iters
    global_batch = global_batch or config.data.batch_size * gpus
    augment = config.data.augment
    crops = f"2×{augment.global_crop_size} + {augment.n_local_crops}×{augment.local_crop_size}"
    if config.gram.enabled:
        crops += f", Gram {round(augment.global_crop_size * (augment.gram_crop_factor or 1.0))}"
    rate = peak * mfu / flops
    return Estimate(model, stage, iterations, global_batch, crops, flops / 1e12, rate,
                    iterations * global_batch / rate / 3600)  # fmt: skip


def published(args: argparse.Namespace) -> list[dict]:
    """The runs of shared/RECIPE.md, with the MFU their GPU-hours imply under our FLOP count."""
    v2_large = plan_config(
        REPO / "pretrain" / "configs" / "v2.yaml", ["model.patch_size=16", "data.augment.local_crop_size=96"]
    )
    v2 = plan_config(REPO / "pretrain" / "configs" / "v2.yaml", ["model.arch=vit_giant", "model.ffn=swiglu"])
    v3 = plan_config(
        REPO / "pretrain" / "configs" / "v3.yaml", ["gram.enabled=false", "data.augment.gram_crop_factor=0"]
    )
    runs = [
        ("DINOv2 ViT-L/16, ImageNet-1k (about a day on 32 GPUs)", v2_large, None, 125_000, 1024, 768, "A100"),
        ("DINOv2 ViT-g/14", v2, None, 625_000, 3072, 22_000, "A100"),
        ("DINOv3 ViT-7B/16", v3, {**v3.backbone_spec(), **VIT_7B}, 1_000_000, 4096, 61_000, "H100"),
    ]
    rows = []
    for name, config, spec, iterations, batch, hours, gpu in runs:
        flops = sum(image_flops(config, spec).values())
        rate = iterations * batch / (hours * 3600)
        rows.append({"run": name, "gpu": gpu, "iterations": iterations, "global_batch": batch, "gpu_hours": hours,
                     "images_per_s_per_gpu": rate, "tflop_per_image": flops / 1e12,
                     "implied_mfu": rate * flops / PEAK_BF16[gpu]})  # fmt: skip
    return rows


def plan_config(path: Path, overrides: list[str]) -> PretrainConfig:
    from pretrain.config_io import load_config

    return load_config(PretrainConfig, path, ["data.image_folder=x", *overrides])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", choices=sorted(PEAK_BF16), default="H100")
    parser.add_argument("--mfu", type=float, default=0.35, help="assumed model FLOP utilisation")
    parser.add_argument(
        "--gpus", type=int, default=32, help="processes: the global batch is per-process batch × this"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    peak = PEAK_BF16[args.gpu]
    estimates = []
    for model, overrides in (("ViT-L/16", []), ("ViT-g/16", ["model.arch=vit_giant"])):
        stages = plan(
            REPO / "pretrain" / "configs" / "stages" / "v3.yaml",
            Path("runs"),
            ["data.image_folder=x", *overrides],
        )
        estimates += [
            estimate(model, stage.name, stage.config, args.gpus, peak, args.mfu) for stage in stages
        ]
    reference = published(args)
    print(render(estimates, reference, args))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"estimates": [asdict(e) for e in estimates], "published": reference}, indent=2)
        )
    return 0


def render(estimates: list[Estimate], reference: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"Estimates: {args.gpu} at {PEAK_BF16[args.gpu] / 1e12:.0f} TFLOP/s bf16 × assumed MFU {args.mfu:.0%}, "
        f"global batch = per-process batch × {args.gpus}.",
        "",
        "| Model | Stage | Iterations | Global batch | Crops | TFLOP / image | img/s/GPU | GPU-hours |",
        "|---|---|---|---|---|---|---|---|",
    ]
    totals: dict[str, float] = {}
    for e in estimates:
        totals[e.model] = totals.get(e.model, 0.0) + e.gpu_hours
        lines.append(f"| {e.model} | {e.stage} | {e.iterations:,} | {e.global_batch:,} | {e.crops} | "
                     f"{e.tflop_per_image:.2f} | {e.images_per_s_per_gpu:.0f} | {e.gpu_hours:,.0f} |")  # fmt: skip
    for model, hours in totals.items():
        lines.append(f"| {model} | **all stages** | | | | | | **{hours:,.0f}** |")
    lines += [
        "",
        "| Published run | GPU | Iterations | Global batch | GPU-hours | img/s/GPU | TFLOP / image (ours) | Implied MFU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in reference:
        lines.append(f"| {r['run']} | {r['gpu']} | {r['iterations']:,} | {r['global_batch']:,} | {r['gpu_hours']:,} | "
                     f"{r['images_per_s_per_gpu']:.0f} | {r['tflop_per_image']:.2f} | {r['implied_mfu']:.0%} |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
