"""Pretrain a DINO-family model: one process on CPU or one GPU, or several with torchrun or SLURM.

    python -m pretrain.train --config pretrain/configs/v3_tiny.yaml data.manifest=RUN/manifests/pool output_dir=OUT
    torchrun --nproc_per_node=8 -m pretrain.train --config pretrain/configs/v2.yaml data.image_folder=DIR output_dir=OUT

Rank 0 writes OUTPUT_DIR/config.yaml (the resolved config) at the start, OUTPUT_DIR/metrics.jsonl (one
line per iteration) while training, checkpoints under OUTPUT_DIR/checkpoints/ (pretrain/checkpoint.py)
and the teacher export at the end (pretrain/export.py). Rerunning the same command resumes from the
newest complete checkpoint. A config, source, environment or checkpoint that cannot work fails before
the first step with ``error: ...`` and exit code 2; a non-finite loss under ``optim.nan_policy=stop``,
a final checkpoint or export that cannot be written, or ranks whose teachers diverged end the run with
exit code 1. SIGUSR1 (sent by slurm/pretrain_job.sh ahead of the time limit) stops the run after the
current step with a checkpoint of that iteration and exit code 3, so a requeue loses no step.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import math
import os
import random
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from pretrain.checkpoint import (
    CONFIG_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    TRAINER_FILE,
    Checkpointer,
    CheckpointError,
    capture_rng,
    check_resumable,
    config_differences,
    describe_differences,
    gather_model_state,
    gather_optimizer_state,
    load_model_state,
    load_optimizer_state,
    read_checkpoint,
    restore_rng,
    step_name,
)
from pretrain.config import PretrainConfig
from pretrain.config_io import dump_config, load_config, save_config
from pretrain.data import (
    ImageFolderSource,
    ImageSource,
    ManifestSource,
    MultiCropAugmentation,
    PretrainDataset,
    collate_multicrop,
)
from pretrain.distributed import (
    STOP_SIGNAL,
    DistEnv,
    RankDivergenceError,
    StopSignal,
    all_gather_objects,
    broadcast_object,
    detect_environment,
    init_process_group,
    parallelize,
    process_seed,
    state_checksum,
)
from pretrain.eval.in_training import TrainingEvaluator
from pretrain.export import (
    TORCH_EXPORT_FILE,
    teacher_backbone_state,
    write_safetensors_export,
    write_torch_export,
)
from pretrain.losses._dist import all_reduce_sum
from pretrain.meta_arch import SSLMetaArch
from pretrain.metrics import TEACHER_ENTROPY_METRIC, HealthMonitor, ScalarWriter, peak_memory_mib
from pretrain.optim import apply_schedules, build_optimizer, clip_grad_norms, param_groups
from pretrain.schedules import Schedules, linear_ramp

__all__ = ["EXIT_STOPPED", "CheckpointSaveError", "NonFiniteLossError", "StopRequested", "Trainer", "main"]

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINT_DIR = "checkpoints"
_BATCH_TENSORS = ("global_crops", "local_crops", "masks", "gram_crops")
EXIT_STOPPED = 3  # a stop signal ended the run after a checkpoint; rerunning the command resumes it


class NonFiniteLossError(RuntimeError):
    """The loss or a gradient norm is NaN or infinite and ``optim.nan_policy`` is 'stop'."""


class CheckpointSaveError(RuntimeError):
    """The final checkpoint, a checkpoint asked for by a stop signal, or the export could not be written
    (a failed periodic save only logs an error)."""


class StopRequested(Exception):
    """A stop signal ended the run at a step boundary, after a checkpoint of that iteration."""


def build_sources(config: PretrainConfig) -> list[ImageSource]:
    """The configured image sources, opened; a missing or empty source raises with its path."""
    sources: list[ImageSource] = []
    for source in config.data.all_sources():
        if source.manifest is not None:
            sources.append(ManifestSource(source.manifest, root=source.root))
        else:
            sources.append(ImageFolderSource(source.image_folder))
    return sources


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The device of this process: GPU ``local_rank`` (one process per GPU) or the CPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but no CUDA device is available; set train.device=cpu or auto")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    if local_rank >= torch.cuda.device_count():
        raise ValueError(
            f"local rank {local_rank} but only {torch.cuda.device_count()} GPUs: start at most one process per GPU"
        )
    return torch.device("cuda", local_rank)


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32; auto is bf16 on CUDA and fp32 on CPU (where bf16
    matmuls are slow on most processors)."""
    if name == "bf16" or (name == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def _finite_or_none(value: float) -> float | None:
    """JSON has no NaN or infinity; a non-finite value is written as null."""
    return value if math.isfinite(value) else None


def truncate_metrics(path: Path, iteration: int) -> None:
    """Keep the metrics of iterations before ``iteration`` (where a resumed run starts), so that the
    file holds exactly one line per iteration; a line cut off by a kill ends what is kept."""
    if not path.is_file():
        return
    kept: list[str] = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break
        if row["iteration"] >= iteration:
            break
        kept.append(line + "\n")
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text("".join(kept))
    os.replace(temporary, path)


class Trainer:
    """Builds everything from the config and runs the training loop of this process.

    Run state lives in ``model`` (student, teacher, Gram teacher, centers), ``optimizer``,
    ``iteration`` and the RNG states; schedules are pure functions of the config and the data stream
    a pure function of (seed, iteration), so a checkpoint of these resumes a run exactly.
    ``training_model`` is what the forward calls: ``model``, its DDP wrapper, or ``model`` sharded by
    FSDP2. ``env`` is this process's place in a multi-process run (the process group, if any, is
    initialised before; see ``main``).

    A new Trainer starts at iteration 0; ``restore()`` (which ``main`` calls) continues from the
    checkpoints in ``output_dir``, so that building a Trainer never reads state behind one's back.
    """

    def __init__(self, config: PretrainConfig, env: DistEnv | None = None) -> None:
        self.config = config
        self.env = env if env is not None else DistEnv()
        self.output_dir = Path(config.output_dir)
        self.device = resolve_device(config.train.device, self.env.local_rank)
        self.dtype = autocast_dtype(config.train.dtype, self.device)
        if config.train.deterministic:
            # cuBLAS reads this when it starts; without it deterministic matmuls raise on CUDA.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        # Sources first: a missing or empty one fails before any model is built.
        self.sources = build_sources(config)
        # The held-out evaluation images are decoded now, so a bad folder fails before any model too.
        self.evaluator = (
            TrainingEvaluator(config.eval, config.data.augment.global_crop_size, self.output_dir)
            if config.eval.every
            else None
        )
        torch.manual_seed(config.train.seed)  # the same initial networks on every rank
        self.model = SSLMetaArch(config).to(self.device)
        # Before the optimizer: FSDP2 replaces the parameters by sharded ones.
        self.training_model = parallelize(self.model, config.train.parallelism, self.device)
        optim = config.optim
        groups = param_groups(self.model.trainable_modules(), optim.layer_decay, optim.patch_embed_lr_mult)
        self.optimizer = build_optimizer(groups, betas=optim.betas)
        self.global_batch_size = config.data.batch_size * self.env.world_size
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
        self._seed_process()
        self.checkpointer = Checkpointer(self.output_dir / CHECKPOINT_DIR, config.checkpoint)
        self.resumed_from: Path | None = None

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
            rank=self.env.rank,
            world_size=self.env.world_size,
            start_iteration=self.iteration,
        )
        loader = dataset.loader(num_workers=data.num_workers, pin_memory=self.device.type == "cuda")
        # Starting a loader draws a base seed from the global RNG; drawn on a fork, it leaves the
        # training randomness where the checkpoint put it (the samples are seeded by position anyway).
        with torch.random.fork_rng(devices=[]):
            return iter(loader)

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
            terms = self.training_model(inputs, scheduled["teacher_temp"], gram_weight)
        loss = torch.stack(list(terms.values())).sum()
        # Means over the ranks (the global batch's loss, the teacher entropy) and the total of corrupt
        # images, in one collective; every rank then takes the same decision on a non-finite loss.
        diagnostics = self.model.diagnostics
        local = [loss.detach(), *(term.detach() for term in terms.values())]
        local += [value.detach() for value in diagnostics.values()]
        summed = all_reduce_sum(
            torch.stack([*local, loss.new_tensor(float(batch.get("n_skipped", 0)))]).float()
        )
        *means, corrupt_images = summed.tolist()
        global_loss, *global_means = [value / self.env.world_size for value in means]
        global_terms = global_means[: len(terms)]
        global_diagnostics = dict(zip(diagnostics, global_means[len(terms) :], strict=True))
        metrics: dict[str, Any] = {"iteration": iteration, "loss": global_loss}
        metrics.update({f"loss/{name}": value for name, value in zip(terms, global_terms, strict=True)})
        if "teacher_entropy" in global_diagnostics:
            metrics[TEACHER_ENTROPY_METRIC] = global_diagnostics["teacher_entropy"]
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
        metrics["corrupt_images"] = int(corrupt_images)
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

    def train(self, stop_signals: Sequence[signal.Signals] = (STOP_SIGNAL,)) -> None:
        """Train from the current iteration to the end of the schedules, checkpointing on the way, then
        export the teacher. Only rank 0 writes files. One of ``stop_signals`` ends the run after the
        current step with a checkpoint of it (StopRequested)."""
        writer = self.env.is_writer
        if writer:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.config, self.output_dir / CONFIG_FILE)
        self.training_model.train()
        batches = self.batches()
        interactive = writer and sys.stderr.isatty()
        log_every = self.config.train.log_every
        resumed = self.resumed_from is not None
        monitor = HealthMonitor(self.config.heads.out_dim)
        scalars = (
            ScalarWriter(self.output_dir / TENSORBOARD_DIR, purge_step=self.iteration if resumed else None)
            if writer and self.config.train.tensorboard
            else None
        )
        # A resumed run appends to the metrics that restore() cut back to its iteration.
        with (
            open(self.output_dir / METRICS_FILE, "a" if resumed else "w")
            if writer
            else contextlib.nullcontext() as metrics_file,
            tqdm(total=self.total_iters, initial=self.iteration, disable=not interactive, unit="it") as bar,
            contextlib.closing(scalars) if scalars is not None else contextlib.nullcontext(),
            StopSignal(stop_signals) as stop_signal,
        ):
            while self.iteration < self.total_iters:
                started = time.perf_counter()
                batch = next(batches)
                loaded = time.perf_counter()
                metrics = self.step(batch)
                elapsed = time.perf_counter() - started
                metrics["images_per_s"] = self.global_batch_size / elapsed
                metrics["data_wait_share"] = (loaded - started) / elapsed
                metrics["memory/peak_mib"] = peak_memory_mib(self.device)
                if self.evaluator is not None and self.evaluator.due(self.iteration, self.total_iters):
                    metrics.update(self.evaluator.evaluate(self.model.teacher["backbone"], self.iteration, writer))
                if writer:
                    metrics["flags"] = monitor.update(metrics)
                    self._write_metrics(metrics_file, metrics, bar, interactive, log_every)
                    if scalars is not None:
                        scalars.write(metrics)
                stop = self.iteration < self.total_iters and stop_signal.agreed(self.device)
                if stop or self.checkpointer.due(self.iteration, self.total_iters):
                    self.save_checkpoint(required=stop)
                if stop:
                    by = stop_signal.received.name if stop_signal.received else "another rank's stop signal"
                    raise StopRequested(
                        f"stopped by {by} after iteration {self.iteration} of {self.total_iters}, "
                        f"checkpointed in {self.checkpointer.root / step_name(self.iteration)}: rerun the same "
                        "command to continue"
                    )
        self.check_replicas()
        self.export_teacher()

    def _write_metrics(
        self, metrics_file: IO[str], metrics: dict[str, Any], bar: tqdm, interactive: bool, log_every: int
    ) -> None:
        metrics_file.write(json.dumps(metrics) + "\n")
        metrics_file.flush()
        bar.update(1)
        if self.iteration % log_every == 0 or self.iteration == self.total_iters:
            self._report(metrics, bar, interactive)

    def _report(self, metrics: dict[str, Any], bar: tqdm, interactive: bool) -> None:
        loss = "nan" if metrics["loss"] is None else f"{metrics['loss']:.4f}"
        summary = {"loss": loss, "lr": f"{metrics['lr']:.2e}", "img/s": f"{metrics['images_per_s']:.1f}"}
        if interactive:
            bar.set_postfix(summary, refresh=True)
        else:
            details = " ".join(f"{name} {value}" for name, value in summary.items())
            print(f"iteration {self.iteration}/{self.total_iters} {details}", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------------------- checkpoints

    def _seed_process(self) -> None:
        """Seed this rank's own randomness (stochastic depth, RoPE jitter) from (seed, rank, iteration)."""
        seed = process_seed(self.config.train.seed, self.env.rank, self.iteration)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def save_checkpoint(self, required: bool = False) -> None:
        """Checkpoint the current iteration: every rank takes part in gathering the state, rank 0 writes.

        A periodic save that fails (a full disk) is logged as an error and training continues, so
        that the next save can succeed once space is freed; the final one, or a ``required`` one (the
        run stops after it), raises CheckpointSaveError.
        """
        model_state = gather_model_state(self.model)
        optimizer_state = gather_optimizer_state(self.model, self.optimizer)
        rng_states = all_gather_objects(capture_rng())
        if not self.env.is_writer:
            return
        iteration = self.iteration
        trainer_state = {
            "iteration": iteration,
            "world_size": self.env.world_size,
            "global_batch_size": self.global_batch_size,
            "rng": rng_states,  # by rank
        }
        backbone = teacher_backbone_state(model_state)
        spec = self.config.backbone_spec()

        def write_extras(folder: Path) -> None:
            save_config(self.config, folder / CONFIG_FILE)
            write_safetensors_export(folder, backbone, spec, iteration)

        files = {MODEL_FILE: model_state, OPTIMIZER_FILE: optimizer_state, TRAINER_FILE: trainer_state}
        try:
            path = self.checkpointer.save(iteration, files, write_extras)
        except OSError as error:
            message = (
                f"could not write checkpoint {step_name(iteration)} in {self.checkpointer.root}: {error}"
            )
            if required or iteration == self.total_iters:
                newest = self.checkpointer.complete()
                raise CheckpointSaveError(
                    f"{message}. The state at this iteration is lost; free space and rerun the same command: it resumes "
                    f"from {newest[-1] if newest else 'iteration 0 (no complete checkpoint)'}"
                ) from error
            logger.error(
                "%s. Older checkpoints are intact; training continues and the next checkpoint retries",
                message,
            )
            return
        logger.info("saved checkpoint %s", path)

    def restore(self) -> Path | None:
        """Continue from the newest complete checkpoint in ``output_dir`` (``checkpoint.resume``).

        Rank 0 picks it, skipping (with a warning) unreadable or incomplete ones, and every rank reads
        it. A checkpoint of another architecture is a CheckpointError before anything is loaded.
        Sets and returns ``resumed_from``: the folder resumed from, or None for a fresh start.
        """
        checkpointer, writer = self.checkpointer, self.env.is_writer
        if not self.config.checkpoint.resume:
            existing = broadcast_object(
                [str(path) for path in checkpointer.step_folders()] if writer else None
            )
            if existing:
                raise CheckpointError(
                    f"checkpoint.resume=false but {checkpointer.root} already holds checkpoints (newest "
                    f"{existing[-1]}): set checkpoint.resume=true to continue that run, or choose a new output_dir"
                )
            return None
        loaded, unusable = checkpointer.newest_readable() if writer else (None, [])
        chosen = broadcast_object(None if loaded is None else str(loaded.path))
        if chosen is None:
            if unusable:
                logger.warning("no readable checkpoint in %s: starting from iteration 0", checkpointer.root)
                checkpointer.set_aside(unusable)
            return None
        if loaded is None:
            loaded = read_checkpoint(Path(chosen))
        current = dump_config(self.config)
        with torch.device("meta"):
            expected = {name: tuple(t.shape) for name, t in SSLMetaArch(self.config).state_dict().items()}
        check_resumable(loaded, current, expected)
        load_model_state(self.model, loaded.model)
        load_optimizer_state(self.model, self.optimizer, loaded.optimizer)
        self.iteration = loaded.iteration
        state = loaded.trainer
        if state["world_size"] == self.env.world_size:
            restore_rng(state["rng"][self.env.rank])
        else:
            self._seed_process()
        if writer:
            self._report_resume(loaded.path, state, config_differences(loaded.config, current))
            checkpointer.set_aside(unusable)
            truncate_metrics(self.output_dir / METRICS_FILE, self.iteration)
        self.resumed_from = loaded.path
        return loaded.path

    def _report_resume(self, path: Path, state: dict[str, Any], changed: dict[str, tuple[Any, Any]]) -> None:
        logger.info("resumed from %s at iteration %d of %d", path, self.iteration, self.total_iters)
        if changed:
            logger.warning("the config differs from the checkpoint's: %s", describe_differences(changed))
        if state["world_size"] != self.env.world_size:
            logger.warning(
                "the checkpoint was written by %d processes, this run has %d: each rank's random stream "
                "(stochastic depth, RoPE jitter) restarts from (seed, rank, iteration)",
                state["world_size"],
                self.env.world_size,
            )
        if state["global_batch_size"] != self.global_batch_size:
            logger.warning(
                "global batch %d differs from the checkpoint's %d: the learning rate and the sample stream "
                "follow the new global batch from iteration %d (keep data.batch_size × processes constant "
                "to continue the same stream)",
                self.global_batch_size,
                state["global_batch_size"],
                self.iteration,
            )

    def check_replicas(self) -> None:
        """Under DDP every rank holds the whole teacher, and identical gradients keep the copies equal:
        compare checksums at the end, so that a silent divergence fails the run instead of an export."""
        if self.env.world_size == 1 or self.config.train.parallelism != "ddp":
            return
        checksums = all_gather_objects(state_checksum(self.model.teacher.state_dict()))
        if self.env.is_writer:
            logger.info("teacher checksums by rank: %s", " ".join(checksums))
        if len(set(checksums)) > 1:
            raise RankDivergenceError(
                f"the teacher weights differ between ranks (checksums {checksums}); the exports would depend "
                "on the rank that wrote them"
            )

    def export_teacher(self) -> None:
        """OUTPUT_DIR/teacher_backbone.pt (torch) and .safetensors + .json (pretrain/export.py)."""
        backbone = teacher_backbone_state(gather_model_state(self.model))
        if not self.env.is_writer:
            return
        spec = self.config.backbone_spec()
        try:
            write_torch_export(self.output_dir / TORCH_EXPORT_FILE, backbone, spec)
            write_safetensors_export(self.output_dir, backbone, spec, self.iteration)
        except OSError as error:
            raise CheckpointSaveError(
                f"could not write the teacher export in {self.output_dir}: {error}"
            ) from error


def main(argv: Sequence[str] | None = None, stop_signals: Sequence[signal.Signals] = (STOP_SIGNAL,)) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.train",
        description="Pretrain a DINO-family model (v1/v2/v3 recipes in pretrain/configs/).",
    )
    parser.add_argument("--config", type=Path, help="YAML config file (pretrain/configs/*.yaml)")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides, e.g. optim.clip_grad=1.0"
    )
    args = parser.parse_args(argv)
    try:
        config = load_config(PretrainConfig, args.config, args.overrides)
        env = detect_environment()
        device = resolve_device(config.train.device, env.local_rank)
        distributed = init_process_group(env, device, config.train.parallelism)
    except (ValueError, OSError, dist.DistError) as error:  # config, environment, rendezvous
        print(f"error: {error}", file=sys.stderr)
        return 2
    # Rank 0 tells the story; the others only warn.
    logging.basicConfig(
        level=logging.INFO if env.is_writer else logging.WARNING,
        format=f"%(levelname)s {'' if env.world_size == 1 else f'rank {env.rank} '}%(name)s: %(message)s",
    )
    try:
        try:
            trainer = Trainer(config, env)
            trainer.restore()
        except (ValueError, OSError) as error:  # bad sources, device or checkpoint: nothing trained yet
            print(f"error: {error}", file=sys.stderr)
            return 2
        try:
            trainer.train(stop_signals)
        except (NonFiniteLossError, CheckpointSaveError, RankDivergenceError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        except StopRequested as stopped:
            print(stopped, file=sys.stderr)
            return EXIT_STOPPED
        return 0
    finally:
        if distributed:
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
