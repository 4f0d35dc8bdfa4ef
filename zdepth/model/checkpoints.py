"""Finding, loading and writing Depth Anything V2 checkpoint files.

Two formats are accepted, both converted to the OFFICIAL key layout before loading so there is
one strict load path:

- the official release file ``depth_anything_v2[_metric_{dataset}]_{encoder}.pth``: a bare
  ``torch.save`` of the state dict, read with ``weights_only=True`` (no code from the file runs);
- a Hugging Face ``*-hf`` folder (``config.json`` + ``model.safetensors``), renamed through
  :func:`hf_to_official`.

Every failure while loading is reported as one :class:`CheckpointError` naming the file, the
model that was asked for, what the file looks like and the first offending keys, because the
usual cause is a user who downloaded the wrong file, and they need to see which one.

Only torch and safetensors are needed; ``transformers`` is never imported here.
"""

from __future__ import annotations

import json
import pickle
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from .depth_anything_v2 import ENCODER_CONFIGS, PATCH_SIZE, POS_GRID, DepthAnythingV2, swiglu_hidden_dim

__all__ = [
    "CHECKPOINTS",
    "DATASETS",
    "CheckpointError",
    "CheckpointNotFound",
    "official_filename",
    "hf_dirname",
    "download_url",
    "find_checkpoint",
    "load_state_dict",
    "hf_to_official",
    "official_to_hf",
    "load_model",
    "save_official",
    "save_hf",
    "detect_encoder",
    "hf_config",
    "DEFAULT_MAX_DEPTH",
]

DATASETS = ("relative", "hypersim", "vkitti")

# Default max_depth per metric training set (metric README; maintainer in issue #147).
DEFAULT_MAX_DEPTH = {"hypersim": 20.0, "vkitti": 80.0}

_SIZE_NAMES = {"vits": "Small", "vitb": "Base", "vitl": "Large", "vitg": "Giant"}
_HF_METRIC_NAMES = {"hypersim": "Indoor", "vkitti": "Outdoor"}
_OFFICIAL_METRIC_NAMES = {"hypersim": "Hypersim", "vkitti": "VKITTI"}
# transformers' Dinov2 hidden_states[0] is the embedding output, so its indices are ours + 1.
def _hf_out_indices(encoder: str) -> list[int]:
    return [i + 1 for i in ENCODER_CONFIGS[encoder]["layer_idx"]]

_URL = "https://huggingface.co/depth-anything/{repo}/resolve/main/{file}?download=true"


class CheckpointError(Exception):
    """A checkpoint exists but cannot be used (unreadable, unsafe, wrong model, wrong keys)."""


class CheckpointNotFound(CheckpointError):
    """Neither the official file nor a Hugging Face folder is where it was looked for."""


# --------------------------------------------------------------------------------------------
# Names, URLs and the known-files table
# --------------------------------------------------------------------------------------------


def _check(encoder: str, dataset: str) -> None:
    if encoder not in ENCODER_CONFIGS:
        raise ValueError(f"unknown encoder {encoder!r}; expected one of {sorted(ENCODER_CONFIGS)}")
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {list(DATASETS)}")


def official_filename(encoder: str, dataset: str) -> str:
    """File name of the official release (also for vitg, whose weights were never released)."""
    _check(encoder, dataset)
    if dataset == "relative":
        return f"depth_anything_v2_{encoder}.pth"
    return f"depth_anything_v2_metric_{dataset}_{encoder}.pth"


def hf_dirname(encoder: str, dataset: str) -> str:
    """Folder name of the transformers conversion (the hub repo name: Indoor = hypersim, Outdoor = vkitti)."""
    _check(encoder, dataset)
    size = _SIZE_NAMES[encoder]
    if dataset == "relative":
        return f"Depth-Anything-V2-{size}-hf"
    return f"Depth-Anything-V2-Metric-{_HF_METRIC_NAMES[dataset]}-{size}-hf"


def _official_repo(encoder: str, dataset: str) -> str:
    size = _SIZE_NAMES[encoder]
    if dataset == "relative":
        return f"Depth-Anything-V2-{size}"
    return f"Depth-Anything-V2-Metric-{_OFFICIAL_METRIC_NAMES[dataset]}-{size}"


def _released(encoder: str, dataset: str) -> bool:
    # Giant was announced ("coming soon") but never published, relative or metric.
    return encoder != "vitg"


def download_url(encoder: str, dataset: str) -> str | None:
    """Direct download URL of the official file, or None where no official file was released (vitg)."""
    _check(encoder, dataset)
    if not _released(encoder, dataset):
        return None
    return _URL.format(repo=_official_repo(encoder, dataset), file=official_filename(encoder, dataset))


