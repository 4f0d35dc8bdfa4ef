"""Loading Depth Anything V2 checkpoint files, strictly and safely.

Two formats are accepted, both converted to the OFFICIAL key layout before loading so there is
one strict load path:

- the official release file ``depth_anything_v2[_metric_{dataset}]_{encoder}.pth``: a bare
  ``torch.save`` of the state dict, read with ``weights_only=True`` (no code from the file runs);
- a Hugging Face ``*-hf`` folder (``config.json`` + ``model.safetensors``), renamed through
  :func:`convert.hf_to_official`.

Every failure while loading is reported as one :class:`CheckpointError` naming the file, the
model that was asked for, what the file looks like and the first offending keys, because the
usual cause is a user who downloaded the wrong file, and they need to see which one.

Which file holds which checkpoint, and finding it, is `zdepth.checkpoint_files` (torch-free);
writing files and the Hugging Face key tables are `convert`. Only torch and safetensors are
needed; ``transformers`` is never imported here.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from ..checkpoint_files import check_names, find_checkpoint
from ..errors import CheckpointError, CheckpointNotFound
from .convert import hf_out_indices, hf_to_official
from .depth_anything_v2 import ENCODER_CONFIGS, DepthAnythingV2

# --------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------

# metric_depth/train.py saves {"model", "optimizer", "epoch", "previous_best"}; the released
# files are bare state dicts. We accept exactly this training wrapper (and nothing looser), and
# strip DDP's uniform "module." prefix inside it, because those are the files users make by
# fine-tuning with the official script.
_TRAIN_WRAPPER_KEYS = {"model", "optimizer", "epoch", "previous_best"}


def _is_tensor_mapping(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())
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
            f"{path}: unreadable or truncated checkpoint ({type(exc).__name__}: {exc}); the download may be incomplete"
        ) from exc

    if isinstance(obj, Mapping) and set(obj) <= _TRAIN_WRAPPER_KEYS and "model" in obj:
        inner = obj["model"]
        if _is_tensor_mapping(inner):
            keys = list(inner)
            if all(k.startswith("module.") for k in keys):
                inner = {k[len("module.") :]: v for k, v in inner.items()}
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
    if out_indices is not None and list(out_indices) != hf_out_indices(encoder):
        problems.append(
            f"config.json backbone out_indices {list(out_indices)} differ from Depth Anything V2 "
            f"{encoder} {hf_out_indices(encoder)} (a V1 model?)"
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
    check_names(encoder, dataset)
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
