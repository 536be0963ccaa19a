"""The DST network: shapes, slice-preserving encoder, padding-mask invariance, TorchScript, sizes."""

from __future__ import annotations

import pytest
import torch

from bundles.dst_ica_calcification.scripts.network import DST, count_parameters, sinusoidal_positions


@pytest.fixture(scope="module")
def net() -> DST:
    torch.manual_seed(0)
    return DST.from_setting("small").eval()


def test_localization_outputs_one_distribution_per_landmark_over_slices(net):
    out = net(torch.rand(2, 1, 13, 64, 64))
    assert set(out) == {"landmark_logits", "presence_logits"}
    assert out["landmark_logits"].shape == (2, 6, 13)
    assert out["presence_logits"].shape == (2, 6)
    torch.testing.assert_close(out["landmark_logits"].softmax(-1).sum(-1), torch.ones(2, 6))


def test_classification_head_gives_class_logits_only():
    out = DST.from_setting("small", task="classification", num_classes=3).eval()(torch.rand(1, 1, 9, 64, 64))
    assert set(out) == {"class_logits"} and out["class_logits"].shape == (1, 3)


def test_encoder_keeps_one_token_per_slice_and_shrinks_in_plane_only(net):
    tokens = net.encoder(torch.rand(1, 1, 11, 64, 64), None)
    assert tokens.shape == (1, 11, net.encoder.out_channels)


def test_padded_volume_gives_the_same_distribution_over_its_real_slices(net):
    torch.manual_seed(1)
    real = torch.rand(1, 1, 10, 64, 64)
    alone = net(real)
    padded = torch.cat([real, torch.rand(1, 1, 7, 64, 64)], dim=2)  # garbage in the padding must not matter
    mask = torch.zeros(1, 17, dtype=torch.bool)
    mask[:, :10] = True
    both = net(padded, mask)
    p = both["landmark_logits"].softmax(-1)
    torch.testing.assert_close(p[..., :10], alone["landmark_logits"].softmax(-1), atol=1e-5, rtol=1e-4)
    assert torch.all(p[..., 10:] == 0)
    torch.testing.assert_close(p[..., :10].sum(-1), torch.ones(1, 6))
    torch.testing.assert_close(both["presence_logits"], alone["presence_logits"], atol=1e-5, rtol=1e-4)


def test_batch_of_two_depths_matches_each_volume_alone(net):
    torch.manual_seed(2)
    a, b = torch.rand(1, 1, 12, 64, 64), torch.rand(1, 1, 8, 64, 64)
    batch = torch.cat([a, torch.nn.functional.pad(b, (0, 0, 0, 0, 0, 4))])
    mask = torch.tensor([[True] * 12, [True] * 8 + [False] * 4])
    out = net(batch, mask)["landmark_logits"].softmax(-1)
    torch.testing.assert_close(out[1, :, :8], net(b)["landmark_logits"].softmax(-1)[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out[0], net(a)["landmark_logits"].softmax(-1)[0], atol=1e-5, rtol=1e-4)


def test_torchscript_round_trip_gives_the_same_outputs(net, tmp_path):
    x = torch.rand(1, 1, 6, 64, 64)
    scripted = torch.jit.script(net)
    scripted.save(str(tmp_path / "m.ts"))
    loaded = torch.jit.load(str(tmp_path / "m.ts"))
    torch.testing.assert_close(loaded(x)["landmark_logits"], net(x)["landmark_logits"])
    mask = torch.tensor([[True] * 4 + [False] * 2])
    assert torch.isinf(loaded(x, mask)["landmark_logits"][0, :, 4:]).all()


def test_small_setting_fits_cpu_budget_and_paper_setting_has_published_sizes():
    small = DST.from_setting("small")
    assert count_parameters(small) < 2_000_000
    assert count_parameters(small) * 4 < 25 * 2**20
    paper = DST.from_setting("paper")
    assert paper.embed_dim == 1024 and len(paper.blocks) == 8 and paper.blocks[0].num_heads == 4
    assert len(paper.encoder.stages) == 6 and paper.encoder.out_channels == 1024
    # public code ~137 M; ours lacks nn.MultiheadAttention's second in-projection (8 x 3 x 1024^2 weights)
    assert 100e6 < count_parameters(paper) < 110e6


def test_sinusoidal_positions_alternate_sine_and_cosine():
    codes = sinusoidal_positions(5, 8, torch.device("cpu"))
    torch.testing.assert_close(codes[:, 0], torch.sin(torch.arange(5.0)))
    torch.testing.assert_close(codes[:, 1], torch.cos(torch.arange(5.0)))
    torch.testing.assert_close(codes[0, 1::2], torch.ones(4))


def test_unknown_task_or_setting_is_rejected():
    with pytest.raises(ValueError, match="task"):
        DST(task="segmentation")
    with pytest.raises(ValueError, match="setting"):
        DST.from_setting("huge")


def test_benchmark_prints_parameters_flops_and_step_time(capsys):
    import benchmark_dst

    assert benchmark_dst.main(["--device", "cpu", "--settings", "small", "--runs", "1", "--depth", "8"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| small"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "1.30 M" and cells[2] == "8x64x64"
    assert float(cells[3]) > 0 and float(cells[4]) > 0
