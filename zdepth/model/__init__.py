"""Depth Anything V2 network and checkpoint handling (imports torch; the worker's side only).

`depth_anything_v2` is the network, `checkpoints` loads files, `convert` holds the Hugging Face
key tables and writes files, `random_init` gives random weights that still make depth maps.
Which file holds which checkpoint is the torch-free `zdepth.checkpoint_files`.
"""

from ..checkpoint_files import CHECKPOINTS, download_url, find_checkpoint, hf_dirname, official_filename
from ..errors import CheckpointError, CheckpointNotFound
from .checkpoints import detect_encoder, load_model, load_state_dict
from .convert import hf_config, hf_to_official, official_to_hf, save_hf, save_official
from .depth_anything_v2 import ENCODER_CONFIGS, DepthAnythingV2, interpolate_pos_embed
from .random_init import random_init_

__all__ = [
    "CHECKPOINTS",
    "ENCODER_CONFIGS",
    "CheckpointError",
    "CheckpointNotFound",
    "DepthAnythingV2",
    "detect_encoder",
    "download_url",
    "find_checkpoint",
    "hf_config",
    "hf_dirname",
    "hf_to_official",
    "interpolate_pos_embed",
    "load_model",
    "load_state_dict",
    "official_filename",
    "official_to_hf",
    "random_init_",
    "save_hf",
    "save_official",
]
