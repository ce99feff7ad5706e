"""The one typed config tree of a pretraining run: every key the trainer reads, and nothing else.

Load it with ``load_config(PretrainConfig, path, overrides)`` (pretrain.config_io): unknown keys are
errors with the nearest valid key, and the ``validate()`` hooks below reject impossible combinations
before anything is built, saying which key to change. The recipes live in pretrain/configs/ and the
keys are documented in docs/pretrain.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from pretrain.data import AugmentConfig, BlockMaskConfig, MixtureConfig
from pretrain.eval.config import EvalConfig
from pretrain.losses import TargetMode
from pretrain.models import build_vit
from pretrain.schedules import ScheduleConfig

__all__ = [
    "CheckpointConfig",
    "DataConfig",
    "DistillConfig",
    "GramConfig",
    "HeadsConfig",
    "LossesConfig",
    "MaskingConfig",
    "ModelConfig",
    "OptimConfig",
    "PretrainConfig",
    "SourceConfig",
    "TrainConfig",
]


@dataclass(frozen=True)
class ModelConfig:
    """The backbone: a registered ViT (pretrain.models) and the settings in which the recipes differ."""

    arch: str = "vit_small"
    patch_size: int = 16
    n_registers: int = 0
    pos_embed: Literal["learned", "rope"] = "learned"
    ffn: Literal["mlp", "swiglu"] | None = None  # None: the architecture's own (SwiGLU for vit_giant)
    drop_path_rate: float = 0.0
    layerscale_init: float | None = 1e-5  # None: no LayerScale (DINO v1)

    def validate(self) -> None:
        if self.patch_size <= 0 or self.n_registers < 0:
            raise ValueError(
                f"patch_size must be > 0 and n_registers >= 0, got {self.patch_size} and {self.n_registers}"
            )
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")


@dataclass(frozen=True)
class HeadsConfig:
    """DINO head (on CLS) and iBOT head (on masked patches): MLP -> bottleneck -> K prototypes."""

    out_dim: int = 65536  # K, the number of prototypes
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    separate_ibot_head: bool = False  # v2 large runs and v3: the iBOT head has its own weights
    weight_norm_last_layer: bool = True  # v1/v2; v3 uses a plain linear last layer

    def validate(self) -> None:
        if min(self.out_dim, self.hidden_dim, self.bottleneck_dim) <= 0:
            raise ValueError(
                f"out_dim, hidden_dim and bottleneck_dim must be > 0, got {self.out_dim}, "
                f"{self.hidden_dim}, {self.bottleneck_dim}"
            )


@dataclass(frozen=True)
class LossesConfig:
    """Weights of the loss terms and how teacher targets are formed.

    A weight of 0 switches a term off entirely (no head, no computation, no metric).
    """

    dino_weight: float = 1.0
    # Local-crop DINO pairs relative to global-crop pairs: (n_g·L_global + w·n_l·L_local) / (n_g + n_l).
    # 1 is the plain mean over all pairs; DINOv3's Gram stage uses 0.5.
    local_dino_weight: float = 1.0
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1  # times the sum over the 2 global crops
    target_mode: TargetMode = "centering"  # centering (v1, v2) or sinkhorn (v2 large, v3)
    student_temp: float = 0.1
    center_momentum: float = 0.9  # centering mode only

    def validate(self) -> None:
        weights = {
            "dino_weight": self.dino_weight,
            "local_dino_weight": self.local_dino_weight,
            "ibot_weight": self.ibot_weight,
            "koleo_weight": self.koleo_weight,
        }
        negative = {name: value for name, value in weights.items() if value < 0}
        if negative:
            raise ValueError(f"loss weights must be >= 0 (0 switches a term off), got {negative}")
        if self.dino_weight == 0 and self.ibot_weight == 0:
            raise ValueError("dino_weight and ibot_weight are both 0: nothing would learn from the teacher")
        if self.student_temp <= 0 or not 0.0 <= self.center_momentum < 1.0:
            raise ValueError(
                f"need student_temp > 0 and center_momentum in [0, 1), got {self.student_temp} and "
                f"{self.center_momentum}"
            )


@dataclass(frozen=True)
class GramConfig:
    """Gram anchoring (v3): keep the student's patch-similarity structure close to a frozen Gram teacher.

    The Gram teacher is a copy of the EMA teacher's backbone taken at ``start_iteration`` and refreshed
    from it every ``refresh_every`` iterations, ``n_refreshes`` times, then kept. The loss weight ramps
    linearly from 0 at ``start_iteration`` to ``weight`` over ``ramp_iterations``. The Gram teacher's
    crops are rendered at ``data.augment.gram_crop_factor`` × the global crop size (0: it sees the
    student's global crops).

    ``teacher_checkpoint`` (a checkpoint folder, or a run folder: its newest checkpoint) replaces the
    first snapshot: the Gram teacher starts as that checkpoint's EMA teacher backbone (an early teacher
    of the previous stage, pretrain/stages.py), and the refreshes follow ``refresh_every`` iterations
    after ``start_iteration``.
    """

    enabled: bool = False
    weight: float = 2.0
    start_iteration: int = 0
    ramp_iterations: int = 0
    refresh_every: int = 10000
    n_refreshes: int = 3
    teacher_checkpoint: Path | None = None

    def validate(self) -> None:
        if min(self.start_iteration, self.ramp_iterations, self.refresh_every, self.n_refreshes) < 0:
            raise ValueError(f"iteration counts must be >= 0, got {self}")
        if self.weight < 0:
            raise ValueError(f"weight must be >= 0, got {self.weight}")
        if self.n_refreshes > 0 and self.refresh_every == 0:
            raise ValueError(
                f"n_refreshes={self.n_refreshes} needs refresh_every > 0; set refresh_every or n_refreshes=0"
            )
        if self.teacher_checkpoint is not None and not self.enabled:
            raise ValueError(
                "teacher_checkpoint is set but Gram anchoring is off: set enabled=true or remove it"
            )

    def refresh_iterations(self, total_iters: int) -> list[int]:
        """Iterations at whose start the Gram teacher is (re)taken from the EMA teacher."""
        if not self.enabled:
            return []
        # With a teacher_checkpoint the first Gram teacher is loaded with the networks, not snapshotted.
        first = 0 if self.teacher_checkpoint is None else 1
        taken = [self.start_iteration + k * self.refresh_every for k in range(first, self.n_refreshes + 1)]
        return sorted({iteration for iteration in taken if iteration < total_iters})


@dataclass(frozen=True)
class SourceConfig:
    """One image source of the mixture: a curated manifest or an ImageFolder tree."""

    manifest: Path | None = None
    image_folder: Path | None = None
    # The folder that the manifest's shard paths are relative to; None: the parent of the manifest's
    # nearest ancestor folder named 'manifests' (RUN_DIR/manifests/...).
    root: Path | None = None
    weight: float = 1.0

    def validate(self) -> None:
        if (self.manifest is None) == (self.image_folder is None):
            raise ValueError("a source needs exactly one of 'manifest' and 'image_folder'")
        if self.root is not None and self.manifest is None:
            raise ValueError("'root' applies to a manifest source only; remove it")
        if self.weight <= 0:
            raise ValueError(f"weight must be > 0, got {self.weight}; remove the source instead")


@dataclass(frozen=True)
class MaskingConfig:
    """iBOT masks of the student's global crops (drawn in the collate function)."""

    ratio_range: tuple[float, float] = (0.1, 0.5)  # target ratios, stratified over the masked crops
    probability: float = 0.5  # share of global crops that are masked
    block: BlockMaskConfig = field(default_factory=BlockMaskConfig)

    def validate(self) -> None:
        low, high = self.ratio_range
        if not 0.0 <= low <= high <= 1.0 or not 0.0 <= self.probability <= 1.0:
            raise ValueError(
                f"need 0 <= ratio_range low <= high <= 1 and probability in [0, 1], got "
                f"{self.ratio_range} and {self.probability}"
            )


