"""Depth Anything V2 (DINOv2 ViT encoder + DPT head) in one file.

Written from the architecture description, not copied from the official repository. The module
tree deliberately mirrors the official checkpoint layout (``pretrained.*`` for the encoder,
``depth_head.*`` for the decoder) so that the unchanged ``depth_anything_v2_*.pth`` files load
with ``load_state_dict(strict=True)`` and no renaming step can silently drop a tensor.

Numerics that must match the official model bit-for-bit (up to float rounding) are called out
where they are implemented: the positional-embedding resampling, the final norm on the
intermediate features, non-inplace ReLUs and ``align_corners=True`` upsampling in the decoder.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..protocol import DEFAULT_ENCODER, PATCH_SIZE

__all__ = ["ENCODER_CONFIGS", "DepthAnythingV2"]

# The backbone was trained at 518 px, so the stored table is a 37x37 grid plus the class row.
POS_GRID = 37
# DINOv2's legacy offset: without it, the official weights see slightly different embeddings.
INTERPOLATE_OFFSET = 0.1
LAYER_NORM_EPS = 1e-6

ENCODER_CONFIGS: dict[str, dict] = {
    "vits": {
        "embed_dim": 384,
        "depth": 12,
        "num_heads": 6,
        "features": 64,
        "out_channels": [48, 96, 192, 384],
        "layer_idx": [2, 5, 8, 11],
        "ffn": "mlp",
    },
    "vitb": {
        "embed_dim": 768,
        "depth": 12,
        "num_heads": 12,
        "features": 128,
        "out_channels": [96, 192, 384, 768],
        "layer_idx": [2, 5, 8, 11],
        "ffn": "mlp",
    },
    "vitl": {
        "embed_dim": 1024,
        "depth": 24,
        "num_heads": 16,
        "features": 256,
        "out_channels": [256, 512, 1024, 1024],
        "layer_idx": [4, 11, 17, 23],
        "ffn": "mlp",
    },
    "vitg": {
        "embed_dim": 1536,
        "depth": 40,
        "num_heads": 24,
        "features": 384,
        "out_channels": [1536, 1536, 1536, 1536],
        "layer_idx": [9, 19, 29, 39],
        "ffn": "swiglu",
    },
}


def swiglu_hidden_dim(embed_dim: int, mlp_ratio: int = 4) -> int:
    """SwiGLU keeps ~2/3 of the MLP width (same parameter count), rounded up to a multiple of 8."""
    return (int(embed_dim * mlp_ratio * 2 / 3) + 7) // 8 * 8


# --------------------------------------------------------------------------------------------
# DINOv2 encoder
# --------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Non-overlapping 14x14 patches; a module of its own only to keep the ``patch_embed.proj`` key."""

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=PATCH_SIZE, stride=PATCH_SIZE)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with the fused ``qkv`` projection the checkpoints store."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        # SDPA's default scale is head_dim ** -0.5, the same as the official attention.
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    """Exact (erf) GELU: the tanh approximation shifts outputs beyond float rounding."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLUFFN(nn.Module):
    """vitg feed-forward; ``w12`` packs [gate; up] so that the checkpoint's single matrix loads as is."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * up)


