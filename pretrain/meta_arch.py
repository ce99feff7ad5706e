"""Student, EMA teacher and Gram teacher of DINO-family pretraining, and the loss terms of one step.

The trainer owns the loop (schedules, backward, clipping, optimizer); this module owns what the
networks do within a step: teacher targets from the two unmasked global crops, the student's DINO,
iBOT, KoLeo and Gram terms, the centers, the EMA update and the Gram-teacher snapshots.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from pretrain import distill, warm_start
from pretrain.config import PretrainConfig
from pretrain.export import TEACHER_BACKBONE_PREFIX
from pretrain.losses import DINOLoss, GramLoss, IBOTPatchLoss, KoLeoLoss
from pretrain.models import DINOHead, build_vit

__all__ = ["SSLMetaArch"]

N_GLOBAL_CROPS = 2


class SSLMetaArch(nn.Module):
    """Student (backbone, DINO head, optional separate iBOT head), its EMA teacher and the losses.

    ``forward`` returns the weighted loss terms of one batch by name; their sum is the loss to
    backpropagate. The loss modules are submodules, so their centers are part of ``state_dict()``
    together with every network. The teacher and the Gram teacher never train and stay in eval mode
    (no stochastic depth, no RoPE coordinate jitter), whatever ``train()`` is called with.

    Built with ``distill.teacher``, a frozen ``distill_teacher`` (another run's EMA teacher and heads,
    pretrain/distill.py) gives the targets; the student then sees unmasked crops and learns the iBOT
    targets at every patch, and ``teacher`` is an EMA of the student. ``checkpoint.init_from`` and
    ``gram.teacher_checkpoint`` start the networks from another run's checkpoint (pretrain/warm_start.py).
    """

    def __init__(self, config: PretrainConfig) -> None:
        super().__init__()
        losses, heads = config.losses, config.heads
        self.target_mode = losses.target_mode
        self.dino_weight = losses.dino_weight
        self.local_dino_weight = losses.local_dino_weight
        self.ibot_weight = losses.ibot_weight
        self.koleo_weight = losses.koleo_weight

        self.student = self._networks(config)
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.gram_teacher = copy.deepcopy(self.teacher["backbone"]) if config.gram.enabled else None
        self.distill_teacher: nn.ModuleDict | None = None
        if config.distill.teacher is not None:
            teacher_config, folder = distill.teacher_config(config)
            self.distill_teacher = self._networks(teacher_config)
            distill.load_teacher(self.distill_teacher, folder)

        self.dino_loss = DINOLoss(heads.out_dim, losses.student_temp, losses.center_momentum)
        self.ibot_loss = (
            IBOTPatchLoss(heads.out_dim, losses.student_temp, losses.center_momentum)
            if self.ibot_weight > 0
            else None
        )
        self.koleo_loss = KoLeoLoss() if self.koleo_weight > 0 else None
        self.gram_loss = GramLoss() if config.gram.enabled else None
        # Values of the last forward that are not losses (monitoring only): 'teacher_entropy', the
        # mean entropy of the DINO targets, whose approach to ln K signals a uniform collapse.
        self.diagnostics: dict[str, Tensor] = {}
        if config.checkpoint.init_from is not None:
            warm_start.init_networks(self, config.checkpoint.init_from)
        if self.gram_teacher is not None and config.gram.teacher_checkpoint is not None:
            key = "gram.teacher_checkpoint"
            folder = warm_start.resolve_checkpoint(config.gram.teacher_checkpoint, key)
            warm_start.load_part(self.gram_teacher, folder, TEACHER_BACKBONE_PREFIX, key)
        self.train()

    @classmethod
    def _networks(cls, config: PretrainConfig) -> nn.ModuleDict:
        """Backbone, DINO head and (separate) iBOT head of a run with this config."""
        heads = config.heads
        backbone = build_vit(**config.backbone_spec())
        if config.losses.ibot_weight == 0:
            # Without iBOT no patch is masked: the mask token never gets a gradient. Frozen, it is not
            # a parameter that DDP waits for (which would stall the gradient all-reduce).
            backbone.mask_token.requires_grad_(False)
        networks: dict[str, nn.Module] = {"backbone": backbone}
        if config.losses.dino_weight > 0 or not heads.separate_ibot_head:
            networks["dino_head"] = cls._head(config, backbone.embed_dim)
        if heads.separate_ibot_head:
            networks["ibot_head"] = cls._head(config, backbone.embed_dim)
        return nn.ModuleDict(networks)

    @staticmethod
    def _head(config: PretrainConfig, in_dim: int) -> DINOHead:
        heads = config.heads
        return DINOHead(
            in_dim,
            heads.out_dim,
            hidden_dim=heads.hidden_dim,
            bottleneck_dim=heads.bottleneck_dim,
            weight_norm_last_layer=heads.weight_norm_last_layer,
        )

    def train(self, mode: bool = True) -> SSLMetaArch:
        super().train(mode)
        self.teacher.eval()
        if self.gram_teacher is not None:
            self.gram_teacher.eval()
        if self.distill_teacher is not None:
            self.distill_teacher.eval()
        return self

    def trainable_modules(self) -> dict[str, nn.Module]:
        """The student's parts by name: one optimizer-group family and one clipping unit each."""
        return dict(self.student.items())

    @staticmethod
    def _ibot_head(networks: nn.ModuleDict) -> nn.Module:
        return networks["ibot_head"] if "ibot_head" in networks else networks["dino_head"]

    def forward(
        self, batch: dict[str, Tensor], teacher_temp: float, gram_weight: float = 0.0
    ) -> dict[str, Tensor]:
        """Weighted loss terms of a collated multi-crop batch (see pretrain.data.collate_multicrop).

        ``gram_weight`` is this iteration's scheduled Gram weight; at 0 the term is reported as 0
        without running the Gram teacher (before the Gram stage the teacher is not yet taken).
        """
        global_crops, local_crops = batch["global_crops"], batch["local_crops"]
        use_ibot = self.ibot_loss is not None
        # The patches the iBOT loss reads: the masked ones, or all of them when distilling (the
        # student then sees whole crops).
        masks = student_masks = batch["masks"] if use_ibot else None
        if use_ibot and self.distill_teacher is not None:
            masks, student_masks = torch.ones_like(batch["masks"]), None
        dino_targets, ibot_targets = self._teacher_targets(global_crops, masks, teacher_temp)

        crops = [global_crops] + ([local_crops] if local_crops.numel() else [])
        features = self.student["backbone"].forward_features(
            crops, [student_masks] + [None] * (len(crops) - 1)
        )
        global_features = features[0]
        terms: dict[str, Tensor] = {}
        if self.dino_weight > 0:
            cls_tokens = torch.cat([crop_features["cls"] for crop_features in features])
            batch_size = global_crops.shape[0] // N_GLOBAL_CROPS
            student_logits = list(self.student["dino_head"](cls_tokens).split(batch_size))
            terms["dino"] = self.dino_weight * self._dino_term(student_logits, dino_targets)
        if use_ibot:
            masked_patches = global_features["patches"][masks]
            student_masked_logits = self._ibot_head(self.student)(masked_patches)
            terms["ibot"] = self.ibot_weight * self.ibot_loss(student_masked_logits, ibot_targets, masks)
        if self.koleo_loss is not None:
            per_crop = [self.koleo_loss(cls) for cls in global_features["cls"].chunk(N_GLOBAL_CROPS)]
            terms["koleo"] = self.koleo_weight * torch.stack(per_crop).sum()
        if self.gram_loss is not None:
            terms["gram"] = (
                gram_weight * self._gram_term(global_features, batch.get("gram_crops", global_crops))
                if gram_weight > 0
                else global_crops.new_zeros(())
            )
        return terms

    @torch.no_grad()
    def _teacher_targets(
        self, global_crops: Tensor, masks: Tensor | None, teacher_temp: float
    ) -> tuple[list[Tensor], Tensor | None]:
        """DINO targets per global crop (crop-major) and iBOT targets at the masked patches (row-major),
        from the EMA teacher or, when distilling, the frozen teacher.

        The centers are updated after the targets are formed, so this step's targets use the
        center of the previous steps, as in the recipe.
        """
        teacher = self.teacher if self.distill_teacher is None else self.distill_teacher
        features = teacher["backbone"].forward_features(global_crops)
        dino_targets: list[Tensor] = []
        if self.dino_weight > 0:
            cls_logits = teacher["dino_head"](features["cls"])
            probs = self.dino_loss.teacher_probs(cls_logits, teacher_temp, self.target_mode)
            dino_targets = list(probs.chunk(N_GLOBAL_CROPS))
            self.diagnostics["teacher_entropy"] = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()
            if self.target_mode == "centering":
                self.dino_loss.update_center(cls_logits)
        ibot_targets = None
        if self.ibot_loss is not None and masks is not None:
            patch_logits = self._ibot_head(teacher)(features["patches"][masks])
            ibot_targets = self.ibot_loss.teacher_probs(patch_logits, teacher_temp, self.target_mode)
            if self.target_mode == "centering":
                self.ibot_loss.update_center(patch_logits)
        return dino_targets, ibot_targets

    def _dino_term(self, student_logits: list[Tensor], targets: list[Tensor]) -> Tensor:
        """DINO loss with the local-crop pairs weighted by ``local_dino_weight`` against the global pairs.

        DINOLoss averages over all pairs; the global-only loss separates the two sums, so that
        (n_g·L_global + w·n_l·L_local) / (n_g + n_l) needs no second cross-entropy implementation.
        """
        all_pairs = self.dino_loss(student_logits, targets)
        n_teacher, n_local = len(targets), len(student_logits) - len(targets)
        if self.local_dino_weight == 1.0 or n_local == 0:
            return all_pairs
        n_global_pairs, n_local_pairs = n_teacher * (n_teacher - 1), n_teacher * n_local
        n_pairs = n_global_pairs + n_local_pairs
        global_sum = self.dino_loss(student_logits[:n_teacher], targets) * n_global_pairs
        local_sum = all_pairs * n_pairs - global_sum
        return (global_sum + self.local_dino_weight * local_sum) / n_pairs

    def _gram_term(self, student_features: dict, gram_crops: Tensor) -> Tensor:
        """Gram loss of the student's global patch tokens against the Gram teacher's on the same crops."""
        with torch.no_grad():
            teacher_features = self.gram_teacher.forward_features(gram_crops)
        return self.gram_loss(
            student_features["patches"],
            teacher_features["patches"],
            student_features["grid"],
            teacher_features["grid"],
        )

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA after each optimizer step: θt ← m·θt + (1 − m)·θs, over backbone and heads."""
        teacher_params = list(self.teacher.parameters())
        student_params = list(self.student.parameters())
        torch._foreach_mul_(teacher_params, momentum)
        torch._foreach_add_(teacher_params, student_params, alpha=1.0 - momentum)

    @torch.no_grad()
    def refresh_gram_teacher(self) -> None:
        """Take (or retake) the Gram teacher as a frozen copy of the EMA teacher's backbone."""
        if self.gram_teacher is None:
            raise RuntimeError("refresh_gram_teacher needs gram.enabled=true")
        self.gram_teacher.load_state_dict(self.teacher["backbone"].state_dict())

    def freeze_last_layers(self) -> None:
        """Drop the gradients of the heads' last layers, so that AdamW neither steps nor updates their
        moments while the schedule keeps them frozen (their lr is also 0 then)."""
        for name, module in self.student.items():
            if name != "backbone":
                for param in module.last_layer.parameters():
                    param.grad = None