@dataclass(frozen=True)
class DataConfig:
    """Where images come from and how batches are drawn, augmented and masked.

    Sources are ``manifest`` and ``image_folder`` (command-line conveniences for a single source),
    then the ``sources`` list, in that order; ``homogeneous_source`` indexes that order.
    """

    manifest: Path | None = None
    image_folder: Path | None = None
    sources: list[SourceConfig] = field(default_factory=list)
    # Probability that a whole batch comes from one source (DINOv3: 10% ImageNet-only batches), drawn
    # as homogeneous_source, or by the source weights when that is None.
    p_homogeneous: float = 0.0
    homogeneous_source: int | None = None
    batch_size: int = 64  # per process
    num_workers: int = 8
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)

    def all_sources(self) -> list[SourceConfig]:
        convenience = [SourceConfig(manifest=self.manifest)] if self.manifest is not None else []
        if self.image_folder is not None:
            convenience.append(SourceConfig(image_folder=self.image_folder))
        return convenience + self.sources

    def mixture(self) -> MixtureConfig:
        sources = self.all_sources()
        homogeneous_weights = None
        if self.homogeneous_source is not None:
            homogeneous_weights = tuple(float(i == self.homogeneous_source) for i in range(len(sources)))
        return MixtureConfig(
            weights=tuple(source.weight for source in sources),
            p_homogeneous=self.p_homogeneous,
            homogeneous_weights=homogeneous_weights,
        )

    def validate(self) -> None:
        n_sources = len(self.all_sources())
        if n_sources == 0:
            raise ValueError(
                "no data source given: set data.manifest=PATH (a curated manifest), "
                "data.image_folder=PATH (an ImageFolder tree) or the data.sources list"
            )
        if self.batch_size < 1 or self.num_workers < 0:
            raise ValueError(
                f"need batch_size >= 1 and num_workers >= 0, got {self.batch_size} and {self.num_workers}"
            )
        if not 0.0 <= self.p_homogeneous <= 1.0:
            raise ValueError(f"p_homogeneous must be in [0, 1], got {self.p_homogeneous}")
        if self.homogeneous_source is not None and not 0 <= self.homogeneous_source < n_sources:
            raise ValueError(
                f"homogeneous_source {self.homogeneous_source} is not a source index: there are "
                f"{n_sources} sources (manifest, image_folder, then the sources list), numbered from 0"
            )


