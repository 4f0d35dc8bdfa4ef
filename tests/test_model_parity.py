"""zdepth's DepthAnythingV2 against transformers' DepthAnythingForDepthEstimation.

transformers is an independent implementation of the same network (separate q/k/v linears,
its own neck/fusion code, its own backbone-index convention), so a key-mapping mistake (a
swapped refinenet, a mis-split qkv, an off-by-one intermediate layer) shows up as an output
mismatch here. Weights are random but chosen so the output has a real spread; a constant
output would make any comparison meaningless.

The HF reference runs with eager attention (explicit softmax maths), ours with SDPA.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from zdepth.model import (  # noqa: E402
    ENCODER_CONFIGS,
    DepthAnythingV2,
    hf_config,
    hf_to_official,
    interpolate_pos_embed,
    official_to_hf,
    random_init_,
    save_hf,
)

MAX_DEPTH = 20
REL_TOL = 1e-4  # max |ours - HF| relative to the output range, fp32


@pytest.fixture(autouse=True, scope="module")
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    transformers.utils.logging.set_verbosity_error()
    yield
    torch.set_num_threads(old)


def natural_image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """ImageNet-normalised, photo-like image: smooth gradients, a few blobs, a little noise."""
    g = torch.Generator().manual_seed(seed)
    ys = torch.linspace(-1, 1, height).view(height, 1)
    xs = torch.linspace(-1, 1, width).view(1, width)
    img = torch.zeros(3, height, width)
    for c in range(3):
        img[c] = 0.45 + 0.25 * ys + 0.05 * c * xs
        for _ in range(3):
            cy, cx = (torch.rand(2, generator=g) * 2 - 1).tolist()
            r = 0.1 + 0.5 * torch.rand(1, generator=g).item()
            img[c] += 0.3 * torch.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * r * r))
    img += 0.02 * torch.randn(img.shape, generator=g)
    img = img.clamp(0, 1)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    return ((img - mean) / std).unsqueeze(0)


def assert_non_degenerate(depth: torch.Tensor, metric: bool, scale: float) -> None:
    """A comparison is only meaningful if the output actually varies and is not clipped."""
    mean, std = depth.mean().item(), depth.std().item()
    assert std / abs(mean) > 0.1, f"output too flat: mean {mean}, std {std}"
    if metric:
        saturated = ((depth < 1e-3 * scale) | (depth > (1 - 1e-3) * scale)).float().mean().item()
    else:
        saturated = (depth == 0).float().mean().item()
    assert saturated < 0.05, f"{saturated:.1%} of the output is saturated"


def assert_close_to(ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert ours.shape == ref.shape
    span = (ref.max() - ref.min()).item()
    err = (ours - ref).abs().max().item()
    assert err <= REL_TOL * span, f"max abs diff {err:.3g} > {REL_TOL} x range {span:.3g}"
    return err / span


def build_pair(encoder: str, metric: bool, folder) -> tuple[DepthAnythingV2, torch.nn.Module]:
    """A random HF model (loaded by transformers itself from a folder) and ours mapped from it.

    The folder is written by our save_hf (official_to_hf + config.json); transformers'
    from_pretrained then applies its own hub-to-module renaming, and we convert its in-memory
    state dict (q_proj/k_proj/v_proj/o_proj names) back through hf_to_official. Both naming
    schemes and both directions of the mapping are therefore exercised.
    """
    source = random_init_(DepthAnythingV2(encoder, metric), seed=1 if metric else 0)
    save_hf(source, folder, max_depth=MAX_DEPTH)
    del source
    hf, info = transformers.DepthAnythingForDepthEstimation.from_pretrained(str(folder), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    hf.config.backbone_config._attn_implementation = "eager"
    assert hf.backbone.config._attn_implementation == "eager"
    hf.eval()

    ours = DepthAnythingV2(encoder, metric).eval()
    ours.load_state_dict(hf_to_official(hf.state_dict(), ENCODER_CONFIGS[encoder]["depth"]), strict=True)
    return ours, hf


def run_both(ours, hf, x: torch.Tensor, metric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        mine = ours(x)
        ref = hf(pixel_values=x).predicted_depth
    # Ours returns the sigmoid; the engine multiplies by the per-request max_depth.
    return (mine * MAX_DEPTH if metric else mine), ref


_PAIRS: dict = {}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    def get(encoder: str, metric: bool):
        key = (encoder, metric)
        if key not in _PAIRS:
            # Keep the small vits pairs for reuse; drop bigger ones (vitb is 400 MB per copy).
            for old in [k for k in _PAIRS if k[0] != "vits"]:
                del _PAIRS[old]
            _PAIRS[key] = build_pair(encoder, metric, tmp_path_factory.mktemp(f"{encoder}-{metric}"))
        return _PAIRS[key]

    yield get
    _PAIRS.clear()


@pytest.mark.parametrize(
    "encoder,metric",
    [("vits", False), ("vits", True), ("vitb", False), ("vitb", True)],
    ids=["vits-relative", "vits-metric", "vitb-relative", "vitb-metric"],
)
def test_parity_518(pair, encoder, metric):
    ours, hf = pair(encoder, metric)
    x = natural_image(518, 518, seed=3)
    mine, ref = run_both(ours, hf, x, metric)
    assert ref.shape == (1, 518, 518)
    assert_non_degenerate(ref, metric, MAX_DEPTH)
    assert_close_to(mine, ref)
    if metric:
        assert 0 < mine.min() and mine.max() < MAX_DEPTH


def test_batch_matches_single(pair):
    ours, _ = pair("vits", False)
    x = torch.cat([natural_image(518, 518, seed=s) for s in (4, 5)])
    with torch.no_grad():
        both = ours(x)
        one = ours(x[1:])
    assert both.shape == (2, 518, 518)
    assert (both[0] - both[1]).abs().max() > 1e-2  # the output depends on the input
    torch.testing.assert_close(both[1:], one, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Non-square inputs and the positional-embedding rule
# ----------------------------------------------------------------------------------------------


def official_rule(pos_embed: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    """Independent statement of the official DINOv2/Depth Anything V2 resampling."""
    if gh == gw == 37:
        return pos_embed
    cls_row, grid = pos_embed[:, :1], pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    grid = grid.reshape(1, 37, 37, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(
        grid.float(), scale_factor=((gh + 0.1) / 37, (gw + 0.1) / 37), mode="bicubic", align_corners=False
    )
    return torch.cat((cls_row, grid.permute(0, 2, 3, 1).reshape(1, gh * gw, dim)), dim=1)


def size_rule(pos_embed: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    """What current transformers (and upstream DINOv2 after PR #378) do instead."""
    cls_row, grid = pos_embed[:, :1], pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    grid = grid.reshape(1, 37, 37, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
    return torch.cat((cls_row, grid.permute(0, 2, 3, 1).reshape(1, gh * gw, dim)), dim=1)


@pytest.mark.parametrize("gh,gw", [(37, 49), (28, 37), (37, 66), (16, 16), (38, 38)])
def test_pos_embed_uses_official_scale_factor(gh, gw):
    """Non-square (and any non-518x518) inputs are compared against the rule, not against HF.

    Fact sheet §5.3 item 4: current transformers' Dinov2 resamples the 37x37 table with
    ``size=(H/14, W/14)`` and no offset, while the official code uses
    ``scale_factor=((H/14 + 0.1)/37, (W/14 + 0.1)/37)``. With a scale factor PyTorch maps source
    coordinates through 1/scale, so even an axis that stays at 37 cells is resampled, and every
    non-518x518 input gets different embeddings (and different depth) from HF. Matching the
    official checkpoints' behaviour means matching the official rule; this test fails if the
    implementation is switched to ``size=``.
    """
    g = torch.Generator().manual_seed(0)
    pos = torch.randn(1, 1 + 37 * 37, 32, generator=g)
    mine = interpolate_pos_embed(pos, gh, gw)
    torch.testing.assert_close(mine, official_rule(pos, gh, gw), rtol=0, atol=0)
    assert (mine - size_rule(pos, gh, gw)).abs().max() > 1e-2


def test_pos_embed_skipped_only_at_37x37():
    pos = torch.randn(1, 1 + 37 * 37, 16, generator=torch.Generator().manual_seed(1))
    assert interpolate_pos_embed(pos, 37, 37) is pos  # 518x518: the table is used as stored
    # The same grid pushed through the scale_factor call would NOT be the identity, so the
    # shortcut is load-bearing, and a 37-cell axis of a non-square input is resampled.
    forced = F.interpolate(
        pos[:, 1:].reshape(1, 37, 37, 16).permute(0, 3, 1, 2), scale_factor=(37.1 / 37, 37.1 / 37), mode="bicubic"
    )
    assert (forced.permute(0, 2, 3, 1).reshape(1, -1, 16) - pos[:, 1:]).abs().max() > 1e-3
    rows_37 = interpolate_pos_embed(pos, 37, 49)[:, 1:].reshape(37, 49, 16)
    assert rows_37.shape[0] == 37


def test_pos_embed_keeps_dtype_and_interpolates_in_fp32():
    pos = torch.randn(1, 1 + 37 * 37, 8, generator=torch.Generator().manual_seed(2))
    half = interpolate_pos_embed(pos.to(torch.bfloat16), 37, 49)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half, official_rule(pos.to(torch.bfloat16).float(), 37, 49).to(torch.bfloat16))


@pytest.mark.parametrize("height,width", [(518, 686), (364, 266)])
def test_parity_non_square_with_official_rule_in_hf(pair, monkeypatch, height, width):
    """Full-model parity off 518x518, with HF's pos-embed call replaced by the official rule.

    Unpatched, HF differs from us (and from the official model) by far more than rounding;
    with its embedding resampling patched to ``official_rule`` everything else agrees.
    """
    ours, hf = pair("vits", False)
    x = natural_image(height, width, seed=6)
    mine, ref_size_rule = run_both(ours, hf, x, False)
    span = (ref_size_rule.max() - ref_size_rule.min()).item()
    assert (mine - ref_size_rule).abs().max().item() > 100 * REL_TOL * span

    emb = hf.backbone.embeddings
    monkeypatch.setattr(
        emb, "interpolate_pos_encoding", lambda e, h, w: official_rule(emb.position_embeddings, h // 14, w // 14)
    )
    mine, ref = run_both(ours, hf, x, False)
    assert ref.shape == (1, height, width)
    assert_non_degenerate(ref, False, 1.0)
    assert_close_to(mine, ref)


# ----------------------------------------------------------------------------------------------
# Mapping details that the fact sheet spells out, and the SwiGLU (vitg) path on a tiny model
# ----------------------------------------------------------------------------------------------


def test_key_mapping_examples():
    with torch.device("meta"):
        sd = DepthAnythingV2("vits").state_dict()
    hf = official_to_hf(sd)
    assert "backbone.encoder.layer.0.attention.attention.query.weight" in hf
    assert hf["backbone.encoder.layer.0.attention.attention.key.weight"].shape == (384, 384)
    assert "backbone.encoder.layer.3.layer_scale2.lambda1" in hf
    assert "neck.fusion_stage.layers.3.projection.weight" in hf  # refinenet1.out_conv
    assert "neck.fusion_stage.layers.0.residual_layer1.convolution1.weight" in hf  # refinenet4 (unused unit)
    assert "neck.convs.3.weight" in hf and "neck.convs.3.bias" not in hf  # layer4_rn has no bias
    assert (
        "neck.reassemble_stage.layers.3.resize.weight" in hf
        and "neck.reassemble_stage.layers.2.resize.weight" not in hf
    )
    assert {"head.conv1.weight", "head.conv2.weight", "head.conv3.weight"} <= set(hf)
    assert len(hf) == 239 + 2 * 12 * 2  # qkv weight+bias split into three per block
    back = hf_to_official(hf, 12)
    assert list(back) and set(back) == set(sd)
    assert all(back[k].shape == sd[k].shape for k in sd)


def test_qkv_split_order():
    d = 384
    sd = {
        "pretrained.blocks.0.attn.qkv.weight": torch.arange(3 * d, dtype=torch.float32).view(3 * d, 1).expand(3 * d, d)
    }
    hf = official_to_hf(sd)
    assert hf["backbone.encoder.layer.0.attention.attention.query.weight"][0, 0] == 0
    assert hf["backbone.encoder.layer.0.attention.attention.key.weight"][0, 0] == d
    assert hf["backbone.encoder.layer.0.attention.attention.value.weight"][0, 0] == 2 * d
    back = hf_to_official(hf)
    torch.testing.assert_close(back["pretrained.blocks.0.attn.qkv.weight"], sd["pretrained.blocks.0.attn.qkv.weight"])


TINY_SWIGLU = {
    "embed_dim": 48,
    "depth": 4,
    "num_heads": 2,
    "features": 16,
    "out_channels": [8, 16, 32, 48],
    "layer_idx": [0, 1, 2, 3],
    "ffn": "swiglu",
}


def test_swiglu_mapping_tiny_vitg(monkeypatch, tmp_path):
    """vitg's SwiGLU mapping (w12 = [gate; up]) checked against transformers on a tiny config.

    The real vitg is 1.3B parameters; shrinking the table entry keeps every code path (w12/w3,
    weights_in/weights_out on disk, gate_proj/up_proj/down_proj in memory) at test size.
    """
    monkeypatch.setitem(ENCODER_CONFIGS, "vitg", TINY_SWIGLU)
    source = random_init_(DepthAnythingV2("vitg"), seed=2)
    save_hf(source, tmp_path)
    hf, info = transformers.DepthAnythingForDepthEstimation.from_pretrained(str(tmp_path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    hf.eval()
    names = hf.state_dict()
    assert "backbone.encoder.layer.0.mlp.gate_proj.weight" in names
    ours = DepthAnythingV2("vitg").eval()
    ours.load_state_dict(hf_to_official(names, 4), strict=True)
    torch.testing.assert_close(ours.state_dict(), source.state_dict(), rtol=0, atol=0)
    x = natural_image(518, 518, seed=7)
    mine, ref = run_both(ours, hf, x, False)
    assert_non_degenerate(ref, False, 1.0)
    assert_close_to(mine, ref)


def test_real_vitg_keys_match_transformers_layout():
    """Key names and shapes for the full-size vitg against a transformers model on meta."""
    cfg = transformers.DepthAnythingConfig.from_dict(hf_config("vitg", False))
    with torch.device("meta"):
        hf = transformers.DepthAnythingForDepthEstimation(cfg)
        ours = DepthAnythingV2("vitg")
    mapped = hf_to_official(hf.state_dict(), 40)
    expected = ours.state_dict()
    assert set(mapped) == set(expected)
    assert all(mapped[k].shape == expected[k].shape for k in expected)
    assert len(expected) == 631
    assert sum(p.numel() for p in ours.parameters()) == 1_258_132_225
