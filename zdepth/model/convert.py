"""The Hugging Face layout, and writing checkpoint files (tests, bench, conversions).

- Key tables between the official names (``pretrained.*``, ``depth_head.*``) and the
  transformers hub names, both ways: :func:`official_to_hf` and :func:`hf_to_official` (which
  loading uses for ``*-hf`` folders);
- :func:`hf_config`, a transformers ``DepthAnythingConfig`` for our encoder table;
- :func:`save_official` and :func:`save_hf`, which write a model in either format.

Only torch and safetensors are needed; ``transformers`` is never imported here.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from .. import protocol as P
from ..errors import CheckpointError
from .depth_anything_v2 import ENCODER_CONFIGS, LAYER_NORM_EPS, POS_GRID, DepthAnythingV2, swiglu_hidden_dim


# transformers' Dinov2 hidden_states[0] is the embedding output, so its indices are ours + 1.
def hf_out_indices(encoder: str) -> list[int]:
    """The backbone ``out_indices`` of the transformers config for `encoder`."""
    return [i + 1 for i in ENCODER_CONFIGS[encoder]["layer_idx"]]


# --------------------------------------------------------------------------------------------
# Key mapping between the official and the transformers layouts
# --------------------------------------------------------------------------------------------

# One table for both directions. "{n}" is a block/stage index, "{p}" weight or bias, "{a}" and
# "{b}" the digit 1 or 2. Each side is compiled into a regex and the other side is its template.
_NAME_PAIRS: list[tuple[str, str]] = [
    ("pretrained.cls_token", "backbone.embeddings.cls_token"),
    ("pretrained.mask_token", "backbone.embeddings.mask_token"),
    ("pretrained.pos_embed", "backbone.embeddings.position_embeddings"),
    ("pretrained.patch_embed.proj.{p}", "backbone.embeddings.patch_embeddings.projection.{p}"),
    ("pretrained.blocks.{n}.norm{a}.{p}", "backbone.encoder.layer.{n}.norm{a}.{p}"),
    ("pretrained.blocks.{n}.ls{a}.gamma", "backbone.encoder.layer.{n}.layer_scale{a}.lambda1"),
    ("pretrained.blocks.{n}.attn.proj.{p}", "backbone.encoder.layer.{n}.attention.output.dense.{p}"),
    ("pretrained.blocks.{n}.mlp.fc{a}.{p}", "backbone.encoder.layer.{n}.mlp.fc{a}.{p}"),
    ("pretrained.blocks.{n}.mlp.w12.{p}", "backbone.encoder.layer.{n}.mlp.weights_in.{p}"),
    ("pretrained.blocks.{n}.mlp.w3.{p}", "backbone.encoder.layer.{n}.mlp.weights_out.{p}"),
    ("pretrained.norm.{p}", "backbone.layernorm.{p}"),
    ("depth_head.projects.{n}.{p}", "neck.reassemble_stage.layers.{n}.projection.{p}"),
    ("depth_head.resize_layers.{n}.{p}", "neck.reassemble_stage.layers.{n}.resize.{p}"),
    ("depth_head.scratch.output_conv1.{p}", "head.conv1.{p}"),
    ("depth_head.scratch.output_conv2.0.{p}", "head.conv2.{p}"),
    ("depth_head.scratch.output_conv2.2.{p}", "head.conv3.{p}"),
]
_FIELDS = {"n": r"\d+", "p": "weight|bias", "a": "[12]", "b": "[12]"}


def _compile(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w)\}", template)
    pattern = "".join(re.escape(part) if i % 2 == 0 else f"(?P<{part}>{_FIELDS[part]})" for i, part in enumerate(parts))
    return re.compile(pattern)


_TO_HF = [(_compile(official), hf) for official, hf in _NAME_PAIRS]
_TO_OFFICIAL = [(_compile(hf), official) for official, hf in _NAME_PAIRS]

# The refinenets are numbered fine-to-coarse officially but run coarse-to-fine in transformers:
# refinenet r is fusion layer 4 - r, and scratch.layer{r}_rn is neck.convs.{r - 1}.
_REFINE_PAIRS: list[tuple[str, str]] = [
    ("out_conv.{p}", "projection.{p}"),
    ("resConfUnit{a}.conv{b}.{p}", "residual_layer{a}.convolution{b}.{p}"),
]
_REFINE_TO_HF = [(_compile(official), hf) for official, hf in _REFINE_PAIRS]
_REFINE_TO_OFFICIAL = [(_compile(hf), official) for official, hf in _REFINE_PAIRS]
_LAYER_RN_RE = re.compile(r"depth_head\.scratch\.layer([1-4])_rn\.weight")
_REFINE_RE = re.compile(r"depth_head\.scratch\.refinenet([1-4])\.(.+)")
_HF_CONVS_RE = re.compile(r"neck\.convs\.([0-3])\.weight")
_HF_FUSION_RE = re.compile(r"neck\.fusion_stage\.layers\.([0-3])\.(.+)")

# transformers >= 5 names its modules differently in memory (q_proj, o_proj, gate/up/down_proj)
# while save_pretrained still writes the hub names above; accept both on the way in.
_HF_ALIASES: list[tuple[str, str]] = [
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
    (r"\.mlp\.down_proj\.", ".mlp.weights_out."),
]
_QKV = {"query": 0, "key": 1, "value": 2, "q_proj": 0, "k_proj": 1, "v_proj": 2}
_QKV_RE = re.compile(
    r"backbone\.encoder\.layer\.(\d+)\.attention\.(?:attention\.(query|key|value)|(q_proj|k_proj|v_proj))\.(weight|bias)"
)
_GATE_UP_RE = re.compile(r"backbone\.encoder\.layer\.(\d+)\.mlp\.(gate_proj|up_proj)\.(weight|bias)")


def _rename(key: str, rules: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, template in rules:
        m = pattern.fullmatch(key)
        if m:
            return template.format(**m.groupdict())
    return None


def _official_key_to_hf(key: str) -> str | None:
    if key.startswith("depth_head.resize_layers.2."):
        return None  # the Identity slot never has weights; a key there is foreign
    new = _rename(key, _TO_HF)
    if new is not None:
        return new
    m = _LAYER_RN_RE.fullmatch(key)
    if m:
        return f"neck.convs.{int(m.group(1)) - 1}.weight"
    m = _REFINE_RE.fullmatch(key)
    if m:
        sub = _rename(m.group(2), _REFINE_TO_HF)
        return None if sub is None else f"neck.fusion_stage.layers.{4 - int(m.group(1))}.{sub}"
    return None


def _hf_key_to_official(key: str) -> str | None:
    for alias, canonical in _HF_ALIASES:
        key = re.sub(alias, canonical, key)
    new = _rename(key, _TO_OFFICIAL)
    if new is not None:
        return new
    m = _HF_CONVS_RE.fullmatch(key)
    if m:
        return f"depth_head.scratch.layer{int(m.group(1)) + 1}_rn.weight"
    m = _HF_FUSION_RE.fullmatch(key)
    if m:
        sub = _rename(m.group(2), _REFINE_TO_OFFICIAL)
        return None if sub is None else f"depth_head.scratch.refinenet{4 - int(m.group(1))}.{sub}"
    return None


def official_to_hf(state_dict: Mapping[str, Tensor]) -> "OrderedDict[str, Tensor]":
    """Rename an official state dict to the transformers hub layout (as ``save_pretrained`` writes it).

    The fused ``qkv`` is split into thirds (rows [q; k; v]) and vitg's ``w12``/``w3`` become
    ``weights_in``/``weights_out``. Keys that have no HF counterpart raise ``KeyError`` rather
    than vanish.
    """
    out: OrderedDict[str, Tensor] = OrderedDict()
    for key, value in state_dict.items():
        m = re.fullmatch(r"pretrained\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)", key)
        if m:
            q, k, v = value.chunk(3, dim=0)
            base = f"backbone.encoder.layer.{m.group(1)}.attention.attention"
            out[f"{base}.query.{m.group(2)}"] = q.clone()
            out[f"{base}.key.{m.group(2)}"] = k.clone()
            out[f"{base}.value.{m.group(2)}"] = v.clone()
            continue
        new = _official_key_to_hf(key)
        if new is None:
            raise KeyError(f"no Hugging Face name for official key {key!r}")
        out[new] = value
    return out


def hf_to_official(hf_state_dict: Mapping[str, Tensor], num_layers: int | None = None) -> "OrderedDict[str, Tensor]":
    """Rename a transformers ``DepthAnythingForDepthEstimation`` state dict to the official layout.

    Accepts both the hub names (``attention.attention.query``, ``mlp.weights_in``) and the
    in-memory names of transformers >= 5 (``attention.q_proj``, ``mlp.gate_proj``/``up_proj``).
    q/k/v are concatenated row-wise into ``qkv``; gate and up are stacked into ``w12`` (gate
    first, since the official forward applies SiLU to the first half).

    ``num_layers``, when given, is checked against the block indices found. Keys that cannot be
    mapped (or a q/k/v or gate/up set with a part missing) are passed through under their HF
    names, so that a strict load reports them as unexpected instead of them disappearing.
    """
    out: OrderedDict[str, Tensor] = OrderedDict()
    parts: dict[tuple[str, int, str], dict[int, tuple[str, Tensor]]] = {}
    for key, value in hf_state_dict.items():
        m = _QKV_RE.fullmatch(key)
        if m:
            which = _QKV[m.group(2) or m.group(3)]
            parts.setdefault(("qkv", int(m.group(1)), m.group(4)), {})[which] = (key, value)
            continue
        m = _GATE_UP_RE.fullmatch(key)
        if m:
            which = 0 if m.group(2) == "gate_proj" else 1
            parts.setdefault(("w12", int(m.group(1)), m.group(3)), {})[which] = (key, value)
            continue
        new = _hf_key_to_official(key)
        out[new if new is not None else key] = value

    for (kind, layer, param), pieces in sorted(parts.items()):
        wanted = 3 if kind == "qkv" else 2
        if len(pieces) != wanted:
            for name, tensor in pieces.values():
                out[name] = tensor
            continue
        fused = torch.cat([pieces[i][1] for i in range(wanted)], dim=0)
        module = "attn.qkv" if kind == "qkv" else "mlp.w12"
        out[f"pretrained.blocks.{layer}.{module}.{param}"] = fused

    if num_layers is not None:
        found = {int(m.group(1)) for k in out if (m := re.match(r"pretrained\.blocks\.(\d+)\.", k))}
        if found and found != set(range(num_layers)):
            raise CheckpointError(
                f"Hugging Face state dict has blocks {sorted(found)[:3]}..{max(found)} "
                f"({len(found)} blocks), config says {num_layers}"
            )
    return out


# --------------------------------------------------------------------------------------------
# Writing files (tests, conversions)
# --------------------------------------------------------------------------------------------


def save_official(model: DepthAnythingV2, path: str | Path) -> Path:
    """Write the bare state dict exactly like the official release (fp32 tensors, no wrapper)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = OrderedDict((k, v.detach().to("cpu", torch.float32).contiguous()) for k, v in model.state_dict().items())
    torch.save(state, path)
    return path