_NC_NOTE = (
    "the main README puts Base/Large weights under CC-BY-NC-4.0 while the HF metric pages are tagged "
    "apache-2.0; treat as non-commercial unless confirmed"
)


def _build_table() -> dict[tuple[str, str], dict[str, Any]]:
    # Only values the fact sheet states as documented; anything approximate or unverified is None.
    known: dict[tuple[str, str], tuple[int | None, str | None, str]] = {
        ("vits", "relative"): (99_218_434, "715fade13be8f229f8a70cc02066f656f2423a59effd0579197bbf57860e1378", "Apache-2.0"),
        ("vitb", "relative"): (389_961_218, "0d2b7002e62d39d655571c371333340bd88f67ab95050c03591555aa05645328", "CC-BY-NC-4.0"),
        ("vitl", "relative"): (None, None, "CC-BY-NC-4.0"),
        ("vitg", "relative"): (None, None, "CC-BY-NC-4.0"),
        ("vits", "hypersim"): (None, None, "Apache-2.0"),
        ("vitb", "hypersim"): (None, None, "CC-BY-NC-4.0"),
        ("vitl", "hypersim"): (None, None, "CC-BY-NC-4.0"),
        ("vits", "vkitti"): (None, "9203e538d35255c90dda4b7fedb47ff33fe725497bcca3b1e53b3a65ee63f0cb", "Apache-2.0"),
        ("vitb", "vkitti"): (389_964_656, "4dad67a7cc10b462bca48e6b8569c762b8eb3c1adada170a3851a6d3ba37bb3e", "CC-BY-NC-4.0"),
        ("vitl", "vkitti"): (1_341_401_064, "239b1054a369e66da2576e9a118d6d7c12d90dc8ebe609579a9a09cd8e05fe38", "CC-BY-NC-4.0"),
    }
    table: dict[tuple[str, str], dict[str, Any]] = {}
    for (encoder, dataset), (size, sha, licence) in known.items():
        entry: dict[str, Any] = {
            "filename": official_filename(encoder, dataset),
            "url": download_url(encoder, dataset),
            "size_bytes": size,
            "sha256": sha,
            "licence": licence,
            "hf_dirname": hf_dirname(encoder, dataset),
        }
        if encoder == "vitg":
            entry["note"] = "not released: the authors list Giant as 'coming soon'; no official download"
        elif licence == "CC-BY-NC-4.0" and dataset != "relative":
            entry["note"] = _NC_NOTE
        table[(encoder, dataset)] = entry
    return table


CHECKPOINTS: dict[tuple[str, str], dict[str, Any]] = _build_table()


# --------------------------------------------------------------------------------------------
# Locating files
# --------------------------------------------------------------------------------------------


def _get_command(encoder: str, dataset: str) -> str:
    return f"zdepth weights get {encoder} --dataset {dataset}"


def find_checkpoint(checkpoint_dir: str | Path, encoder: str, dataset: str) -> Path:
    """The official ``.pth`` if present, else the HF folder; the official file wins when both exist."""
    _check(encoder, dataset)
    root = Path(checkpoint_dir)
    official = root / official_filename(encoder, dataset)
    if official.is_file():
        return official
    hf = root / hf_dirname(encoder, dataset)
    if (hf / "config.json").is_file() and (hf / "model.safetensors").is_file():
        return hf

    url = download_url(encoder, dataset)
    lines = [f"no {encoder}/{dataset} checkpoint in {root}: expected the official file {official}"]
    if hf.is_dir():
        missing = [n for n in ("config.json", "model.safetensors") if not (hf / n).is_file()]
        lines.append(f"(the folder {hf} exists but lacks {', '.join(missing)})")
    else:
        lines.append(f"or a Hugging Face folder {hf}/ with config.json and model.safetensors")
    if url:
        lines.append(f"download {official_filename(encoder, dataset)} from {url}")
        lines.append(f"or run: {_get_command(encoder, dataset)}")
    else:
        lines.append(
            f"{official_filename(encoder, dataset)} was not released officially (no download URL); "
            f"`{_get_command(encoder, dataset)}` cannot fetch it either"
        )
    raise CheckpointNotFound("\n".join(lines))


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
# Reading files
# --------------------------------------------------------------------------------------------

# metric_depth/train.py saves {"model", "optimizer", "epoch", "previous_best"}; the released
# files are bare state dicts. We accept exactly this training wrapper (and nothing looser), and
# strip DDP's uniform "module." prefix inside it, because those are the files users make by
# fine-tuning with the official script.
_TRAIN_WRAPPER_KEYS = {"model", "optimizer", "epoch", "previous_best"}


def _is_tensor_mapping(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()
    )


