"""Random weights that still produce a usable depth map: for tests, bench and `--random-weights`."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import protocol as P
from .depth_anything_v2 import DepthAnythingV2, LayerScale


def _calibration_image(size: int, generator: torch.Generator) -> Tensor:
    """A smooth, photo-like (normalised) image, so calibration is not tuned to white noise."""
    ys = torch.linspace(0, 1, size).view(size, 1)
    xs = torch.linspace(0, 1, size).view(1, size)
    channels = []
    for _ in range(3):
        f = torch.rand(4, generator=generator) * 4 + 0.5
        p = torch.rand(4, generator=generator) * 2 * math.pi
        img = 0.5 + 0.3 * ys - 0.1 * xs
        img = img + 0.12 * torch.sin(2 * math.pi * (f[0] * xs + f[1] * ys) + p[0])
        img = img + 0.08 * torch.sin(2 * math.pi * (f[2] * xs - f[3] * ys) + p[1])
        channels.append(img)
    img = torch.stack(channels) + 0.03 * torch.randn(3, size, size, generator=generator)
    img = img.clamp(0, 1)
    mean = torch.tensor(P.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(P.IMAGENET_STD).view(3, 1, 1)
    return ((img - mean) / std).unsqueeze(0)


@torch.no_grad()
def random_init_(model: DepthAnythingV2, seed: int = 0) -> DepthAnythingV2:
    """Give ``model`` random weights whose output is a real depth map, not a constant.

    PyTorch's default init leaves the layer scales at 1 and the positional table at 0, and the
    final activation lands anywhere: relative models often output all zeros (dead ReLU), metric
    models a near-constant sigmoid. Tests and the server's ``--random-weights`` smoke mode need
    outputs with a visible spread instead, so:

    - linear/conv weights ~ N(0, 1/fan_in) (variance-preserving), small random biases;
    - layer-scale gammas ~0.1 so forty blocks do not blow up the residual stream;
    - LayerNorm affine slightly perturbed from identity, small positional table and class token;
    - the last 1x1 conv is calibrated on a synthetic photo-like image so its pre-activation has
      mean/std (1.0, 0.35) for ReLU heads (output positive and ~35 % spread) or (0, 1) for
      Sigmoid heads (output spans roughly 0.15..0.85, far from saturation).

    Values are drawn on the CPU from a seeded generator, so the weights do not depend on the
    device the model lives on. Returns the model for chaining.
    """
    gen = torch.Generator().manual_seed(seed)

    def fill(param: Tensor, std: float, mean: float = 0.0) -> None:
        values = torch.randn(param.shape, generator=gen) * std + mean
        param.copy_(values.to(dtype=param.dtype))

    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            fan_in = module.weight[0].numel()
            fill(module.weight, 1.0 / math.sqrt(fan_in))
        elif isinstance(module, nn.ConvTranspose2d):
            # With kernel == stride every output pixel sees exactly in_channels inputs.
            fill(module.weight, 1.0 / math.sqrt(module.weight.shape[0]))
        elif isinstance(module, nn.LayerNorm):
            fill(module.weight, 0.1, mean=1.0)
            fill(module.bias, 0.05)
            continue
        elif isinstance(module, LayerScale):
            fill(module.gamma, 0.02, mean=0.1)
            continue
        else:
            continue
        if module.bias is not None:
            fill(module.bias, 0.05)

    vit = model.pretrained
    fill(vit.pos_embed, 0.1)
    fill(vit.cls_token, 0.5)
    fill(vit.mask_token, 0.02)

    # Calibrate the last conv on a real forward pass, so the final activation sits where it
    # is neither dead nor saturated whatever the accumulated scale of the decoder is.
    final = model.depth_head.scratch.output_conv2[2]
    captured: list[Tensor] = []
    hook = final.register_forward_hook(lambda _m, _i, out: captured.append(out.detach().float()))
    try:
        param = next(model.parameters())
        image = _calibration_image(P.PATCH_SIZE * 12, gen).to(device=param.device, dtype=param.dtype)
        was_training = model.training
        model.eval()
        model(image)
        model.train(was_training)
    finally:
        hook.remove()
    pre = captured[0]
    target_mean, target_std = (0.0, 1.0) if model.metric else (1.0, 0.35)
    scale = target_std / max(pre.std().item(), 1e-12)
    final.weight.mul_(scale)
    final.bias.copy_(((final.bias.float() - pre.mean()) * scale + target_mean).to(final.bias.dtype))
    return model