@dataclass(frozen=True)
class OptimConfig:
    """AdamW, layer-wise lr decay, per-module gradient clipping and what to do with a non-finite loss."""

    betas: tuple[float, float] = (0.9, 0.999)
    layer_decay: float = 0.9  # lr × decay^(L + 1 − layer); 1.0 switches it off
    patch_embed_lr_mult: float = 0.2
    clip_grad: float | None = 3.0  # per module (backbone, each head); None: no clipping
    # 'stop' ends the run with a message; 'skip' drops that step (no optimizer or EMA update).
    nan_policy: Literal["stop", "skip"] = "stop"

    def validate(self) -> None:
        if not 0.0 < self.layer_decay <= 1.0 or self.patch_embed_lr_mult < 0:
            raise ValueError(
                f"need layer_decay in (0, 1] and patch_embed_lr_mult >= 0, got {self.layer_decay} and "
                f"{self.patch_embed_lr_mult}"
            )
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ValueError(f"clip_grad must be > 0 or null (no clipping), got {self.clip_grad}")


@dataclass(frozen=True)
class TrainConfig:
    """How the processes run: randomness, device, precision, parallelism and logging."""

    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when available
    dtype: Literal["auto", "bf16", "fp32"] = "auto"  # autocast; auto: bf16 on CUDA, fp32 on CPU
    log_every: int = 10  # iterations between progress-bar updates (or log lines without a terminal)
    deterministic: bool = False  # deterministic kernels: reproducible, slower
    # How several processes share the work: 'ddp' replicates the networks and all-reduces gradients;
    # 'fsdp' shards parameters, gradients and optimizer state (FSDP2, per block then the root).
    parallelism: Literal["ddp", "fsdp"] = "ddp"
    tensorboard: bool = True  # rank 0 writes every numeric metric to OUTPUT_DIR/tensorboard as well

    def validate(self) -> None:
        if self.seed < 0 or self.log_every < 1:
            raise ValueError(f"need seed >= 0 and log_every >= 1, got {self.seed} and {self.log_every}")


@dataclass(frozen=True)
class CheckpointConfig:
    """When OUTPUT_DIR/checkpoints/step-XXXXXXX/ folders are written, which are kept, and resuming.

    A checkpoint is written every ``every`` iterations and at the end; after each one, the newest
    ``keep_last`` are kept and, permanently, those whose iteration is a multiple of ``keep_every``.
    """

    every: int = 1250  # iterations between checkpoints; 0: only the final one
    keep_last: int = 3
    keep_every: int = 0  # 0: no permanent checkpoints
    # true: continue from the newest complete checkpoint in output_dir; false: start at iteration 0,
    # and refuse an output_dir that already holds checkpoints (two runs' checkpoints never mix).
    resume: bool = True
    # A fresh run (nothing to resume) starts from the networks of this checkpoint folder, or of a run
    # folder's newest checkpoint: student, EMA teacher and centers; optimizer and schedules start anew
    # (the next stage of pretrain/stages.py). None: random initialisation.
    init_from: Path | None = None

    def validate(self) -> None:
        if self.every < 0 or self.keep_every < 0 or self.keep_last < 1:
            raise ValueError(
                f"need every >= 0, keep_every >= 0 and keep_last >= 1, got {self.every}, "
                f"{self.keep_every} and {self.keep_last}"
            )
        if self.keep_every and (self.every == 0 or self.keep_every % self.every):
            raise ValueError(
                f"keep_every {self.keep_every} is not a multiple of every {self.every}, so no checkpoint "
                "would ever be kept by it: use a multiple of checkpoint.every, or keep_every=0"
            )


@dataclass(frozen=True)
class DistillConfig:
    """Distillation (pretrain/distill.py): a frozen teacher from another run gives the DINO and iBOT
    targets instead of the EMA teacher, which becomes an EMA of the student (the exported model).

    ``teacher`` is a checkpoint folder, or a run folder (its newest checkpoint): its EMA teacher and
    heads are used, so a teacher export (backbone only) is not enough. None: no distillation.
    """

    teacher: Path | None = None


