"""Vision Transformer backbone for DINO-family pretraining (v1/v2 learned positions, v3 RoPE).

Token order is [CLS, registers, patches]. Masked patches (iBOT) are replaced by a learned mask token
before any position information is added, so the student cannot read what a masked patch held.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict, overload

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import Block, PatchEmbed, RopeTables, RotaryEmbedding2d


class Features(TypedDict):
    """What one crop batch yields; heads and losses pick the parts they need."""

    cls: Tensor  # (B, D), after the final norm
    registers: Tensor  # (B, R, D), after the final norm
    patches: Tensor  # (B, P, D), after the final norm
    prenorm: Tensor  # (B, 1 + R + P, D), output of the last block
    grid: tuple[int, int]  # patch grid (h, w), P = h * w


class VisionTransformer(nn.Module):
    """ViT with optional registers, learned-interpolated or rotary positions, and iBOT mask tokens.

    Built for FSDP2: blocks live in ``self.blocks`` (one shard unit each) and ``init_weights()``
    initialises every parameter and buffer in place, so the model can be created on the meta device,
    materialised with ``to_empty()`` and then initialised.
    """

    def __init__(
        self,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        patch_size: int = 16,
        img_size: int = 224,
        in_chans: int = 3,
        ffn: str = "mlp",
        mlp_ratio: float = 4.0,
        n_registers: int = 0,
        layerscale_init: float | None = 1e-5,
        drop_path_rate: float = 0.0,
        pos_embed: str = "learned",
        rope_base: float = 100.0,
        rope_rescale_range: tuple[float, float] | None = (0.5, 2.0),
        qkv_bias: bool = True,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        if pos_embed not in ("learned", "rope"):
            raise ValueError(f"pos_embed must be 'learned' or 'rope', got {pos_embed!r}")
        if img_size % patch_size:
            raise ValueError(
                f"img_size {img_size} (the learned position grid's reference size) is not divisible "
                f"by the patch size {patch_size}"
            )
        if n_registers < 0:
            raise ValueError(f"n_registers must be >= 0, got {n_registers}")
        self.embed_dim = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.n_registers = n_registers
        self.num_prefix_tokens = 1 + n_registers

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.empty(1, 1, embed_dim))
        self.register_tokens = nn.Parameter(torch.empty(1, n_registers, embed_dim)) if n_registers else None
        self.mask_token = nn.Parameter(torch.empty(1, embed_dim))
        self.ref_grid = (img_size // patch_size, img_size // patch_size)
        if pos_embed == "learned":
            # One position for CLS plus the reference grid (DINOv2 layout); registers get none.
            num_positions = 1 + self.ref_grid[0] * self.ref_grid[1]
            self.pos_embed: nn.Parameter | None = nn.Parameter(torch.empty(1, num_positions, embed_dim))
            self.rope: RotaryEmbedding2d | None = None
        else:
            self.pos_embed = None
            self.rope = RotaryEmbedding2d(embed_dim // num_heads, rope_base, rope_rescale_range)

        # Stochastic depth grows linearly from 0 at the first block to drop_path_rate at the last.
        drop_rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                ffn=ffn,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                layerscale_init=layerscale_init,
                drop_path=rate,
                norm_eps=norm_eps,
            )
            for rate in drop_rates
        )
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.init_weights()

    def init_weights(self) -> None:
        """(Re)initialise every parameter and buffer in place (after ``to_empty()`` for meta models)."""
        self.patch_embed.reset_parameters()
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        if self.register_tokens is not None:
            nn.init.trunc_normal_(self.register_tokens, std=0.02)
        # Zero mask token: a masked patch starts as "no content" plus its position.
        nn.init.zeros_(self.mask_token)
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.rope is not None:
            self.rope.reset_parameters()
        for block in self.blocks:
            block.reset_parameters()
        self.norm.reset_parameters()

    def _interpolated_pos_embed(self, pos_embed: Tensor, height: int, width: int) -> Tensor:
        """Learned positions (1, 1 + h*w, D) for an h x w grid, bicubic from the reference grid."""
        if (height, width) == self.ref_grid:
            return pos_embed
        cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
        ref_h, ref_w = self.ref_grid
        patch_pos = patch_pos.reshape(1, ref_h, ref_w, -1).permute(0, 3, 1, 2)
        # Bicubic in fp32: half-precision interpolation visibly distorts the position grid.
        patch_pos = F.interpolate(
            patch_pos.float(), size=(height, width), mode="bicubic", align_corners=False
        )
        patch_pos = patch_pos.to(pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, height * width, -1)
        return torch.cat([cls_pos, patch_pos], dim=1)

    def _prepare_tokens(
        self, x: Tensor, masks: Tensor | None
    ) -> tuple[Tensor, RopeTables | None, tuple[int, int]]:
        """Images -> token sequence (B, 1 + R + P, D), RoPE tables (or None) and the patch grid."""
        if x.ndim != 4:
            raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(x.shape)}")
        patches, (height, width) = self.patch_embed(x)
        batch, num_patches, _ = patches.shape
        if masks is not None:
            if masks.shape != (batch, num_patches) or masks.dtype != torch.bool:
                raise ValueError(
                    f"masks must be a bool tensor of shape (B, P) = ({batch}, {num_patches}) for a "
                    f"{height}x{width} patch grid, got {masks.dtype} {tuple(masks.shape)}"
                )
            patches = torch.where(masks.unsqueeze(-1), self.mask_token.to(patches.dtype), patches)
        cls = self.cls_token.expand(batch, -1, -1)
        rope = None
        if self.pos_embed is not None:
            pos = self._interpolated_pos_embed(self.pos_embed, height, width)
            cls = cls + pos[:, :1]
            patches = patches + pos[:, 1:]
        elif self.rope is not None:
            rope = self.rope(height, width)
        tokens = [cls, patches]
        if self.register_tokens is not None:
            tokens.insert(1, self.register_tokens.expand(batch, -1, -1))
        return torch.cat(tokens, dim=1), rope, (height, width)

    def _forward_one(self, x: Tensor, masks: Tensor | None) -> Features:
        tokens, rope, grid = self._prepare_tokens(x, masks)
        for block in self.blocks:
            tokens = block(tokens, rope)
        normed = self.norm(tokens)
        return Features(
            cls=normed[:, 0],
            registers=normed[:, 1 : self.num_prefix_tokens],
            patches=normed[:, self.num_prefix_tokens :],
            prenorm=tokens,
            grid=grid,
        )

    @overload
    def forward_features(self, x: Tensor, masks: Tensor | None = None) -> Features: ...

    @overload
    def forward_features(
        self, x: Sequence[Tensor], masks: Sequence[Tensor | None] | None = None
    ) -> list[Features]: ...

    def forward_features(
        self, x: Tensor | Sequence[Tensor], masks: Tensor | Sequence[Tensor | None] | None = None
    ) -> Features | list[Features]:
        """Features of one image batch, or of each batch in a list (crops of different sizes).

        ``masks`` (B, P) bool, True = masked patch; for a list input, a list of masks-or-None.
        """
        if isinstance(x, Tensor):
            if masks is not None and not isinstance(masks, Tensor):
                raise ValueError("masks for a single image tensor must be a tensor or None")
            return self._forward_one(x, masks)
        if masks is None:
            masks = [None] * len(x)
        if isinstance(masks, Tensor) or len(masks) != len(x):
            raise ValueError(
                f"a list of {len(x)} image tensors needs a list of {len(x)} masks (tensor or None each)"
            )
        return [self._forward_one(images, crop_masks) for images, crop_masks in zip(x, masks)]

    def forward(self, x: Tensor) -> Tensor:
        """CLS embedding (B, D) after the final norm: the image representation."""
        return self._forward_one(x, None)["cls"]

    @torch.no_grad()
    def get_last_self_attention(self, x: Tensor) -> Tensor:
        """Attention weights (B, heads, N, N) of the last block, for attention-map pictures."""
        tokens, rope, _ = self._prepare_tokens(x, None)
        for block in self.blocks[:-1]:
            tokens = block(tokens, rope)
        _, weights = self.blocks[-1](tokens, rope, return_attention=True)
        return weights
