"""Finding, reading and strictly loading checkpoints, in both formats, and every way it can fail."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from zdepth.model import (
    CHECKPOINTS,
    ENCODER_CONFIGS,
    CheckpointError,
    CheckpointNotFound,
    DepthAnythingV2,
    download_url,
    find_checkpoint,
    hf_config,
    hf_dirname,
    hf_to_official,
    load_model,
    load_state_dict,
    official_filename,
    official_to_hf,
    random_init_,
    save_hf,
    save_official,
)


@pytest.fixture(autouse=True, scope="module")
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


def small_input(seed: int = 0, height: int = 112, width: int = 154) -> torch.Tensor:
    return torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def vits_relative() -> DepthAnythingV2:
    return random_init_(DepthAnythingV2("vits", metric=False), seed=11).eval()


@pytest.fixture(scope="module")
def vits_file(tmp_path_factory, vits_relative) -> Path:
    """A random vits model written exactly like the official release file."""
    folder = tmp_path_factory.mktemp("ckpt")
    return save_official(vits_relative, folder / official_filename("vits", "relative"))


# ----------------------------------------------------------------------------------------------
# Names, URLs, the known-files table
# ----------------------------------------------------------------------------------------------


def test_names_and_urls():
    assert official_filename("vits", "relative") == "depth_anything_v2_vits.pth"
    assert official_filename("vitl", "hypersim") == "depth_anything_v2_metric_hypersim_vitl.pth"
    assert official_filename("vitb", "vkitti") == "depth_anything_v2_metric_vkitti_vitb.pth"
    assert hf_dirname("vits", "relative") == "Depth-Anything-V2-Small-hf"
    assert hf_dirname("vitg", "relative") == "Depth-Anything-V2-Giant-hf"
    assert hf_dirname("vitb", "hypersim") == "Depth-Anything-V2-Metric-Indoor-Base-hf"
    assert hf_dirname("vitl", "vkitti") == "Depth-Anything-V2-Metric-Outdoor-Large-hf"
    assert download_url("vits", "relative") == (
        "https://huggingface.co/depth-anything/Depth-Anything-V2-Small/resolve/main/depth_anything_v2_vits.pth?download=true"
    )
    assert download_url("vitb", "hypersim") == (
        "https://huggingface.co/depth-anything/Depth-Anything-V2-Metric-Hypersim-Base/resolve/main/"
        "depth_anything_v2_metric_hypersim_vitb.pth?download=true"
    )
    assert download_url("vits", "vkitti").startswith(
        "https://huggingface.co/depth-anything/Depth-Anything-V2-Metric-VKITTI-Small/resolve/main/"
    )
    assert download_url("vitg", "relative") is None
    with pytest.raises(ValueError):
        official_filename("vitx", "relative")
    with pytest.raises(ValueError):
        hf_dirname("vits", "nyu")


def test_checkpoint_table_uses_only_documented_values():
    assert len(CHECKPOINTS) == 10  # 4 relative (vitg unreleased) + 3 hypersim + 3 vkitti
    vits = CHECKPOINTS[("vits", "relative")]
    assert vits["size_bytes"] == 99_218_434
    assert vits["sha256"] == "715fade13be8f229f8a70cc02066f656f2423a59effd0579197bbf57860e1378"
    assert vits["licence"] == "Apache-2.0"
    assert CHECKPOINTS[("vitl", "relative")]["sha256"] is None  # only an unofficial re-upload is known
    assert CHECKPOINTS[("vitl", "vkitti")]["size_bytes"] == 1_341_401_064
    giant = CHECKPOINTS[("vitg", "relative")]
    assert giant["url"] is None and "not released" in giant["note"]
    assert giant["filename"] == "depth_anything_v2_vitg.pth"
    for (encoder, dataset), entry in CHECKPOINTS.items():
        assert entry["filename"] == official_filename(encoder, dataset)
        assert entry["sha256"] is None or re.fullmatch(r"[0-9a-f]{64}", entry["sha256"])
        if encoder != "vits":
            assert entry["licence"] == "CC-BY-NC-4.0"


# ----------------------------------------------------------------------------------------------
# Key and parameter counts (meta device: no memory, no forward)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "encoder,keys,params",
    [("vits", 239, 24_785_089), ("vitb", 239, 97_470_785), ("vitl", 407, 335_315_649), ("vitg", 631, 1_258_132_225)],
)
def test_key_and_parameter_counts(encoder, keys, params):
    with torch.device("meta"):
        model = DepthAnythingV2(encoder)
    sd = model.state_dict()
    assert len(sd) == keys
    assert sum(p.numel() for p in model.parameters()) == params
    d = ENCODER_CONFIGS[encoder]["embed_dim"]
    assert sd["pretrained.pos_embed"].shape == (1, 1370, d)
    assert sd["pretrained.mask_token"].shape == (1, d)
    assert "depth_head.resize_layers.2.weight" not in sd
    assert "depth_head.scratch.layer1_rn.bias" not in sd
    assert not any("register" in k or "readout" in k for k in sd)
    assert set(hf_to_official(official_to_hf(sd), ENCODER_CONFIGS[encoder]["depth"])) == set(sd)


def test_vits_example_shapes():
    with torch.device("meta"):
        sd = DepthAnythingV2("vits").state_dict()
    assert sd["depth_head.projects.0.weight"].shape == (48, 384, 1, 1)
    assert sd["depth_head.scratch.layer4_rn.weight"].shape == (64, 384, 3, 3)
    assert sd["depth_head.scratch.output_conv1.weight"].shape == (32, 64, 3, 3)
    assert sd["depth_head.resize_layers.0.weight"].shape == (48, 48, 4, 4)
    with torch.device("meta"):
        g = DepthAnythingV2("vitg").state_dict()
    assert g["pretrained.blocks.0.mlp.w12.weight"].shape == (8192, 1536)
    assert g["pretrained.blocks.0.mlp.w3.weight"].shape == (1536, 4096)


# ----------------------------------------------------------------------------------------------
# Round trips
# ----------------------------------------------------------------------------------------------


def test_official_round_trip(vits_file, vits_relative):
    raw = torch.load(vits_file, map_location="cpu", weights_only=True)
    assert type(raw).__name__ == "OrderedDict" and len(raw) == 239  # bare state dict, like the release
    assert find_checkpoint(vits_file.parent, "vits", "relative") == vits_file
    model = load_model(vits_file.parent, "vits", "relative")
    assert not model.training and model.encoder == "vits" and not model.metric
    x = small_input()
    with torch.no_grad():
        torch.testing.assert_close(model(x), vits_relative(x), rtol=0, atol=0)


def test_official_round_trip_metric_and_dtype(tmp_path):
    source = random_init_(DepthAnythingV2("vits", metric=True), seed=12).eval()
    save_official(source, tmp_path / official_filename("vits", "hypersim"))
    model = load_model(tmp_path, "vits", "hypersim", dtype=torch.bfloat16)
    assert model.metric and next(model.parameters()).dtype == torch.bfloat16
    model = load_model(tmp_path, "vits", "hypersim")
    x = small_input(1)
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(out, source(x), rtol=0, atol=0)
    assert 0 < out.min() and out.max() < 1  # sigmoid, not yet times max_depth


def test_training_wrapper_is_unwrapped(tmp_path, vits_relative):
    state = {"module." + k: v for k, v in vits_relative.state_dict().items()}
    torch.save(
        {"model": state, "optimizer": {"state": {}, "param_groups": []}, "epoch": 3, "previous_best": {"d1": 0.5}},
        tmp_path / official_filename("vits", "relative"),
    )
    model = load_model(tmp_path, "vits", "relative")
    torch.testing.assert_close(model.state_dict(), vits_relative.state_dict())


def test_unknown_wrapper_is_refused(tmp_path, vits_relative):
    path = tmp_path / official_filename("vits", "relative")
    torch.save({"state_dict": vits_relative.state_dict()}, path)
    with pytest.raises(CheckpointError, match="flat mapping of parameter names to tensors") as err:
        load_model(tmp_path, "vits", "relative")
    assert str(path) in str(err.value)


def _randomize_hf(model, seed: int) -> None:
    """Non-degenerate random weights for a transformers model, set on the HF side only."""
    from torch import nn

    g = torch.Generator().manual_seed(seed)

    def fill(t, std, mean=0.0):
        t.copy_(torch.randn(t.shape, generator=g) * std + mean)

    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                fill(module.weight, module.weight[0].numel() ** -0.5)
            elif isinstance(module, nn.ConvTranspose2d):
                fill(module.weight, module.weight.shape[0] ** -0.5)
            elif isinstance(module, nn.LayerNorm):
                fill(module.weight, 0.1, 1.0)
            if getattr(module, "bias", None) is not None and not isinstance(module, nn.LayerNorm):
                fill(module.bias, 0.05)
            if hasattr(module, "lambda1"):
                fill(module.lambda1, 0.02, 0.1)
        emb = model.backbone.embeddings
        fill(emb.position_embeddings, 0.1)
        fill(emb.cls_token, 0.5)
        # Put the last conv's pre-activation at mean 1.5 / std 0.5 (ReLU) or 0 / 1 (sigmoid).
        seen = []
        handle = model.head.conv3.register_forward_hook(lambda m, i, o: seen.append(o))
        model(pixel_values=small_input(9, 266, 266))
        handle.remove()
        mean, std = seen[0].mean(), seen[0].std()
        target = (0.0, 1.0) if model.config.depth_estimation_type == "metric" else (1.5, 0.5)
        model.head.conv3.weight.mul_(target[1] / std)
        model.head.conv3.bias.copy_((model.head.conv3.bias - mean) * target[1] / std + target[0])


@pytest.mark.parametrize("dataset", ["relative", "vkitti"])
def test_hf_folder_from_transformers_save_pretrained(tmp_path, dataset):
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.set_verbosity_error()
    metric = dataset != "relative"
    cfg = transformers.DepthAnythingConfig.from_dict(hf_config("vits", metric, 80))
    hf = transformers.DepthAnythingForDepthEstimation(cfg).eval()
    hf.config.backbone_config._attn_implementation = "eager"
    _randomize_hf(hf, seed=5)
    hf.save_pretrained(tmp_path / hf_dirname("vits", dataset))

    assert find_checkpoint(tmp_path, "vits", dataset) == tmp_path / hf_dirname("vits", dataset)
    model = load_model(tmp_path, "vits", dataset)
    assert model.metric == metric
    x = small_input(2, 518, 518)  # the only size where HF's pos-embed rule equals the official one
    with torch.no_grad():
        ref = hf(pixel_values=x).predicted_depth
        mine = model(x) * (80 if metric else 1)
    assert ref.std() / ref.mean().abs() > 0.1
    span = (ref.max() - ref.min()).item()
    assert (mine - ref).abs().max().item() <= 1e-4 * span


def test_hf_folder_from_save_hf_and_official_wins(tmp_path, vits_relative, vits_file):
    save_hf(vits_relative, tmp_path / hf_dirname("vits", "relative"))
    assert find_checkpoint(tmp_path, "vits", "relative").is_dir()
    loaded = load_state_dict(tmp_path / hf_dirname("vits", "relative"))
    torch.testing.assert_close(loaded, vits_relative.state_dict(), rtol=0, atol=0)
    model = load_model(tmp_path, "vits", "relative")
    x = small_input(3)
    with torch.no_grad():
        torch.testing.assert_close(model(x), vits_relative(x), rtol=0, atol=0)
    os.link(vits_file, tmp_path / vits_file.name)
    assert find_checkpoint(tmp_path, "vits", "relative") == tmp_path / vits_file.name


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


def test_missing_checkpoint_message(tmp_path):
    with pytest.raises(CheckpointNotFound) as err:
        load_model(tmp_path, "vitb", "hypersim")
    msg = str(err.value)
    assert "depth_anything_v2_metric_hypersim_vitb.pth" in msg
    assert download_url("vitb", "hypersim") in msg
    assert "zdepth weights get vitb --dataset hypersim" in msg
    assert hf_dirname("vitb", "hypersim") in msg


def test_missing_giant_says_not_released(tmp_path):
    with pytest.raises(CheckpointNotFound, match="not released"):
        find_checkpoint(tmp_path, "vitg", "relative")


def test_incomplete_hf_folder_is_not_found(tmp_path):
    folder = tmp_path / hf_dirname("vits", "relative")
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(CheckpointNotFound, match="lacks model.safetensors"):
        find_checkpoint(tmp_path, "vits", "relative")


def test_truncated_file(tmp_path, vits_file):
    path = tmp_path / vits_file.name
    data = vits_file.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path, "vits", "relative")
    msg = str(err.value)
    assert str(path) in msg and "truncated" in msg and "expected vits relative" in msg


def test_garbage_file(tmp_path):
    path = tmp_path / official_filename("vits", "relative")
    path.write_bytes(b"<html>404 not found</html>")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_model(tmp_path, "vits", "relative")


class _RunsCode:
    """Unpickling this would run a shell command (the classic malicious-checkpoint payload)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_code_is_refused_and_not_run(tmp_path, vits_relative):
    marker = tmp_path / "pwned"
    state = dict(vits_relative.state_dict())
    state["payload"] = _RunsCode(marker)
    path = tmp_path / official_filename("vits", "relative")
    torch.save(state, path)  # plain pickle-based torch.save; nothing runs at save time
    assert not marker.exists()
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path, "vits", "relative")
    msg = str(err.value)
    assert "pickled code/objects" in msg and "refused for safety" in msg and str(path) in msg
    with pytest.raises(CheckpointError, match="refused for safety"):
        load_state_dict(path)
    assert not marker.exists()