@dataclass(frozen=True)
class PretrainConfig:
    """Everything a pretraining run reads; the resolved tree is saved as OUTPUT_DIR/config.yaml."""

    model: ModelConfig = field(default_factory=ModelConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    losses: LossesConfig = field(default_factory=LossesConfig)
    gram: GramConfig = field(default_factory=GramConfig)
    data: DataConfig = field(default_factory=DataConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)  # k-NN and pictures while training
    distill: DistillConfig = field(default_factory=DistillConfig)
    output_dir: Path = Path("runs/pretrain")

    def backbone_spec(self) -> dict[str, Any]:
        """Keyword arguments of ``build_vit`` for this backbone; ``build_vit(**spec)`` rebuilds it."""
        model = self.model
        spec: dict[str, Any] = {
            "name": model.arch,
            "patch_size": model.patch_size,
            # The learned position grid is sized for the global crops; other sizes are interpolated.
            "img_size": self.data.augment.global_crop_size,
            "n_registers": model.n_registers,
            "pos_embed": model.pos_embed,
            "drop_path_rate": model.drop_path_rate,
            "layerscale_init": model.layerscale_init,
        }
        if model.ffn is not None:
            spec["ffn"] = model.ffn
        return spec

    def validate(self) -> None:
        self._check_crop_sizes()
        losses, masking = self.losses, self.data.masking
        if losses.koleo_weight > 0 and self.data.batch_size < 2:
            raise ValueError(
                f"KoLeo needs at least 2 images per process, but data.batch_size is {self.data.batch_size}: "
                "raise data.batch_size or set losses.koleo_weight=0"
            )
        if losses.ibot_weight > 0 and masking.probability == 0 and self.distill.teacher is None:
            raise ValueError(
                "losses.ibot_weight > 0 but data.masking.probability is 0, so no patch is ever masked: "
                "set data.masking.probability (e.g. 0.5) or losses.ibot_weight=0"
            )
        if losses.ibot_weight == 0 and masking.probability > 0:
            raise ValueError(
                f"data.masking.probability is {masking.probability} but losses.ibot_weight is 0: masked "
                "crops would only hide content from the DINO loss; set data.masking.probability=0"
            )
        if losses.ibot_weight == 0 and self.heads.separate_ibot_head:
            raise ValueError(
                "heads.separate_ibot_head=true without iBOT (losses.ibot_weight=0); set it false"
            )
        self._check_gram()
        self._check_distill()
        # Build on the meta device (no memory): unknown architectures get the registry's message, and
        # impossible combinations (e.g. RoPE with a head dim not divisible by 4) fail now, not mid-run.
        with torch.device("meta"):
            build_vit(**self.backbone_spec())

    def _check_crop_sizes(self) -> None:
        augment, patch = self.data.augment, self.model.patch_size
        sizes = {"data.augment.global_crop_size": augment.global_crop_size}
        if augment.n_local_crops > 0:
            sizes["data.augment.local_crop_size"] = augment.local_crop_size
        if augment.gram_crop_factor > 0:
            sizes["the Gram crop size (global_crop_size × data.augment.gram_crop_factor)"] = round(
                augment.global_crop_size * augment.gram_crop_factor
            )
        for name, size in sizes.items():
            if size % patch:
                lower, upper = size - size % patch, size - size % patch + patch
                suggestion = f"{lower} or {upper}" if lower > 0 else str(upper)
                raise ValueError(
                    f"{name} {size} is not divisible by model.patch_size {patch}: use a multiple of "
                    f"{patch} such as {suggestion}"
                )

    def _check_distill(self) -> None:
        if self.distill.teacher is None:
            return
        if self.data.masking.probability > 0:
            raise ValueError(
                "a distilled student sees whole crops and learns the teacher's iBOT targets at every "
                f"patch: set data.masking.probability=0 (it is {self.data.masking.probability})"
            )
        if self.model.drop_path_rate > 0:
            raise ValueError(
                f"distillation trains without stochastic depth: set model.drop_path_rate=0 (it is "
                f"{self.model.drop_path_rate})"
            )

    def _check_gram(self) -> None:
        gram, factor = self.gram, self.data.augment.gram_crop_factor
        if factor > 0 and not gram.enabled:
            raise ValueError(
                f"data.augment.gram_crop_factor is {factor} (crops for a Gram teacher) but gram.enabled is "
                "false; set data.augment.gram_crop_factor=0 or gram.enabled=true"
            )
        if gram.enabled and gram.start_iteration >= self.schedule.total_iters:
            raise ValueError(
                f"gram.start_iteration {gram.start_iteration} is not before the end of training "
                f"({self.schedule.total_iters} iterations): lower it or set gram.enabled=false"
            )
