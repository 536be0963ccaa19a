"""Depth-Sequence Transformer (DST, Hou et al., arXiv 2507.08214), reimplemented from the paper and our notes.

A CT volume (B, 1, D, H, W) is read as a sequence of D axial slices. A 3D CNN whose strides are (1, 2, 2)
shrinks every slice in-plane but never mixes the slice count, so slice d stays token d; each slice's feature
map is averaged to one token. A class token, sinusoidal positions and pre-norm transformer blocks follow; in
each block the query/key/value projections are mixed across neighbouring slices by a depthwise convolution
along depth. Heads: ``localization`` gives N landmark logits per slice (softmax over depth = one distribution
per landmark) and N presence logits from the class token; ``classification`` gives class logits from it.

Variable depth: volumes of one batch are padded at the end of the depth axis and ``mask`` (B, D), True on real
slices, keeps padding out of everything a real slice sees: CNN features of padded slices are zeroed before each
convolution that mixes depth (exactly what zero padding does at the end of an unpadded volume), attention
ignores padded keys, and landmark logits of padded slices are -inf. In eval mode a padded volume therefore gives
the same outputs on its real slices as the unpadded one (BatchNorm uses running statistics there).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

NUM_LANDMARKS = 6
TASKS = ("localization", "classification")

# Published sizes (public code's defaults as trained: embed 1024, 8 layers, 4 heads, 6 stages from 16 channels,
# 7x7x7 stem at stride 1, 128x128 in-plane) and a CPU-sized setting for demo weights (64x64 in-plane).
SETTINGS: dict[str, dict] = {
    "paper": {
        "stem_channels": 16,
        "stem_kernel": (7, 7, 7),
        "stem_stride": (1, 1, 1),
        "stage_channels": (32, 64, 128, 256, 512, 1024),
        "embed_dim": 1024,
        "num_heads": 4,
        "num_layers": 8,
        "mlp_ratio": 3.0,
    },
    "small": {
        "stem_channels": 16,
        "stem_kernel": (3, 5, 5),
        "stem_stride": (1, 2, 2),
        "stage_channels": (24, 48, 96, 160),
        "embed_dim": 128,
        "num_heads": 4,
        "num_layers": 4,
        "mlp_ratio": 3.0,
    },
}


def _depth_mask(mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """(B, 1, D, 1, 1) multiplier from a (B, D) slice mask; ones when there is no mask."""
    if mask is None:
        return torch.ones(x.shape[0], 1, x.shape[2], 1, 1, dtype=x.dtype, device=x.device)
    return mask[:, None, :, None, None].to(x.dtype)


class InPlaneResBlock(nn.Module):
    """Residual block that halves H and W and keeps D: 3x3x3 conv at stride (1, 2, 2), then a depthwise 3x3x3."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, stride=(1, 2, 2), padding=1, bias=False)
        self.norm1 = nn.BatchNorm3d(out_channels)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1, groups=out_channels, bias=False)
        self.norm2 = nn.BatchNorm3d(out_channels)
        self.shortcut = nn.Sequential(
            nn.Conv3d(in_channels, out_channels, 1, stride=(1, 2, 2), bias=False), nn.BatchNorm3d(out_channels)
        )

    def forward(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.norm1(self.conv1(x * m)))
        h = self.norm2(self.conv2(h * m))
        return F.relu(h + self.shortcut(x))


