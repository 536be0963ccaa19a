"""The S2CAC network: shapes, in-plane-only down-sampling, sizes, the score path and TorchScript export."""

from __future__ import annotations

import io
import math

import pytest
import torch

from bundles.s2cac_coronary_calcium.scripts.losses import score_regression_loss
from bundles.s2cac_coronary_calcium.scripts.network import S2CAC, SETTINGS, from_setting


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def small() -> S2CAC:
    torch.manual_seed(0)
    return S2CAC.from_setting("small").eval()


@pytest.fixture(scope="module")
def paper() -> S2CAC:
    torch.manual_seed(0)
    return S2CAC.from_setting("paper").eval()


@pytest.mark.parametrize("z", [1, 5, 7])
def test_small_shapes_any_z_batch_2(small, z):
    x = torch.randn(2, 1, z, 32, 48)
    with torch.no_grad():
        logits = small(x)
        logits2, score = small.forward_with_score(x)
    assert logits.shape == (2, 5, z, 32, 48)
    assert score.shape == (2,)
    torch.testing.assert_close(logits, logits2)


def test_paper_shapes_odd_z(paper):
    x = torch.randn(2, 1, 5, 32, 32)
    with torch.no_grad():
        logits, score = paper.forward_with_score(x)
    assert logits.shape == (2, 5, 5, 32, 32)
    assert score.shape == (2,)


@pytest.mark.parametrize("name", ["small", "paper"])
def test_encoder_downsamples_in_plane_only(small, paper, name):
    model = small if name == "small" else paper
    channels = SETTINGS[name]["encoder_channels"]
    with torch.no_grad():
        features = model.encode(torch.randn(1, 1, 7, 64, 32))
    assert [tuple(f.shape) for f in features] == [
        (1, channels[0], 7, 32, 16),
        (1, channels[1], 7, 16, 8),
        (1, channels[2], 7, 8, 4),
        (1, channels[3], 7, 4, 2),
    ]
    with torch.no_grad():
        decoded = model.decode(features)
    assert [tuple(d.shape) for d in decoded] == [
        (1, c, 7, 64 // s, 32 // s) for c, s in zip(SETTINGS[name]["decoder_channels"], (8, 4, 2, 1), strict=True)
    ]


def _resnet_encoder_params(cin: int, channels: tuple[int, ...], layers: tuple[int, ...]) -> int:
    """Analytic parameter count: stem + layers 1-3 of a 3D ResNet with BasicBlocks (conv weights + BN)."""
    c1 = channels[0]
    total = cin * c1 * 49 + 2 * c1
    for cin_stage, cout, blocks, stride in zip(channels[:3], channels[1:], layers[:3], (1, 2, 2), strict=True):
        for b in range(blocks):
            cin_block = cin_stage if b == 0 else cout
            total += cin_block * cout * 27 + cout * cout * 27 + 4 * cout
            if b == 0 and (stride != 1 or cin_block != cout):
                total += cin_block * cout + 2 * cout
    return total


def test_paper_parameter_count(paper):
    encoder = sum(n_params(m) for m in (paper.stem, paper.layer1, paper.layer2, paper.layer3))
    # ResNet-34 layers 1-3 in 3D, the 3x3 kernels became 3x3x3; layer4 is not built (encoder depth 4)
    assert encoder == _resnet_encoder_params(1, (64, 64, 128, 256), (3, 4, 6, 3)) == 24_384_192
    assert n_params(paper) == 34_482_310
    assert n_params(S2CAC.from_setting("paper", out_channels=2)) == 34_482_310 - 3 * 33


def test_small_parameter_count(small):
    assert 0.5e6 < n_params(small) < 1.5e6


def test_token_count(small, paper):
    for model, name in ((small, "small"), (paper, "paper")):
        grid = SETTINGS[name]["token_grid"]
        dim = SETTINGS[name]["token_dim"]
        assert model.num_tokens == math.prod(grid)
        assert model.memory.shape == (math.prod(grid), dim)
        assert model.pos_embedding.shape == (math.prod(grid), dim)
        torch.testing.assert_close(model.memory, torch.full_like(model.memory, 0.5))
    assert paper.num_tokens == 200
    with torch.no_grad():
        decoded = small.decode(small.encode(torch.randn(2, 1, 3, 32, 32)))
        tokens = small.token_stages[0].tokens(decoded[0], small.pos_embedding)
    assert tokens.shape == (2, 32, 32)


def test_score_depends_on_input(small):
    torch.manual_seed(1)
    with torch.no_grad():
        _, score = small.forward_with_score(torch.randn(2, 1, 5, 32, 32))
        _, score_again = small.forward_with_score(torch.randn(1, 1, 5, 32, 32) * 3.0)
    assert score.shape == (2,) and score.dtype == torch.float32
    assert abs(float(score[0] - score[1])) > 1e-4
    assert abs(float(score[0] - score_again[0])) > 1e-4


def test_published_wiring_score_is_constant_in_eval():
    """Why ``token_residual`` exists: identical memory rows make the published wiring's eval score input-blind."""
    torch.manual_seed(0)
    model = S2CAC.from_setting("small", token_residual=False).eval()
    with torch.no_grad():
        _, score = model.forward_with_score(torch.randn(2, 1, 5, 32, 32))
    assert float((score[0] - score[1]).abs()) < 1e-5


@pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning")
def test_torchscript_round_trip(small):
    """torch.jit.script/save/load still work in torch 2.13 (deprecated in favour of torch.export)."""
    scripted = torch.jit.script(small)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    x = torch.randn(2, 1, 5, 32, 32)
    with torch.no_grad():
        expected_logits, expected_score = small.forward_with_score(x)
        torch.testing.assert_close(loaded(x), expected_logits, rtol=0, atol=0)
        logits, score = loaded.forward_with_score(x)
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=0)
    torch.testing.assert_close(score, expected_score, rtol=1e-6, atol=1e-6)


def test_score_loss_reaches_memory_tokens_and_encoder():
    torch.manual_seed(0)
    model = from_setting("small", encoder_layers=(1, 1, 1, 1)).train()
    _, score = model.forward_with_score(torch.randn(2, 1, 3, 32, 32))
    score_regression_loss(score, torch.tensor([5.0, 0.0]), torch.tensor([1.0, 0.001])).backward()
    assert model.memory.grad is not None and float(model.memory.grad.abs().sum()) > 0
    assert float(model.pos_embedding.grad.abs().sum()) > 0
    assert float(model.stem[0].weight.grad.abs().sum()) > 0
    assert model.seg_head.weight.grad is None  # the score does not use the segmentation head


def test_bad_settings_raise():
    with pytest.raises(KeyError):
        S2CAC.from_setting("huge")
    with pytest.raises(TypeError):
        S2CAC.from_setting("small", depth=3)
    with pytest.raises(ValueError):
        S2CAC(token_dim=30, heads=4)
