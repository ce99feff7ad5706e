"""Training-step throughput and model FLOP utilisation (MFU) of the real DINO step.

    python bench/train_step.py                       # CPU: ViT-S/16, 2 × 112 px + 8 × 48 px crops
    python bench/train_step.py --device cuda --arch vit_large --global-size 224 --local-size 96 \\
        --batch-size 64 --variants "bf16 autocast"     # GPU path (45% target); untested here

Each variant builds the ``Trainer`` of the v1 recipe (DINO loss, centering, AdamW, EMA) on a synthetic
ImageFolder, times ``Trainer.step`` on one collated batch (data loading excluded: that is
bench/ingest.py's business and ``data_wait_share`` in the metrics), and counts the step's FLOPs with
``FlopCounterMode`` (matmuls, convolutions, attention; forward and backward). MFU is the achieved
FLOP/s over the best FLOP/s of one large ``torch.matmul`` of the same device and dtype.

The variants are timed in rounds: each round measures the matmul peaks, then one step of every
variant in turn, so that on a shared machine a change of load hits all of them alike. MFU is the
median over rounds of (step FLOP/s / the same round's peak), and each variant's speed-up is the median
over rounds of (first variant's step time / its step time).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.ingest import _write_section  # noqa: E402
from pretrain.config import PretrainConfig  # noqa: E402
from pretrain.config_io import load_config  # noqa: E402
from pretrain.models.layers import Attention  # noqa: E402
from pretrain.optim import build_optimizer, param_groups  # noqa: E402
from pretrain.train import Trainer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TARGET_MFU = {"cpu": 0.40, "cuda": 0.45}
DTYPES = (torch.float32, torch.bfloat16)


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 5) -> float:
    """Best FLOP/s of a square matmul: the ceiling a step made of matmuls could reach on this machine."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):  # the first call warms up
        _sync(device)
        started = time.perf_counter()
        torch.matmul(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_folder(root: Path, n_images: int, size: int) -> Path:
    """An ImageFolder of noise pictures: the Trainer needs a source, the step does not care what is in it."""
    folder = root / "images" / "class0"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n_images):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder.parent


def bench_config(args: argparse.Namespace, images: Path, output_dir: Path, dtype: str) -> PretrainConfig:
    overrides = [
        f"model.arch={args.arch}",
        f"model.patch_size={args.patch_size}",
        f"data.image_folder={images}",
        f"data.batch_size={args.batch_size}",
        "data.num_workers=0",
        f"data.augment.global_crop_size={args.global_size}",
        f"data.augment.local_crop_size={args.local_size}",
        f"data.augment.n_local_crops={args.n_local}",
        "model.drop_path_rate=0.0",  # stochastic depth skips blocks at random: FLOPs would vary by step
        "schedule.freeze_last_layer_epochs=0",
        f"train.device={args.device}",
        f"train.dtype={dtype}",
        "train.tensorboard=false",
        f"output_dir={output_dir}",
    ]
    return load_config(PretrainConfig, REPO / "pretrain" / "configs" / "v1.yaml", overrides)


def _unfused_attention(trainer: Trainer) -> None:
    for module in trainer.model.modules():
        if isinstance(module, Attention):
            module.fused_attn = False


def _fused_adamw(trainer: Trainer) -> None:
    groups = param_groups(trainer.model.trainable_modules(), 1.0, 1.0)
    trainer.optimizer = build_optimizer(groups, betas=trainer.config.optim.betas, fused=True)


def _compiled_backbones(trainer: Trainer) -> None:
    """torch.compile (inductor) of the student and teacher backbones, where nearly all the FLOPs are;
    the compile itself happens in ``measure``'s untimed warm-up step (one graph per crop size)."""
    for networks in (trainer.model.student, trainer.model.teacher):
        networks["backbone"].compile()


# name -> (train.dtype, change to the Trainer after it is built)
VARIANTS: dict[str, tuple[str, Callable[[Trainer], None] | None]] = {
    "fp32": ("fp32", None),
    "fp32, explicit attention": ("fp32", _unfused_attention),
    "fp32, fused AdamW": ("fp32", _fused_adamw),
    "fp32, torch.compile": ("fp32", _compiled_backbones),
    "bf16 autocast": ("bf16", None),
}


def prepare(trainer: Trainer, batch: dict[str, Any]) -> dict[str, float]:
    """One warm-up step (allocator, oneDNN/cuBLAS kernel selection, torch.compile), then the FLOPs of
    one step."""
    started = time.perf_counter()
    trainer.step(batch)
    warmup_s = time.perf_counter() - started
    counter = FlopCounterMode(display=False)
    with counter:
        trainer.step(batch)
    return {"warmup_s": warmup_s, "flops": counter.get_total_flops()}


def timed_step(trainer: Trainer, batch: dict[str, Any]) -> float:
    _sync(trainer.device)
    started = time.perf_counter()
    trainer.step(batch)
    _sync(trainer.device)
    return time.perf_counter() - started


