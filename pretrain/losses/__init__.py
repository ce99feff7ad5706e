"""Pretraining losses: DINO (CLS), iBOT (masked patches), KoLeo and Gram anchoring."""

from pretrain.losses.dino import DINOLoss
from pretrain.losses.gram import GramLoss
from pretrain.losses.ibot import IBOTPatchLoss
from pretrain.losses.koleo import KoLeoLoss
from pretrain.losses.targets import TargetMode, TeacherTargetLoss, sinkhorn_knopp

__all__ = [
    "DINOLoss",
    "GramLoss",
    "IBOTPatchLoss",
    "KoLeoLoss",
    "TargetMode",
    "TeacherTargetLoss",
    "sinkhorn_knopp",
]