class LayerScale(nn.Module):
    """Per-channel residual scale; the parameter is named ``gamma`` to match ``ls1.gamma`` keys."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Not in place: x is the branch output and may be needed by autograd.
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block (drop-path is a training-only no-op and therefore omitted)."""

    def __init__(self, dim: int, num_heads: int, ffn: str) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        if ffn == "swiglu":
            self.mlp: nn.Module = SwiGLUFFN(dim, swiglu_hidden_dim(dim))
        else:
            self.mlp = Mlp(dim, 4 * dim)
        self.ls2 = LayerScale(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


def interpolate_pos_embed(pos_embed: Tensor, grid_h: int, grid_w: int) -> Tensor:
    """Resample the 37x37 positional table to a (grid_h, grid_w) patch grid, the official way.

    The official model calls ``F.interpolate`` with ``scale_factor=((h + 0.1) / 37, (w + 0.1) / 37)``
    rather than ``size=(h, w)``. With a scale factor PyTorch maps source coordinates through
    ``1 / scale_factor``, so every axis is resampled slightly, even one that already has 37 cells
    (e.g. the height of a 518x686 input). A ``size=`` call (current DINOv2 / transformers) gives
    different numbers for every input except 518x518, so the exact call is reproduced here.

    Only the exact 37x37 grid skips the resampling, as in the official code.
    """
    num_patches = pos_embed.shape[1] - 1
    if grid_h * grid_w == num_patches and grid_h == grid_w:
        return pos_embed
    side = int(math.sqrt(num_patches))
    dim = pos_embed.shape[-1]
    # Bicubic in half precision visibly shifts the table, hence the float32 detour.
    table = pos_embed.float()
    cls_row, patch_rows = table[:, :1], table[:, 1:]
    grid = patch_rows.reshape(1, side, side, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(
        grid,
        scale_factor=((grid_h + INTERPOLATE_OFFSET) / side, (grid_w + INTERPOLATE_OFFSET) / side),
        mode="bicubic",
        align_corners=False,
    )
    if grid.shape[-2:] != (grid_h, grid_w):
        raise RuntimeError(f"pos-embed resampled to {tuple(grid.shape[-2:])}, expected {(grid_h, grid_w)}")
    patch_rows = grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim)
    return torch.cat((cls_row, patch_rows), dim=1).to(pos_embed.dtype)


class DinoVisionTransformer(nn.Module):
    """DINOv2 ViT with a class token and no registers, as used by Depth Anything V2."""

    def __init__(self, embed_dim: int, depth: int, num_heads: int, ffn: str) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + POS_GRID * POS_GRID, embed_dim))
        # Unused at inference; kept so the checkpoint's key set matches exactly.
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, ffn) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)

    def get_intermediate_layers(self, x: Tensor, layer_idx: list[int]) -> list[Tensor]:
        """Normed patch-token maps (B, D, H/14, W/14) of the selected blocks.

        The shared final norm is applied to each selected output (official ``norm=True``) and the
        class token is dropped, because the V2 head was trained on exactly that.
        """
        b, _, h, w = x.shape
        gh, gw = h // PATCH_SIZE, w // PATCH_SIZE
        tokens = self.patch_embed(x)
        tokens = torch.cat((self.cls_token.expand(b, -1, -1), tokens), dim=1)
        tokens = tokens + interpolate_pos_embed(self.pos_embed, gh, gw)

        wanted = set(layer_idx)
        outputs: list[Tensor] = []
        for i, block in enumerate(self.blocks[: max(layer_idx) + 1]):
            tokens = block(tokens)
            if i in wanted:
                outputs.append(tokens)
        return [self.norm(t)[:, 1:].transpose(1, 2).reshape(b, self.embed_dim, gh, gw) for t in outputs]


# --------------------------------------------------------------------------------------------
# DPT head
# --------------------------------------------------------------------------------------------


def _upsample(x: Tensor, size: tuple[int, int] | None) -> Tensor:
    # align_corners=True everywhere in the decoder: the official model was trained that way.
    if size is None:
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


