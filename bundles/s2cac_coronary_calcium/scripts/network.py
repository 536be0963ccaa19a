"""S2CAC network: a 3D ResNet/U-Net segmenter with a transformer "memory" path that predicts a volume-level score.

Re-implemented from the description of the published S2CAC model (Hao, Shah, Zhou, Med. Image Anal. 2025;
see ``shared/research/seeds_methods.md`` section 2.2). No code was copied.

Structure (sizes of the ``paper`` setting in brackets)::

    x (B, Cin, Z, Y, X)
    encoder  stem     Conv3d k(1,7,7) s(1,2,2) + BN + ReLU       -> f1 [64]  Z x Y/2  x X/2
             pool     MaxPool3d k3 s(1,2,2) + layer1 (stride 1)  -> f2 [64]  Z x Y/4  x X/4
             layer2   BasicBlocks, first stride (1,2,2)          -> f3 [128] Z x Y/8  x X/8
             layer3   BasicBlocks, first stride (1,2,2)          -> f4 [256] Z x Y/16 x X/16
             (ResNet-34 layer4 exists in the published code's encoder but is unused at encoder depth 4; it is
              not built here, so ``encoder_layers[3]`` is accepted but ignored)
    decoder  4 blocks [256,128,64,32]: nearest up-sampling x(1,2,2), concatenate skip (f3, f2, f1, none),
             2 x (Conv3d 3x3x3 + BN + ReLU); the last block is back at full resolution
    head     Conv3d 1x1x1 -> out_channels logits
    memory   N x D learnable tokens (init 0.5) [200 x 160]; after decoder block i a connection block
             (Conv3d 1x1x1 -> D, AdaptiveAvgPool3d(token_grid) [(5,8,5)], flatten, + positional embedding)
             gives CNN tokens; cross-attention (query = CNN tokens, key/value = memory, 4 heads) then a
             TransformerEncoderLayer (post-norm, ReLU, FFN F [2048], dropout [0.1]); its output is the new memory
    score    mean over the N memory tokens -> Linear(D, 1) -> one scalar per patch

One deliberate deviation, ``token_residual`` (default True, in both settings): the CNN tokens are added to the
cross-attention output before the transformer layer. In the published wiring (``token_residual=False``) the memory
starts as identical rows (all 0.5), so every cross-attention at stage 1 returns the same value for every query, and
the gradients of all memory rows are identical too (uniform attention over identical keys), so the rows never
diverge. The memory after stage 1 is then input-independent, and so is every later stage: in eval mode the score is
a constant; in train mode it depends on the input only because dropout in the first transformer layer makes the
memory rows differ at random. The residual makes the score a
function of the image from the first step. ``test_published_wiring_score_is_constant_in_eval`` shows the problem.

The transformer path reads the decoder features but does not feed back into the CNN; the two paths interact only
through shared gradients during training. ``forward`` runs the CNN only and returns the logits (what MONAI inferers
and TorchScript exports need); ``forward_with_score`` returns ``(logits, score)`` and is exported too.

Choices not fixed by the notes (ours): one cross-attention and one transformer layer per decoder block (4 each); the
positional embedding (N x D, shared by the 4 connection blocks) is initialised with N(0, 0.02^2); the cross-attention
has no dropout; encoder convolutions use Kaiming-normal (fan-out) init, decoder/connection convolutions
Kaiming-uniform (fan-in), heads Xavier-uniform.

Sizes and CPU timings (this project's shared 2-core CPU, torch 2.13, 2 threads, eval mode, no_grad; best of 1-3 runs
after a warm-up while other jobs ran, so indicative only)::

    setting  parameters   (1,1,24,256,256) forward / with score   (1,1,32,128,128) forward / with score
    paper    34,482,310   ~26-30 s / ~26-30 s                      -
    small       988,646   1.2 s / 1.4 s                            0.53 s / 0.64 s

``paper`` with our 5 output classes (99 parameters more than the paper's 2); of these, 24,384,192 are the encoder
(stem + ResNet-34 layers 1-3 in 3D), 6,499,200 the decoder, 3,534,592 the four token stages. One ``small`` training
step (forward_with_score + backward + SGD) on a (2,1,32,128,128) batch takes ~4.4 s here. TorchScript:
``torch.jit.script`` works (``forward`` and the exported ``forward_with_score``), save/load round trip is exact.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["S2CAC", "SETTINGS", "BasicBlock3d", "from_setting"]

SETTINGS: dict[str, dict[str, Any]] = {
    # The published configuration (S2CAC repository, resnet34_3D encoder, depth 4), with our 5 output classes
    # (background, LM, LAD, LCX, RCA); the paper used 2 (background, calcium).
    "paper": {
        "in_channels": 1,
        "out_channels": 5,
        "encoder_layers": (3, 4, 6, 3),
        "encoder_channels": (64, 64, 128, 256),
        "decoder_channels": (256, 128, 64, 32),
        "token_grid": (5, 8, 5),
        "token_dim": 160,
        "heads": 4,
        "ffn_dim": 2048,
        "dropout": 0.1,
        "token_residual": True,  # our fix; False is the published wiring (see the module docstring)
    },
    # A reduced model that trains on a 2-core CPU.
    "small": {
        "in_channels": 1,
        "out_channels": 5,
        "encoder_layers": (2, 2, 2, 2),
        "encoder_channels": (16, 16, 32, 64),
        "decoder_channels": (64, 32, 16, 16),
        "token_grid": (2, 4, 4),
        "token_dim": 32,
        "heads": 4,
        "ffn_dim": 64,
        "dropout": 0.1,
        "token_residual": True,
    },
}


def _conv3x3x3(cin: int, cout: int, inplane_stride: int = 1) -> nn.Conv3d:
    return nn.Conv3d(cin, cout, 3, stride=(1, inplane_stride, inplane_stride), padding=1, bias=False)


class BasicBlock3d(nn.Module):
    """ResNet BasicBlock in 3D; the stride acts in-plane only, (1, s, s)."""

    def __init__(self, cin: int, cout: int, inplane_stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3x3(cin, cout, inplane_stride)
        self.bn1 = nn.BatchNorm3d(cout)
        self.conv2 = _conv3x3x3(cout, cout)
        self.bn2 = nn.BatchNorm3d(cout)
        self.relu = nn.ReLU(inplace=True)
        if inplane_stride != 1 or cin != cout:
            self.downsample: nn.Module = nn.Sequential(
                nn.Conv3d(cin, cout, 1, stride=(1, inplane_stride, inplane_stride), bias=False),
                nn.BatchNorm3d(cout),
            )
        else:
            self.downsample = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.downsample(x))


def _stage(cin: int, cout: int, blocks: int, inplane_stride: int) -> nn.Sequential:
    layers = [BasicBlock3d(cin, cout, inplane_stride)]
    layers += [BasicBlock3d(cout, cout) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm3d(cout), nn.ReLU(inplace=True))


class DecoderBlock3d(nn.Module):
    """U-Net decoder block: nearest up-sampling by (1, 2, 2), optional skip concatenation, 2 x Conv-BN-ReLU."""

    def __init__(self, cin: int, skip: int, cout: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn_relu(cin + skip, cout)
        self.conv2 = _conv_bn_relu(cout, cout)

    def forward(self, x: Tensor, skip: Tensor | None) -> Tensor:
        x = F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest")
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


class TokenStage(nn.Module):
    """Connection block + cross-attention + transformer encoder layer for one decoder block.

    ``forward(feature, memory, pos)``: the decoder feature (B, C, Z, Y, X) becomes N tokens of D dims
    (1x1x1 conv, adaptive average pooling to ``token_grid``, flatten, + ``pos``); they attend to the memory (B, N, D)
    and the transformer layer's output is returned as the new memory (B, N, D). With ``residual`` the CNN tokens are
    added to the cross-attention output (the usual residual of a transformer decoder); without it (published wiring)
    the output depends on the feature only through the attention weights.
    """

    def __init__(
        self,
        cin: int,
        token_grid: tuple[int, int, int],
        dim: int,
        heads: int,
        ffn_dim: int,
        dropout: float,
        residual: bool = True,
    ) -> None:
        super().__init__()
        self.residual = residual
        self.proj = nn.Conv3d(cin, dim, 1)
        self.pool = nn.AdaptiveAvgPool3d(token_grid)
        self.cross_attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.transformer = nn.TransformerEncoderLayer(
            dim, heads, dim_feedforward=ffn_dim, dropout=dropout, batch_first=True
        )

    def tokens(self, feature: Tensor, pos: Tensor) -> Tensor:
        """CNN tokens (B, N, D) of one decoder feature map."""
        return self.pool(self.proj(feature)).flatten(2).transpose(1, 2) + pos

    def forward(self, feature: Tensor, memory: Tensor, pos: Tensor) -> Tensor:
        query = self.tokens(feature, pos)
        attended, _ = self.cross_attention(query, memory, memory, need_weights=False)
        if self.residual:
            attended = attended + query
        return self.transformer(attended)


class S2CAC(nn.Module):
    """Dual-path S2CAC network: CNN segmentation logits plus a volume-level score from a transformer memory path.

    Input (B, in_channels, Z, Y, X) with any Z >= 1 (no down-sampling along z) and Y, X divisible by 16.
    ``forward`` -> logits (B, out_channels, Z, Y, X); ``forward_with_score`` -> (logits, score (B,)).
    ``encode`` exposes the 4 encoder features (strides 2, 4, 8, 16 in-plane, 1 in z).
    Build the published or the CPU-sized model with ``S2CAC.from_setting("paper" | "small", **overrides)``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 5,
        encoder_layers: tuple[int, ...] = (3, 4, 6, 3),
        encoder_channels: tuple[int, int, int, int] = (64, 64, 128, 256),
        decoder_channels: tuple[int, int, int, int] = (256, 128, 64, 32),
        token_grid: tuple[int, int, int] = (5, 8, 5),
        token_dim: int = 160,
        heads: int = 4,
        ffn_dim: int = 2048,
        dropout: float = 0.1,
        token_residual: bool = True,
    ) -> None:
        super().__init__()
        if len(encoder_layers) not in (3, 4):
            raise ValueError(f"encoder_layers needs 3 or 4 entries (the 4th is unused), got {encoder_layers}")
        if len(encoder_channels) != 4 or len(decoder_channels) != 4:
            raise ValueError("encoder_channels and decoder_channels need 4 entries each")
        if len(token_grid) != 3:
            raise ValueError(f"token_grid needs 3 entries (z, y, x), got {token_grid}")
        if token_dim % heads != 0:
            raise ValueError(f"token_dim {token_dim} is not divisible by heads {heads}")
        c1, c2, c3, c4 = (int(c) for c in encoder_channels)
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.token_grid = tuple(int(t) for t in token_grid)
        self.num_tokens = math.prod(self.token_grid)
        self.token_dim = int(token_dim)

        # encoder (in-plane down-sampling only)
        self.stem = nn.Sequential(
            nn.Conv3d(in_channels, c1, (1, 7, 7), stride=(1, 2, 2), padding=(0, 3, 3), bias=False),
            nn.BatchNorm3d(c1),
            nn.ReLU(inplace=True),
        )
        self.pool = nn.MaxPool3d(3, stride=(1, 2, 2), padding=1)
        self.layer1 = _stage(c1, c2, encoder_layers[0], 1)
        self.layer2 = _stage(c2, c3, encoder_layers[1], 2)
        self.layer3 = _stage(c3, c4, encoder_layers[2], 2)

        # decoder: skips are f3, f2, f1 and none for the last block
        skips = (c3, c2, c1, 0)
        ins = (c4,) + tuple(decoder_channels[:-1])
        self.decoder = nn.ModuleList(
            [DecoderBlock3d(ins[i], skips[i], decoder_channels[i]) for i in range(len(decoder_channels))]
        )
        self.seg_head = nn.Conv3d(decoder_channels[-1], out_channels, 1)

        # transformer memory path
        self.memory = nn.Parameter(torch.full((self.num_tokens, self.token_dim), 0.5))
        self.pos_embedding = nn.Parameter(torch.zeros(self.num_tokens, self.token_dim))
        self.token_stages = nn.ModuleList(
            [
                TokenStage(c, self.token_grid, self.token_dim, heads, ffn_dim, dropout, token_residual)
                for c in decoder_channels
            ]
        )
        self.score_head = nn.Linear(self.token_dim, 1)
        self._init_weights()

    @classmethod
    def from_setting(cls, name: str, **overrides: Any) -> S2CAC:
        """Model of a named setting of ``SETTINGS`` ("paper" or "small"), any keyword overridden."""
        if name not in SETTINGS:
            raise KeyError(f"unknown S2CAC setting {name!r}; known: {sorted(SETTINGS)}")
        unknown = set(overrides) - set(SETTINGS[name])
        if unknown:
            raise TypeError(f"unknown S2CAC arguments {sorted(unknown)}")
        return cls(**{**SETTINGS[name], **overrides})

    def _init_weights(self) -> None:
        encoder = [self.stem, self.layer1, self.layer2, self.layer3]
        for part in encoder:
            for m in part.modules():
                if isinstance(m, nn.Conv3d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for part in [self.decoder, *[s.proj for s in self.token_stages]]:
            for m in part.modules():
                if isinstance(m, nn.Conv3d):
                    nn.init.kaiming_uniform_(m.weight, mode="fan_in", nonlinearity="relu")
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for head in (self.seg_head, self.score_head):
            nn.init.xavier_uniform_(head.weight)
            nn.init.zeros_(head.bias)
        nn.init.trunc_normal_(self.pos_embedding, std=0.02)

    def encode(self, x: Tensor) -> list[Tensor]:
        """Encoder features [f1, f2, f3, f4] at in-plane strides 2, 4, 8, 16 (z is never down-sampled)."""
        f1 = self.stem(x)
        f2 = self.layer1(self.pool(f1))
        f3 = self.layer2(f2)
        f4 = self.layer3(f3)
        return [f1, f2, f3, f4]

    def decode(self, features: list[Tensor]) -> list[Tensor]:
        """Outputs of the 4 decoder blocks, the last at full resolution."""
        x = features[-1]
        outputs: list[Tensor] = []
        n_skips = len(features) - 1
        for i, block in enumerate(self.decoder):
            skip: Tensor | None = None
            if i < n_skips:
                skip = features[n_skips - 1 - i]
            x = block(x, skip)
            outputs.append(x)
        return outputs

    def score_from_decoder(self, decoded: list[Tensor]) -> Tensor:
        """Volume-level score (B,) from the decoder block outputs through the memory path."""
        memory = self.memory.unsqueeze(0).expand(decoded[0].shape[0], -1, -1)
        for i, stage in enumerate(self.token_stages):
            memory = stage(decoded[i], memory, self.pos_embedding)
        return self.score_head(memory.mean(dim=1)).squeeze(-1)

    def forward(self, x: Tensor) -> Tensor:
        """Segmentation logits (B, out_channels, Z, Y, X)."""
        return self.seg_head(self.decode(self.encode(x))[-1])

    @torch.jit.export
    def forward_with_score(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Segmentation logits (B, out_channels, Z, Y, X) and the score (B,) of the same pass."""
        decoded = self.decode(self.encode(x))
        return self.seg_head(decoded[-1]), self.score_from_decoder(decoded)


def from_setting(name: str, **overrides: Any) -> S2CAC:
    """Alias of ``S2CAC.from_setting`` for MONAI configs (``"_target_": "scripts.network.from_setting"``)."""
    return S2CAC.from_setting(name, **overrides)
