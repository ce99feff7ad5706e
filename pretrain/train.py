"""Pretrain a DINO-family model in one process, on CPU or one GPU.

    python -m pretrain.train --config pretrain/configs/v3_tiny.yaml data.manifest=RUN/manifests/pool output_dir=OUT

Writes OUTPUT_DIR/config.yaml (the resolved config) at the start, OUTPUT_DIR/metrics.jsonl (one line
per iteration) while training, and OUTPUT_DIR/teacher_backbone.pt at the end. A config, source or
size that cannot work fails before the first step with ``error: ...`` and exit code 2; a non-finite
loss under ``optim.nan_policy=stop`` ends the run with exit code 1.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pretrain.config import PretrainConfig
from pretrain.config_io import load_config, save_config
from pretrain.data import (
    ImageFolderSource,
    ImageSource,
    ManifestSource,
    MultiCropAugmentation,
    PretrainDataset,
    collate_multicrop,
)
from pretrain.meta_arch import SSLMetaArch
from pretrain.optim import apply_schedules, build_optimizer, clip_grad_norms, param_groups
from pretrain.schedules import Schedules, linear_ramp

__all__ = ["NonFiniteLossError", "Trainer", "main"]

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
TEACHER_FILE = "teacher_backbone.pt"
_BATCH_TENSORS = ("global_crops", "local_crops", "masks", "gram_crops")


class NonFiniteLossError(RuntimeError):
    """The loss or a gradient norm is NaN or infinite and ``optim.nan_policy`` is 'stop'."""


def build_sources(config: PretrainConfig) -> list[ImageSource]:
    """The configured image sources, opened; a missing or empty source raises with its path."""
    sources: list[ImageSource] = []
    for source in config.data.all_sources():
        if source.manifest is not None:
            sources.append(ManifestSource(source.manifest, root=source.root))
        else:
            sources.append(ImageFolderSource(source.image_folder))
    return sources


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but no CUDA device is available; set train.device=cpu or auto")
    return torch.device(name)


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32; auto is bf16 on CUDA and fp32 on CPU (where bf16
    matmuls are slow on most processors)."""
    if name == "bf16" or (name == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def _finite_or_none(value: float) -> float | None:
    """JSON has no NaN or infinity; a non-finite value is written as null."""
    return value if math.isfinite(value) else None


class Trainer:
    """Builds everything from the config and runs the loop of one process.

    Run state lives in ``model`` (student, teacher, Gram teacher, centers), ``optimizer`` and
    ``iteration``; schedules are pure functions of the config and the data stream is a pure function
    of (seed, iteration), so a later checkpoint of these three resumes a run exactly.
    """

    def __init__(self, config: PretrainConfig) -> None:
        self.config = config
        self.output_dir = Path(config.output_dir)
        self.device = resolve_device(config.train.device)
        self.dtype = autocast_dtype(config.train.dtype, self.device)
        if config.train.deterministic:
            # cuBLAS reads this when it starts; without it deterministic matmuls raise on CUDA.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        # Sources first: a missing or empty one fails before any model is built.
        self.sources = build_sources(config)
        torch.manual_seed(config.train.seed)
        self.model = SSLMetaArch(config).to(self.device)
        optim = config.optim
        groups = param_groups(self.model.trainable_modules(), optim.layer_decay, optim.patch_embed_lr_mult)
        self.optimizer = build_optimizer(groups, betas=optim.betas)
        self.global_batch_size = config.data.batch_size  # one process
        self.schedules = Schedules.from_config(config.schedule, self.global_batch_size)
        total = self.schedules.total_iters
        gram = config.gram
        self.gram_weight = (
            linear_ramp(0.0, gram.weight, total, gram.ramp_iterations, delay_iters=gram.start_iteration)
            if gram.enabled
            else np.zeros(total)
        )
        self.gram_refresh_iterations = frozenset(gram.refresh_iterations(total))
        self.iteration = 0

    @property
    def total_iters(self) -> int:
        return self.schedules.total_iters

    def batches(self) -> Iterator[dict[str, Any]]:
        """The infinite stream of collated batches from the current iteration on."""
        data = self.config.data
        masking = data.masking
        collate = functools.partial(
            collate_multicrop,
            patch_size=self.config.model.patch_size,
            mask_ratio_range=masking.ratio_range,
            mask_probability=masking.probability,
            block_masking=masking.block,
        )
        dataset = PretrainDataset(
            self.sources,
            MultiCropAugmentation(data.augment),
            collate,
            data.batch_size,
            mixture=data.mixture(),
            seed=self.config.train.seed,
            start_iteration=self.iteration,
        )
        return iter(dataset.loader(num_workers=data.num_workers, pin_memory=self.device.type == "cuda"))

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def step(self, batch: dict[str, Any]) -> dict[str, Any]:
        """One training iteration on ``batch``; returns its metrics (losses, schedules, grad norms).

        Order: Gram-teacher snapshot (on its schedule), forward, then ``_update``. A non-finite loss
        or gradient stops the run or skips the step, as ``optim.nan_policy`` says.
        """
        iteration = self.iteration
        scheduled = self.schedules.at(iteration)
        gram_weight = float(self.gram_weight[iteration])
        if iteration in self.gram_refresh_iterations:
            self.model.refresh_gram_teacher()
        apply_schedules(
            self.optimizer, scheduled["lr"], scheduled["weight_decay"], scheduled["last_layer_lr_mult"]
        )
        inputs = {
            name: batch[name].to(self.device, non_blocking=True) for name in _BATCH_TENSORS if name in batch
        }
        with self._autocast():
            terms = self.model(inputs, scheduled["teacher_temp"], gram_weight)
        loss = torch.stack(list(terms.values())).sum()
        metrics: dict[str, Any] = {"iteration": iteration, "loss": loss.item()}
        metrics.update({f"loss/{name}": term.item() for name, term in terms.items()})
        metrics.update(
            {
                "lr": scheduled["lr"],
                "wd": scheduled["weight_decay"],
                "momentum": scheduled["momentum"],
                "teacher_temp": scheduled["teacher_temp"],
                "last_layer_lr_mult": scheduled["last_layer_lr_mult"],
            }
        )
        if self.model.gram_loss is not None:
            metrics["gram_weight"] = gram_weight
        metrics["skipped"] = not self._update(loss, scheduled, metrics)
        metrics["corrupt_images"] = int(batch.get("n_skipped", 0))
        self.iteration += 1
        return {name: _finite_or_none(v) if isinstance(v, float) else v for name, v in metrics.items()}

    def _update(self, loss: torch.Tensor, scheduled: dict[str, float], metrics: dict[str, Any]) -> bool:
        """Backward, last-layer freeze, per-module clipping, optimizer step and EMA update; adds the
        gradient norms to ``metrics``. Returns False when a non-finite value made it skip the step."""
        modules = self.model.trainable_modules()
        self.optimizer.zero_grad(set_to_none=True)
        if not math.isfinite(metrics["loss"]):
            metrics.update({f"grad_norm/{name}": None for name in modules})
            self._on_non_finite(f"loss {metrics['loss']}", metrics)
            return False
        loss.backward()
        if scheduled["last_layer_lr_mult"] == 0.0:
            self.model.freeze_last_layers()
        norms = clip_grad_norms(modules, self.config.optim.clip_grad)
        metrics.update({f"grad_norm/{name}": norm for name, norm in norms.items()})
        if not all(math.isfinite(norm) for norm in norms.values()):
            self.optimizer.zero_grad(set_to_none=True)
            self._on_non_finite(f"gradient norms {norms}", metrics)
            return False
        self.optimizer.step()
        self.model.update_teacher(scheduled["momentum"])
        return True

    def _on_non_finite(self, what: str, metrics: dict[str, Any]) -> None:
        losses = {name: value for name, value in metrics.items() if name.startswith("loss")}
        message = (
            f"non-finite {what} at iteration {metrics['iteration']} (losses {losses}, lr {metrics['lr']:.3g})"
        )
        if self.config.optim.nan_policy == "stop":
            raise NonFiniteLossError(
                f"{message}; training stopped. Lower schedule.base_lr, check the data, or set "
                "optim.nan_policy=skip to skip such steps"
            )
        logger.warning("%s; step skipped (optim.nan_policy=skip)", message)

    def train(self) -> None:
        """Train from the current iteration to the end of the schedules, then export the teacher."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        save_config(self.config, self.output_dir / CONFIG_FILE)
        self.model.train()
        batches = self.batches()
        interactive = sys.stderr.isatty()
        log_every = self.config.train.log_every
        with (
            open(self.output_dir / METRICS_FILE, "w") as metrics_file,
            tqdm(total=self.total_iters, initial=self.iteration, disable=not interactive, unit="it") as bar,
        ):
            while self.iteration < self.total_iters:
                started = time.perf_counter()
                batch = next(batches)
                loaded = time.perf_counter()
                metrics = self.step(batch)
                elapsed = time.perf_counter() - started
                metrics["images_per_s"] = self.global_batch_size / elapsed
                metrics["data_wait_share"] = (loaded - started) / elapsed
                metrics_file.write(json.dumps(metrics) + "\n")
                metrics_file.flush()
                bar.update(1)
                if self.iteration % log_every == 0 or self.iteration == self.total_iters:
                    self._report(metrics, bar, interactive)
        self.export_teacher(self.output_dir / TEACHER_FILE)

    def _report(self, metrics: dict[str, Any], bar: tqdm, interactive: bool) -> None:
        loss = "nan" if metrics["loss"] is None else f"{metrics['loss']:.4f}"
        summary = {"loss": loss, "lr": f"{metrics['lr']:.2e}", "img/s": f"{metrics['images_per_s']:.1f}"}
        if interactive:
            bar.set_postfix(summary, refresh=True)
        else:
            details = " ".join(f"{name} {value}" for name, value in summary.items())
            print(f"iteration {self.iteration}/{self.total_iters} {details}", file=sys.stderr, flush=True)

    def export_teacher(self, path: Path) -> None:
        """Save {'config': build_vit keyword arguments, 'state_dict': teacher backbone weights};
        written to a temporary file and renamed, so never half-written."""
        state_dict = {
            name: tensor.detach().cpu()
            for name, tensor in self.model.teacher["backbone"].state_dict().items()
        }
        temporary = path.with_name(f".{path.name}.tmp")
        torch.save({"config": self.config.backbone_spec(), "state_dict": state_dict}, temporary)
        os.replace(temporary, path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.train",
        description="Pretrain a DINO-family model (v1/v2/v3 recipes in pretrain/configs/).",
    )
    parser.add_argument("--config", type=Path, help="YAML config file (pretrain/configs/*.yaml)")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides, e.g. optim.clip_grad=1.0"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(PretrainConfig, args.config, args.overrides)
        trainer = Trainer(config)
    except (ValueError, OSError) as error:  # ConfigError, bad sources, unusable device: nothing ran yet
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        trainer.train()
    except NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