def _weights_only_reason(text: str) -> str | None:
    """The specific line of torch's weights_only refusal (e.g. the blocked GLOBAL), or None."""
    if "weights only load failed" not in text.lower():
        return None
    for line in text.splitlines():
        line = line.strip()
        if re.search(r"unsupported|blocked|not an allowed global|trying to load", line, re.IGNORECASE):
            return line.replace("WeightsUnpickler error: ", "")
    return "torch refused to unpickle it"


def _load_pth(path: Path) -> dict[str, Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = _weights_only_reason(str(exc))
        if reason is not None and "unsupported operand" in reason.lower():
            # Not a pickle at all (an HTML error page, random bytes): the restricted unpickler
            # trips over the first byte. Report it as unreadable, not as an attack.
            raise CheckpointError(
                f"{path}: unreadable checkpoint, not a PyTorch file ({reason}); the download may have failed"
            ) from exc
        if reason is not None:
            raise CheckpointError(
                f"{path}: the file contains pickled code/objects beyond plain tensors and was refused "
                f"for safety (read with torch.load(weights_only=True), nothing in it was executed: "
                f"{reason}). Official checkpoints are bare state dicts of tensors; re-download the file."
            ) from exc
        raise CheckpointError(f"{path}: unreadable checkpoint (corrupt pickle: {exc})") from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: unreadable or truncated checkpoint ({type(exc).__name__}: {exc}); "
            f"the download may be incomplete"
        ) from exc

    if isinstance(obj, Mapping) and set(obj) <= _TRAIN_WRAPPER_KEYS and "model" in obj:
        inner = obj["model"]
        if _is_tensor_mapping(inner):
            keys = list(inner)
            if all(k.startswith("module.") for k in keys):
                inner = {k[len("module."):]: v for k, v in inner.items()}
            return dict(inner)
    if not _is_tensor_mapping(obj):
        if isinstance(obj, Mapping):
            shown = ", ".join(repr(k) for k in list(obj)[:5])
            what = f"a mapping with keys {shown}{' ...' if len(obj) > 5 else ''} that are not all name -> tensor"
        else:
            what = f"a {type(obj).__name__}"
        raise CheckpointError(
            f"{path}: expected a state dict (a flat mapping of parameter names to tensors), found {what}"
        )
    return dict(obj)


def _read_hf_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable config.json ({exc})") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: config.json is not a JSON object")
    return config


def _hf_backbone(config: Mapping[str, Any]) -> Mapping[str, Any]:
    backbone = config.get("backbone_config") or {}
    return backbone if isinstance(backbone, Mapping) else {}