class SliceEncoder(nn.Module):
    """3D CNN that keeps depth: (B, 1, D, H, W) -> one token per slice (B, D, C)."""

    def __init__(
        self,
        stem_channels: int,
        stem_kernel: tuple[int, int, int],
        stem_stride: tuple[int, int, int],
        stage_channels: tuple[int, ...],
    ):
        super().__init__()
        if stem_stride[0] != 1:
            raise ValueError("the stem must keep depth (stride 1 along D)")
        self.stem = nn.Conv3d(
            1, stem_channels, stem_kernel, stride=stem_stride, padding=tuple(k // 2 for k in stem_kernel), bias=False
        )
        self.stem_norm = nn.BatchNorm3d(stem_channels)
        chans = (stem_channels, *stage_channels)
        self.stages = nn.ModuleList([InPlaneResBlock(a, b) for a, b in zip(chans[:-1], chans[1:], strict=True)])
        self.out_channels = chans[-1]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        m = _depth_mask(mask, x)
        h = F.leaky_relu(self.stem_norm(self.stem(x * m)), 0.1)
        for stage in self.stages:
            h = stage(h, m)
        return h.mean(dim=(3, 4)).transpose(1, 2)  # (B, C, D) -> (B, D, C)


def sinusoidal_positions(length: int, dim: int, device: torch.device) -> torch.Tensor:
    """Fixed sine/cosine position codes (length, dim): even channels sine, odd channels cosine."""
    pos = torch.arange(length, dtype=torch.float32, device=device)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=device) * (-math.log(10000.0) / dim))
    codes = torch.zeros(length, dim, device=device)
    codes[:, 0::2] = torch.sin(pos * freq)
    codes[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return codes


class DepthAttentionBlock(nn.Module):
    """Pre-norm transformer block; Q/K/V of the slice tokens are mixed across neighbouring slices (depthwise conv).

    Token 0 is the class token: it gets plain projections (it has no neighbours along depth).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, dropout: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.depth_mix = nn.Conv1d(3 * dim, 3 * dim, 3, padding=1, groups=3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(self.norm1(x))
        slices = qkv[:, 1:] * token_mask[:, 1:, None].to(qkv.dtype)  # padded slices act as zero padding
        slices = self.depth_mix(slices.transpose(1, 2)).transpose(1, 2)
        qkv = torch.cat([qkv[:, :1], slices], dim=1)
        q, k, v = qkv.reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=token_mask[:, None, None, :])
        x = x + self.dropout(self.proj(attn.transpose(1, 2).reshape(b, n, c)))
        return x + self.dropout(self.mlp(self.norm2(x)))


class DST(nn.Module):
    """Depth-Sequence Transformer. ``forward(x, mask)`` returns a dict of logits (see the module docstring).

    Args:
        task: "localization" (heads ``landmark_logits`` (B, N, D), ``presence_logits`` (B, N)) or
            "classification" (head ``class_logits`` (B, K)).
        num_landmarks: N landmark distributions. num_classes: K classes.
        Others: sizes, see :data:`SETTINGS`.
    """

    def __init__(
        self,
        task: str = "localization",
        num_landmarks: int = NUM_LANDMARKS,
        num_classes: int = 3,
        stem_channels: int = 16,
        stem_kernel: tuple[int, int, int] = (3, 5, 5),
        stem_stride: tuple[int, int, int] = (1, 2, 2),
        stage_channels: tuple[int, ...] = (24, 48, 96, 160),
        embed_dim: int = 128,
        num_heads: int = 4,
        num_layers: int = 4,
        mlp_ratio: float = 3.0,
        dropout: float = 0.0,
    ):
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, not {task!r}")
        self.localization = task == "localization"
        self.encoder = SliceEncoder(stem_channels, tuple(stem_kernel), tuple(stem_stride), tuple(stage_channels))
        self.token_proj = nn.Linear(self.encoder.out_channels, embed_dim)
        self.input_norm = nn.LayerNorm(embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.blocks = nn.ModuleList(
            [DepthAttentionBlock(embed_dim, num_heads, mlp_ratio, dropout) for _ in range(num_layers)]
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.embed_dim = embed_dim
        # Heads of the other task are Identity so that TorchScript compiles one forward for both tasks.
        self.landmark_head = nn.Linear(embed_dim, num_landmarks) if self.localization else nn.Identity()
        self.presence_head = nn.Linear(embed_dim, num_landmarks) if self.localization else nn.Identity()
        self.class_head = nn.Identity() if self.localization else nn.Linear(embed_dim, num_classes)

    @classmethod
    def from_setting(cls, name: str = "small", task: str = "localization", **overrides) -> DST:
        """The ``paper`` or ``small`` sizes; keyword arguments override any of them."""
        if name not in SETTINGS:
            raise ValueError(f"setting must be one of {sorted(SETTINGS)}, not {name!r}")
        return cls(task=task, **{**SETTINGS[name], **overrides})

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if x.dim() != 5 or x.shape[1] != 1:
            raise ValueError("expected input of shape (B, 1, D, H, W)")
        b, d = x.shape[0], x.shape[2]
        if mask is None:
            slice_mask = torch.ones(b, d, dtype=torch.bool, device=x.device)
        else:
            slice_mask = mask.to(torch.bool)
        tokens = self.token_proj(self.encoder(x, mask))
        tokens = torch.cat([self.cls_token.expand(b, -1, -1).to(tokens.dtype), tokens], dim=1)
        tokens = self.input_norm(tokens) + sinusoidal_positions(d + 1, self.embed_dim, x.device).to(tokens.dtype)
        token_mask = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=x.device), slice_mask], dim=1)
        for block in self.blocks:
            tokens = block(tokens, token_mask)
        tokens = self.norm(tokens)
        cls = tokens[:, 0]
        out: dict[str, torch.Tensor] = {}
        if self.localization:
            logits = self.landmark_head(tokens[:, 1:]).transpose(1, 2)  # (B, N, D)
            out["landmark_logits"] = logits.float().masked_fill(~slice_mask[:, None, :], float("-inf"))
            out["presence_logits"] = self.presence_head(cls).float()
        else:
            out["class_logits"] = self.class_head(cls).float()
        return out


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
