"""Reusable vision-transformer layers.

Every module that owns parameters or buffers has ``reset_parameters()`` so a model built on the meta
device can be materialised with ``to_empty()`` and initialised in place (the FSDP2 recipe). Linear
weights are trunc-normal(0.02) with zero biases, as in the DINO family.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

RopeTables = tuple[Tensor, Tensor]
"""(sin, cos) of the rotary angles, each (num_patches, head_dim), float32."""


def init_linear(linear: nn.Linear, std: float = 0.02) -> None:
    """Trunc-normal weight, zero bias: the initialisation every DINO-family linear layer uses."""
    nn.init.trunc_normal_(linear.weight, std=std)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


class PatchEmbed(nn.Module):
    """Cut an image into non-overlapping patches and project each to ``embed_dim`` (one strided conv)."""

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def reset_parameters(self) -> None:
        # PyTorch's conv default (uniform in +-1/sqrt(fan_in)), which is what DINOv2 trains with.
        self.proj.reset_parameters()

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """(B, C, H, W) -> patch tokens (B, h*w, D) and the patch grid (h, w)."""
        height, width = x.shape[-2:]
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(
                f"image size {height}x{width} is not divisible by the patch size {p}: "
                f"crop or resize to a multiple of {p} (e.g. {height - height % p}x{width - width % p})"
            )
        x = self.proj(x)
        grid = (x.shape[-2], x.shape[-1])
        return x.flatten(2).transpose(1, 2), grid


def rotate_half(x: Tensor) -> Tensor:
    """[x1, x2] -> [-x2, x1] on the last dim: the pairing (i, i + d/2) shares one rotation angle."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: Tensor, rope: RopeTables) -> Tensor:
    """Rotate the trailing patch tokens of ``x`` (B, heads, N, head_dim); leading CLS/registers stay as is."""
    sin, cos = rope
    num_prefix = x.shape[-2] - sin.shape[0]
    prefix, patches = x[..., :num_prefix, :], x[..., num_prefix:, :]
    # The rotation runs in fp32: bf16 angles would blur positions at large grids.
    patches_f = patches.float()
    rotated = patches_f * cos + rotate_half(patches_f) * sin
    return torch.cat([prefix, rotated.to(x.dtype)], dim=-2)