def test_wrong_encoder_file(tmp_path):
    vitb = DepthAnythingV2("vitb")
    save_official(vitb, tmp_path / official_filename("vits", "relative"))
    del vitb
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path, "vits", "relative")
    msg = str(err.value)
    assert "expected vits" in msg and "looks like a vitb checkpoint" in msg
    assert "mis-shaped" in msg and "pretrained.cls_token (1, 1, 768) != expected (1, 1, 384)" in msg


def test_wrong_dataset_hf_folder(tmp_path, vits_relative):
    save_hf(vits_relative, tmp_path / hf_dirname("vits", "hypersim"))  # a relative model in the metric slot
    with pytest.raises(CheckpointError, match="depth_estimation_type is 'relative'"):
        load_model(tmp_path, "vits", "hypersim")


def test_truncated_safetensors(tmp_path, vits_relative):
    folder = save_hf(vits_relative, tmp_path / hf_dirname("vits", "relative"))
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated") as err:
        load_model(tmp_path, "vits", "relative")
    assert str(weights) in str(err.value)


def test_missing_unexpected_and_misshaped_keys_listed(tmp_path, vits_relative):
    state = dict(vits_relative.state_dict())
    dropped = [k for k in state if k.startswith("pretrained.blocks.3.")][:7]
    for k in dropped:
        del state[k]
    state["depth_head.extra.weight"] = torch.zeros(3)
    state["depth_head.scratch.output_conv1.bias"] = torch.zeros(5)
    path = tmp_path / official_filename("vits", "relative")
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path, "vits", "relative")
    msg = str(err.value)
    assert str(path) in msg and "looks like a vits checkpoint" in msg
    assert "7 missing key(s)" in msg and dropped[0] in msg and "(+2 more)" in msg
    assert dropped[6] not in msg  # at most five listed
    assert "1 unexpected key(s): depth_head.extra.weight" in msg
    assert "1 mis-shaped key(s): depth_head.scratch.output_conv1.bias (5,) != expected (32,)" in msg


def test_not_a_depth_anything_file(tmp_path):
    torch.save({"encoder.weight": torch.zeros(2, 2)}, tmp_path / official_filename("vits", "relative"))
    with pytest.raises(CheckpointError, match="does not look like a Depth Anything V2 checkpoint"):
        load_model(tmp_path, "vits", "relative")