class ResidualConvUnit(nn.Module):
    """Pre-activation residual unit.

    The ReLUs must not be in place: the first one would overwrite the unit's input, which is
    also the skip connection added back at the end.
    """

    def __init__(self, features: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1, bias=True)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1, bias=True)
        self.activation = nn.ReLU(inplace=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(self.activation(x))
        out = self.conv2(self.activation(out))
        return out + x


class FeatureFusionBlock(nn.Module):
    """Fuse the coarser path with a skip, upsample, then 1x1 ``out_conv`` (after the upsample)."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.out_conv = nn.Conv2d(features, features, 1, bias=True)
        # refinenet4 never receives a skip, but the checkpoint still holds resConfUnit1 for it.
        self.resConfUnit1 = ResidualConvUnit(features)
        self.resConfUnit2 = ResidualConvUnit(features)

    def forward(self, x: Tensor, skip: Tensor | None = None, size: tuple[int, int] | None = None) -> Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        return self.out_conv(_upsample(x, size))


class Scratch(nn.Module):
    """Container that exists only to reproduce the ``depth_head.scratch.*`` key prefix."""

    def __init__(self, in_channels: list[int], features: int, metric: bool) -> None:
        super().__init__()
        self.layer1_rn = nn.Conv2d(in_channels[0], features, 3, padding=1, bias=False)
        self.layer2_rn = nn.Conv2d(in_channels[1], features, 3, padding=1, bias=False)
        self.layer3_rn = nn.Conv2d(in_channels[2], features, 3, padding=1, bias=False)
        self.layer4_rn = nn.Conv2d(in_channels[3], features, 3, padding=1, bias=False)
        self.refinenet1 = FeatureFusionBlock(features)
        self.refinenet2 = FeatureFusionBlock(features)
        self.refinenet3 = FeatureFusionBlock(features)
        self.refinenet4 = FeatureFusionBlock(features)
        half = features // 2
        self.output_conv1 = nn.Conv2d(features, half, 3, padding=1)
        head: list[nn.Module] = [
            nn.Conv2d(half, 32, 3, padding=1),
            nn.ReLU(inplace=False),
            nn.Conv2d(32, 1, 1),
        ]
        # Metric heads squash to (0, 1) and are scaled by max_depth outside; relative heads keep
        # a non-negative disparity-like value. The trailing Identity mirrors the official index 4.
        head += [nn.Sigmoid()] if metric else [nn.ReLU(inplace=False), nn.Identity()]
        self.output_conv2 = nn.Sequential(*head)


class DPTHead(nn.Module):
    """Reassemble four token maps into a pyramid (x4, x2, x1, x0.5), fuse coarse-to-fine, predict."""

    def __init__(self, embed_dim: int, features: int, out_channels: list[int], metric: bool) -> None:
        super().__init__()
        self.projects = nn.ModuleList([nn.Conv2d(embed_dim, oc, 1) for oc in out_channels])
        self.resize_layers = nn.ModuleList(
            [
                nn.ConvTranspose2d(out_channels[0], out_channels[0], kernel_size=4, stride=4),
                nn.ConvTranspose2d(out_channels[1], out_channels[1], kernel_size=2, stride=2),
                nn.Identity(),
                nn.Conv2d(out_channels[3], out_channels[3], kernel_size=3, stride=2, padding=1),
            ]
        )
        self.scratch = Scratch(out_channels, features, metric)

    def forward(self, features: list[Tensor], grid_h: int, grid_w: int) -> Tensor:
        l1, l2, l3, l4 = [resize(proj(f)) for f, proj, resize in zip(features, self.projects, self.resize_layers)]
        s = self.scratch
        r1, r2, r3, r4 = s.layer1_rn(l1), s.layer2_rn(l2), s.layer3_rn(l3), s.layer4_rn(l4)
        # Explicit target sizes, not x2: the stride-2 conv rounds odd grids up.
        path = s.refinenet4(r4, size=r3.shape[2:])
        path = s.refinenet3(path, r3, size=r2.shape[2:])
        path = s.refinenet2(path, r2, size=r1.shape[2:])
        path = s.refinenet1(path, r1)
        out = s.output_conv1(path)
        out = _upsample(out, (grid_h * PATCH_SIZE, grid_w * PATCH_SIZE))
        return s.output_conv2(out)


# --------------------------------------------------------------------------------------------
# Full model
# --------------------------------------------------------------------------------------------


class DepthAnythingV2(nn.Module):
    """Depth Anything V2, relative or metric head, loadable from the official checkpoints.

    ``forward`` takes ImageNet-normalised RGB of shape (B, 3, H, W) with H and W multiples of 14
    and returns (B, H, W):

    - relative models (``metric=False``): the final ReLU output, an affine-invariant
      disparity-like value (larger means closer, arbitrary scale);
    - metric models (``metric=True``): the final **Sigmoid output in (0, 1), not yet multiplied
      by max_depth**. Depth in metres is ``forward(x) * max_depth``, which is exactly the
      official ``sigmoid(...) * max_depth``. The multiplication is left to the caller so that
      max_depth can be a per-request parameter instead of a property baked into the weights
      (20 is the Hypersim/indoor value, 80 the VKITTI/outdoor one).
    """

    def __init__(self, encoder: str = DEFAULT_ENCODER, metric: bool = False) -> None:
        super().__init__()
        if encoder not in ENCODER_CONFIGS:
            raise ValueError(f"unknown encoder {encoder!r}; expected one of {sorted(ENCODER_CONFIGS)}")
        cfg = ENCODER_CONFIGS[encoder]
        self.encoder = encoder
        self.metric = bool(metric)
        self.layer_idx = list(cfg["layer_idx"])
        self.pretrained = DinoVisionTransformer(cfg["embed_dim"], cfg["depth"], cfg["num_heads"], cfg["ffn"])
        self.depth_head = DPTHead(cfg["embed_dim"], cfg["features"], cfg["out_channels"], self.metric)

    def forward(self, pixel_values: Tensor) -> Tensor:
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"expected pixel_values of shape (B, 3, H, W), got {tuple(pixel_values.shape)}")
        h, w = pixel_values.shape[-2:]
        if h % PATCH_SIZE or w % PATCH_SIZE:
            raise ValueError(f"height and width must be multiples of {PATCH_SIZE}, got {h}x{w}")
        gh, gw = h // PATCH_SIZE, w // PATCH_SIZE
        features = self.pretrained.get_intermediate_layers(pixel_values, self.layer_idx)
        return self.depth_head(features, gh, gw).squeeze(1)

    def extra_repr(self) -> str:
        return f"encoder={self.encoder!r}, metric={self.metric}"
