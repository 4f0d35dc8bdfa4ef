"""Shared fixtures: checkpoints written from random models in the official format."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory):
    """A checkpoint folder holding official-format vits files (metric hypersim and relative),
    written from randomly initialised models: the server loads them through the real path."""
    import torch

    from zdepth.model import DepthAnythingV2, official_filename, random_init_, save_official

    folder = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(0)
    for dataset in ("hypersim", "relative"):
        model = random_init_(DepthAnythingV2("vits", metric=dataset != "relative"), seed=1)
        save_official(model, folder / official_filename("vits", dataset))
    return folder