class RotaryEmbedding2d(nn.Module):
    """Axial 2-D rotary position tables for patch tokens (DINOv3 style).

    Patch-centre coordinates are normalised to [-1, 1] per axis, so a crop's encoding depends on
    relative position within the crop, not on its pixel size. Half of each head's rotary pairs
    follow the row, half the column. In training mode the coordinates are multiplied by one factor
    drawn log-uniformly from ``rescale_range`` per call, which keeps the model from overfitting to
    one scale; eval mode never rescales.
    """

    def __init__(
        self,
        head_dim: int,
        base: float = 100.0,
        rescale_range: tuple[float, float] | None = (0.5, 2.0),
    ):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"2-D RoPE needs a head dim divisible by 4, got {head_dim}")
        if rescale_range is not None and not 0 < rescale_range[0] <= rescale_range[1]:
            raise ValueError(f"rescale_range must satisfy 0 < low <= high, got {rescale_range}")
        self.head_dim = head_dim
        self.base = base
        self.rescale_range = rescale_range
        # Derived from the config, so not saved in checkpoints; recomputed by reset_parameters().
        self.register_buffer("periods", torch.empty(head_dim // 4, dtype=torch.float32), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        exponents = torch.arange(self.head_dim // 4, dtype=torch.float32, device=self.periods.device)
        self.periods.copy_(self.base ** (2 * exponents / (self.head_dim // 2)))

    def forward(self, height: int, width: int) -> RopeTables:
        """(sin, cos) for a ``height`` x ``width`` patch grid, rows in raster order."""
        device = self.periods.device
        coords_h = (torch.arange(height, dtype=torch.float32, device=device) + 0.5) / height * 2 - 1
        coords_w = (torch.arange(width, dtype=torch.float32, device=device) + 0.5) / width * 2 - 1
        coords = torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"), dim=-1).flatten(0, 1)
        if self.training and self.rescale_range is not None:
            low, high = self.rescale_range
            log_scale = torch.empty((), device=device).uniform_(math.log(low), math.log(high))
            coords = coords * log_scale.exp()
        angles = 2 * math.pi * coords[:, :, None] / self.periods.float()  # (P, 2, head_dim/4)
        angles = angles.flatten(1).tile(2)  # (P, head_dim): the same angle for pair (i, i + head_dim/2)
        return angles.sin(), angles.cos()


class Attention(nn.Module):
    """Multi-head self-attention with optional RoPE.

    ``fused_attn`` (default True) routes through ``F.scaled_dot_product_attention``; set it False to
    use the explicit softmax path, e.g. to compare numerics. ``return_attention=True`` always takes the
    explicit path, since the fused kernel never materialises the attention weights.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by the number of heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused_attn = True
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def reset_parameters(self) -> None:
        init_linear(self.qkv)
        init_linear(self.proj)

    def forward(
        self, x: Tensor, rope: RopeTables | None = None, return_attention: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """(B, N, D) -> (B, N, D); with ``return_attention`` also the weights (B, heads, N, N)."""
        batch, num_tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, num_tokens, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        weights = None
        if self.fused_attn and not return_attention:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            logits = (q * self.scale) @ k.transpose(-2, -1)
            weights = logits.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
            out = weights @ v
        out = self.proj(out.transpose(1, 2).reshape(batch, num_tokens, dim))
        return (out, weights) if return_attention else out


class Mlp(nn.Module):
    """Two-layer GELU feed-forward network (ViT default, hidden = ratio * dim)."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0, bias: bool = True):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def reset_parameters(self) -> None:
        init_linear(self.fc1)
        init_linear(self.fc2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLUFFN(nn.Module):
    """Gated SiLU feed-forward network (DINOv2 giant, DINOv3).

    The hidden width is 2/3 of the MLP's so the parameter count matches the plain MLP with three
    matrices instead of two, rounded up to a multiple of ``align`` for efficient matmuls.
    """

    def __init__(self, dim: int, mlp_ratio: float = 4.0, bias: bool = True, align: int = 8):
        super().__init__()
        hidden = -(-int(dim * mlp_ratio * 2 / 3) // align) * align
        self.hidden_features = hidden
        self.w12 = nn.Linear(dim, 2 * hidden, bias=bias)  # gate and value in one matmul
        self.w3 = nn.Linear(hidden, dim, bias=bias)

    def reset_parameters(self) -> None:
        init_linear(self.w12)
        init_linear(self.w3)

    def forward(self, x: Tensor) -> Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


class LayerScale(nn.Module):
    """Per-channel residual-branch scale; a small init (1e-5) keeps deep ViTs stable early in training."""

    def __init__(self, dim: int, init_value: float = 1e-5):
        super().__init__()
        self.init_value = init_value
        self.gamma = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init_value)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch for whole samples, rescaling kept ones by 1/keep_prob.

    No parameters or buffers, hence no ``reset_parameters()``.
    """

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        keep_prob = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        keep = x.new_empty(shape).bernoulli_(keep_prob)
        return x * keep / keep_prob

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Block(nn.Module):
    """Pre-norm transformer block: x + DropPath(LayerScale(Attn(LN(x)))), then the same with the FFN."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn: str = "mlp",
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        layerscale_init: float | None = 1e-5,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.ls1 = LayerScale(dim, layerscale_init) if layerscale_init is not None else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        if ffn == "mlp":
            self.mlp: Mlp | SwiGLUFFN = Mlp(dim, mlp_ratio)
        elif ffn == "swiglu":
            self.mlp = SwiGLUFFN(dim, mlp_ratio)
        else:
            raise ValueError(f"ffn must be 'mlp' or 'swiglu', got {ffn!r}")
        self.ls2 = LayerScale(dim, layerscale_init) if layerscale_init is not None else nn.Identity()
        self.drop_path = DropPath(drop_path)

    def reset_parameters(self) -> None:
        self.norm1.reset_parameters()
        self.attn.reset_parameters()
        self.norm2.reset_parameters()
        self.mlp.reset_parameters()
        for scale in (self.ls1, self.ls2):
            if isinstance(scale, LayerScale):
                scale.reset_parameters()

    def forward(
        self, x: Tensor, rope: RopeTables | None = None, return_attention: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """(B, N, D) -> (B, N, D); with ``return_attention`` also this block's attention weights."""
        attn_out = self.attn(self.norm1(x), rope, return_attention=return_attention)
        weights = None
        if return_attention:
            attn_out, weights = attn_out
        x = x + self.drop_path(self.ls1(attn_out))
        x = x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))
        return (x, weights) if return_attention else x