def _config_number(value: float) -> int | float:
    # transformers 5.x types DepthAnythingConfig.max_depth as int and rejects 20.0 strictly.
    return int(value) if float(value).is_integer() else float(value)


def hf_config(encoder: str, metric: bool, max_depth: float | None = None) -> dict[str, Any]:
    """A transformers ``DepthAnythingConfig`` dict for our encoder table (loadable by from_pretrained)."""
    cfg = ENCODER_CONFIGS[encoder]
    depth = cfg["depth"]
    out_indices = hf_out_indices(encoder)
    backbone = {
        "model_type": "dinov2",
        "hidden_size": cfg["embed_dim"],
        "num_hidden_layers": depth,
        "num_attention_heads": cfg["num_heads"],
        "mlp_ratio": 4,
        "hidden_act": "gelu",
        "layer_norm_eps": LAYER_NORM_EPS,
        "layerscale_value": 1.0,
        "image_size": P.PATCH_SIZE * POS_GRID,
        "patch_size": P.PATCH_SIZE,
        "num_channels": 3,
        "qkv_bias": True,
        "use_swiglu_ffn": cfg["ffn"] == "swiglu",
        "apply_layernorm": True,
        "reshape_hidden_states": False,
        "out_indices": out_indices,
        "out_features": [f"stage{i}" for i in out_indices],
        "stage_names": ["stem"] + [f"stage{i}" for i in range(1, depth + 1)],
    }
    return {
        "architectures": ["DepthAnythingForDepthEstimation"],
        "model_type": "depth_anything",
        "backbone_config": backbone,
        "patch_size": P.PATCH_SIZE,
        "initializer_range": 0.02,
        "reassemble_hidden_size": cfg["embed_dim"],
        "reassemble_factors": [4, 2, 1, 0.5],
        "neck_hidden_sizes": list(cfg["out_channels"]),
        "fusion_hidden_size": cfg["features"],
        "head_in_index": -1,
        "head_hidden_size": 32,
        "depth_estimation_type": "metric" if metric else "relative",
        "max_depth": _config_number(max_depth if max_depth is not None else 20.0) if metric else 1,
        "dtype": "float32",
    }


def save_hf(model: DepthAnythingV2, folder: str | Path, max_depth: float | None = None) -> Path:
    """Write a transformers-style folder (config.json + model.safetensors, hub key names).

    ``max_depth`` only goes into config.json (transformers multiplies by it; zdepth does not):
    it defaults to 20 for metric models and is 1 for relative ones.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    save_file(official_to_hf(state), str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = hf_config(model.encoder, model.metric, max_depth)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return folder


# Sanity: the SwiGLU width the HF config implies must equal ours, or vitg folders cannot load.
assert swiglu_hidden_dim(ENCODER_CONFIGS["vitg"]["embed_dim"]) == 4096