def _load_hf_folder(folder: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config = _read_hf_config(folder)
    weights = folder / "model.safetensors"
    try:
        hf_state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{weights}: unreadable or truncated safetensors file ({exc})") from exc
    num_layers = _hf_backbone(config).get("num_hidden_layers")
    return dict(hf_to_official(hf_state, num_layers if isinstance(num_layers, int) else None)), config


def load_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read an official ``.pth`` or an HF folder into a state dict with official key names.

    ``.pth`` files go through ``torch.load(weights_only=True)``; a pickle that needs anything but
    tensors and plain containers is refused (and nothing in it runs). The one accepted non-bare
    layout is the official training wrapper ``{"model": ..., "optimizer": ..., "epoch": ...,
    "previous_best": ...}`` (see ``_TRAIN_WRAPPER_KEYS``); every other shape is refused.
    """
    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
            raise CheckpointNotFound(f"{path}: a Hugging Face folder needs config.json and model.safetensors")
        return _load_hf_folder(path)[0]
    if not path.is_file():
        raise CheckpointNotFound(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = dict(load_file(str(path), device="cpu"))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: unreadable or truncated safetensors file ({exc})") from exc
        # Community conversions exist in both layouts; a lone file carries no config to tell us.
        return dict(hf_to_official(state)) if any(k.startswith("backbone.") for k in state) else state
    return _load_pth(path)


# --------------------------------------------------------------------------------------------
# Recognising what a file holds, and loading a model strictly
# --------------------------------------------------------------------------------------------


def detect_encoder(state_dict: Mapping[str, Tensor]) -> str | None:
    """Encoder name whose width and depth match an official-layout state dict, else None."""
    dim, depth, swiglu = _vit_shape(state_dict)
    for name, cfg in ENCODER_CONFIGS.items():
        if cfg["embed_dim"] == dim and cfg["depth"] == depth and (cfg["ffn"] == "swiglu") == swiglu:
            return name
    return None


def _vit_shape(state_dict: Mapping[str, Tensor]) -> tuple[int | None, int, bool]:
    dim = None
    for key in ("pretrained.cls_token", "pretrained.pos_embed", "pretrained.norm.weight"):
        if key in state_dict:
            dim = int(state_dict[key].shape[-1])
            break
    if dim is None and "pretrained.patch_embed.proj.weight" in state_dict:
        dim = int(state_dict["pretrained.patch_embed.proj.weight"].shape[0])
    blocks = {int(m.group(1)) for k in state_dict if (m := re.match(r"pretrained\.blocks\.(\d+)\.", k))}
    swiglu = any(".mlp.w12." in k for k in state_dict)
    return dim, (max(blocks) + 1 if blocks else 0), swiglu


def _describe(state_dict: Mapping[str, Tensor]) -> str:
    name = detect_encoder(state_dict)
    if name is not None:
        return f"looks like a {name} checkpoint"
    dim, depth, swiglu = _vit_shape(state_dict)
    if dim is None:
        first = ", ".join(list(state_dict)[:3])
        return f"does not look like a Depth Anything V2 checkpoint (no pretrained.* encoder keys; first keys: {first})"
    ffn = "SwiGLU" if swiglu else "MLP"
    return f"looks like an unknown ViT (embed dim {dim}, {depth} blocks, {ffn} FFN), not vits/vitb/vitl/vitg"


def _key_report(expected: Mapping[str, Tensor], got: Mapping[str, Tensor], limit: int = 5) -> list[str]:
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    misshaped = [
        f"{k} {tuple(got[k].shape)} != expected {tuple(expected[k].shape)}"
        for k in expected
        if k in got and tuple(got[k].shape) != tuple(expected[k].shape)
    ]
    lines = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if items:
            more = f", ... (+{len(items) - limit} more)" if len(items) > limit else ""
            lines.append(f"{len(items)} {label} key(s): {', '.join(items[:limit])}{more}")
    return lines


def _hf_config_problems(config: Mapping[str, Any], encoder: str, dataset: str) -> list[str]:
    problems = []
    kind = config.get("depth_estimation_type", "relative")
    want_kind = "relative" if dataset == "relative" else "metric"
    if kind != want_kind:
        problems.append(f"config.json depth_estimation_type is {kind!r}, a {dataset} model needs {want_kind!r}")
    out_indices = _hf_backbone(config).get("out_indices")
    if out_indices is not None and list(out_indices) != _hf_out_indices(encoder):
        problems.append(
            f"config.json backbone out_indices {list(out_indices)} differ from Depth Anything V2 "
            f"{encoder} {_hf_out_indices(encoder)} (a V1 model?)"
        )
    return problems


def load_model(
    checkpoint_dir: str | Path,
    encoder: str,
    dataset: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> DepthAnythingV2:
    """Find and strictly load the (encoder, dataset) checkpoint; the model is returned in eval mode.

    Every problem after the file is found becomes one :class:`CheckpointError` that names the
    path, the model asked for, what the file looks like and the first few bad keys, so a user
    holding the wrong download can see which one it is. Weights are assigned directly from the
    file (the model is built on the meta device), so the model is never held twice in memory.
    """
    _check(encoder, dataset)
    path = find_checkpoint(checkpoint_dir, encoder, dataset)
    asked = f"expected {encoder} {dataset} ({'metric' if dataset != 'relative' else 'relative'} head)"
    try:
        if path.is_dir():
            state, config = _load_hf_folder(path)
            config_problems = _hf_config_problems(config, encoder, dataset)
        else:
            state, config_problems = _load_pth(path), []
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}\n({asked})") from exc

    with torch.device("meta"):
        model = DepthAnythingV2(encoder, metric=dataset != "relative")
    expected = model.state_dict()
    problems = _key_report(expected, state) + config_problems
    if problems:
        headline = f"{path}: cannot load as {encoder}/{dataset}: {asked}, file {_describe(state)}"
        raise CheckpointError("\n".join([headline, *problems]))
    bad_dtype = [k for k, v in state.items() if not v.is_floating_point()]
    if bad_dtype:
        raise CheckpointError(f"{path}: non-floating-point tensors in checkpoint: {', '.join(bad_dtype[:5])} ({asked})")
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:  # pragma: no cover - the report above should catch everything first
        raise CheckpointError(f"{path}: strict load failed ({asked}): {exc}") from exc
    return model.to(device=device, dtype=dtype).eval()


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
    out_indices = _hf_out_indices(encoder)
    backbone = {
        "model_type": "dinov2",
        "hidden_size": cfg["embed_dim"],
        "num_hidden_layers": depth,
        "num_attention_heads": cfg["num_heads"],
        "mlp_ratio": 4,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-6,
        "layerscale_value": 1.0,
        "image_size": PATCH_SIZE * POS_GRID,
        "patch_size": PATCH_SIZE,
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
        "patch_size": PATCH_SIZE,
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