def interleaved_rounds(
    runs: list[tuple[Trainer, dict[str, Any]]], rounds: int, device: torch.device, matmul_size: int
) -> tuple[list[list[float]], list[dict[torch.dtype, float]]]:
    """(step times of every run, matmul peaks) per round: each round measures the peaks, then one step
    of each run in turn. On a shared machine a load change then hits every variant and the peak alike,
    which a variant-after-variant schedule would not."""
    times: list[list[float]] = [[] for _ in runs]
    peaks: list[dict[torch.dtype, float]] = []
    for _ in range(rounds):
        peaks.append({dtype: matmul_peak_flops(device, dtype, matmul_size, repeats=2) for dtype in DTYPES})
        for run_times, (trainer, batch) in zip(times, runs):
            run_times.append(timed_step(trainer, batch))
    return times, peaks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--arch", default="vit_small")
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--global-size", type=int, default=112)
    parser.add_argument("--local-size", type=int, default=48)
    parser.add_argument("--n-local", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--rounds", type=int, default=3, help="timed steps per variant, taken in turns")
    parser.add_argument("--matmul-size", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--json", type=Path, default=REPO / "runs" / "bench_train_step" / "results.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        images = synthetic_folder(Path(tmp), args.batch_size, 2 * args.global_size)
        runs, prepared = [], []
        for name in args.variants:
            dtype, change = VARIANTS[name]
            torch.manual_seed(0)
            trainer = Trainer(bench_config(args, images, Path(tmp) / name, dtype))
            if change is not None:
                change(trainer)
            batch = next(trainer.batches())
            prepared.append(prepare(trainer, batch))
            runs.append((trainer, batch))
            print(f"{name}: first step {prepared[-1]['warmup_s']:.1f} s", flush=True)
        all_times, round_peaks = interleaved_rounds(runs, args.rounds, device, args.matmul_size)
        peaks = {dtype: float(np.median([p[dtype] for p in round_peaks])) for dtype in DTYPES}
        for name, first, times in zip(args.variants, prepared, all_times):
            dtype = torch.bfloat16 if VARIANTS[name][0] == "bf16" else torch.float32
            step_s = float(np.median(times))
            flop_per_s = first["flops"] / step_s

            def mfu(peak_dtype: torch.dtype, times=times, first=first) -> float:
                """Median over rounds of the step's FLOP/s over the same round's matmul peak."""
                return float(np.median([first["flops"] / t / p[peak_dtype] for t, p in zip(times, round_peaks)]))

            rows.append(
                {
                    "variant": name,
                    "steps": len(times),
                    "warmup_s": first["warmup_s"],
                    "step_s": step_s,
                    "step_times_s": times,
                    "gflop_per_step": first["flops"] / 1e9,
                    "flop_per_s": flop_per_s,
                    "images_per_s": args.batch_size / step_s,
                    "mfu": mfu(dtype),
                    "mfu_of_fp32_peak": mfu(torch.float32),
                    # Per round against the first variant's step of the same round: the load-robust figure.
                    "speedup_vs_first": float(np.median(np.array(all_times[0]) / np.array(times))),
                }
            )
            print(json.dumps(rows[-1]), flush=True)

    args.json.parent.mkdir(parents=True, exist_ok=True)
    summary = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "peaks": {str(k): v for k, v in peaks.items()},
    }
    args.json.write_text(json.dumps({**summary, "rows": rows}, indent=2))
    _write_section(args.out, render(args, peaks, rows))
    return 0


def render(args: argparse.Namespace, peaks: dict[torch.dtype, float], rows: list[dict[str, Any]]) -> str:
    target = TARGET_MFU[args.device]
    lines = [
        "## Training step throughput (bench/train_step.py)",
        "",
        f"`python bench/train_step.py --device {args.device} --batch-size {args.batch_size} "
        f"--global-size {args.global_size} --local-size {args.local_size} --rounds {args.rounds} "
        f"--variants {' '.join(repr(v) for v in args.variants)}`: "
        f"the v1 `Trainer.step` ({args.arch}/{args.patch_size}, 2 × {args.global_size} px + "
        f"{args.n_local} × {args.local_size} px crops, K = 65536, batch {args.batch_size}), "
        f"{torch.get_num_threads()} threads. Matmul peak ({args.matmul_size}², best of 2 per round, median "
        f"over rounds): fp32 {peaks[torch.float32] / 1e9:.1f} GFLOP/s, bf16 {peaks[torch.bfloat16] / 1e9:.1f} "
        f"GFLOP/s. Variants timed in turns, one step each per round; MFU = step FLOPs (FlopCounterMode, "
        f"forward + backward) / step time / the same round's matmul peak of the variant's dtype, median "
        f"over rounds; target {target:.0%}.",
        "",
        f"| Variant | Rounds | First step (s) | Step (s) | Speed-up vs {rows[0]['variant']} | Images/s | "
        "GFLOP/step | MFU | MFU vs fp32 peak |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['variant']} | {row['steps']} | {row['warmup_s']:.1f} | {row['step_s']:.2f} | "
            f"{row['speedup_vs_first']:.2f}× | {row['images_per_s']:.2f} | {row['gflop_per_step']:.0f} | {row['mfu']:.0%} | "
            f"{row['mfu_of_fp32_peak']:.0%} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
