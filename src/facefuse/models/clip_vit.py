"""CLIP ViT-B/16 (the FaRL image encoder that conditions OFER IdRank), whole model, official key names.

OFER loads FaRL's weights into OpenAI's full CLIP model and saves that whole model as the ``farl``
section of ``model_idrank.tar`` (302 keys, text tower included). To load that section strictly the
module tree here holds both towers, but only the image tower is ever run: IdRank consumes
``encode_image`` (the 512-d visual projection, not normalised). There is no ``encode_text``.

Numerics follow the official model: conv patch embedding, class token, positional embedding,
``ln_pre``, 12 pre-LN residual blocks whose attention is ``torch.nn.MultiheadAttention`` itself
(sequence-first layout, packed ``in_proj`` (2304,768), 12 heads, no mask, same call), QuickGELU MLP,
``ln_post`` on the class token, then ``@ proj``. LayerNorms (eps 1e-5) compute in float32.

RNG replay (for OFER's reproduce-official mode, where later random draws depend on how much of the
default torch RNG the IdRank constructor consumed): constructing :class:`ClipViT` consumes the
default RNG in the order of OpenAI's ``CLIP.__init__`` followed by its ``initialize_parameters``
(facts read from ``openai/CLIP`` ``clip/model.py``; no code copied). What is matched:

1. image tower: ``conv1`` default Conv2d init (weight only, no bias); ``class_embedding`` =
   ``width**-0.5 * randn(width)``; ``positional_embedding`` = ``width**-0.5 * randn(197, width)``;
   ``ln_pre`` (no RNG); 12 blocks, each: ``nn.MultiheadAttention`` construction (its ``out_proj``
   Linear default init, then xavier-uniform ``in_proj_weight``; biases zeroed), ``c_fc`` then
   ``c_proj`` default Linear inits (LayerNorms draw nothing); ``ln_post``; ``proj`` =
   ``width**-0.5 * randn(width, 512)``;
2. text tower: 12 blocks of width 512 built the same way (the causal mask draws nothing);
   ``token_embedding`` default Embedding init (standard normal); ``positional_embedding`` and
   ``text_projection`` are uninitialised (no RNG); ``logit_scale`` = log(1/0.07);
3. ``initialize_parameters``: normal(std 0.02) on ``token_embedding.weight``; normal(std 0.01) on
   ``positional_embedding``; then for each *text* block: normal on ``attn.in_proj_weight``
   (std width^-0.5), ``attn.out_proj.weight`` (std width^-0.5 * (2*layers)^-0.5), ``mlp.c_fc.weight``
   (std (2*width)^-0.5), ``mlp.c_proj.weight`` (std as out_proj); finally normal on
   ``text_projection`` (std width^-0.5). The image tower is not re-initialised.

Checkpoint loading draws nothing, so only the RNG state after construction matters.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor, nn

CLIP_IMAGE_SIZE = 224
CLIP_EMBED_DIM = 512
LAYER_NORM_EPS = 1e-5


@dataclass(frozen=True)
class ClipConfig:
    """Sizes of a CLIP ViT model; the defaults are ViT-B/16 as used by FaRL and OFER."""

    embed_dim: int = CLIP_EMBED_DIM
    image_resolution: int = CLIP_IMAGE_SIZE
    vision_layers: int = 12
    vision_width: int = 768
    vision_patch_size: int = 16
    context_length: int = 77
    vocab_size: int = 49408
    text_width: int = 512
    text_heads: int = 8
    text_layers: int = 12

    @property
    def vision_heads(self) -> int:
        return self.vision_width // 64

    @property
    def grid_size(self) -> int:
        return self.image_resolution // self.vision_patch_size


VIT_B16 = ClipConfig()


class Float32LayerNorm(nn.LayerNorm):
    """LayerNorm evaluated in float32 whatever the input dtype, then cast back (as CLIP does for fp16)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.float()).to(x.dtype)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation CLIP was trained with (not nn.GELU)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN block: x + attn(ln_1(x)), then x + mlp(ln_2(x)). Input is sequence-first (L, B, D)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = Float32LayerNorm(width, eps=LAYER_NORM_EPS)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, width * 4)),
            ("gelu", QuickGELU()),
            ("c_proj", nn.Linear(width * 4, width)),
        ]))
        self.ln_2 = Float32LayerNorm(width, eps=LAYER_NORM_EPS)

    def forward(self, x: Tensor) -> Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=None)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x: Tensor) -> Tensor:
        return self.resblocks(x)


class VisionTransformer(nn.Module):
    """CLIP image tower: 16x16 patches + class token -> 12 blocks -> ln_post(class token) @ proj."""

    def __init__(self, config: ClipConfig) -> None:
        super().__init__()
        width = config.vision_width
        self.input_resolution = config.image_resolution
        self.conv1 = nn.Conv2d(
            3, width, kernel_size=config.vision_patch_size, stride=config.vision_patch_size, bias=False
        )
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(config.grid_size ** 2 + 1, width))
        self.ln_pre = Float32LayerNorm(width, eps=LAYER_NORM_EPS)
        self.transformer = Transformer(width, config.vision_layers, config.vision_heads)
        self.ln_post = Float32LayerNorm(width, eps=LAYER_NORM_EPS)
        self.proj = nn.Parameter(scale * torch.randn(width, config.embed_dim))

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)                                   # (B, width, grid, grid)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # (B, grid², width), row-major patches
        cls = self.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype, device=x.device)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x)
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)  # blocks run sequence-first
        return self.ln_post(x[:, 0, :]) @ self.proj


class ClipViT(nn.Module):
    """Whole CLIP model (302 state-dict keys for ViT-B/16); only ``encode_image`` is executed."""

    def __init__(self, config: ClipConfig = VIT_B16) -> None:
        super().__init__()
        self.config = config
        self.visual = VisionTransformer(config)
        # Text tower: present so the official whole-model state dict loads strictly; never run.
        self.transformer = Transformer(config.text_width, config.text_layers, config.text_heads)
        self.token_embedding = nn.Embedding(config.vocab_size, config.text_width)
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, config.text_width))
        self.ln_final = Float32LayerNorm(config.text_width, eps=LAYER_NORM_EPS)
        self.text_projection = nn.Parameter(torch.empty(config.text_width, config.embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))
        self._official_initialize_parameters()

    @torch.no_grad()
    def _official_initialize_parameters(self) -> None:
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        width, layers = self.transformer.width, self.transformer.layers
        attn_std = width ** -0.5
        proj_std = width ** -0.5 * (2 * layers) ** -0.5
        fc_std = (2 * width) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.get_parameter("attn.in_proj_weight"), std=attn_std)
            nn.init.normal_(block.get_parameter("attn.out_proj.weight"), std=proj_std)
            nn.init.normal_(block.get_parameter("mlp.c_fc.weight"), std=fc_std)
            nn.init.normal_(block.get_parameter("mlp.c_proj.weight"), std=proj_std)
        nn.init.normal_(self.text_projection, std=width ** -0.5)

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def encode_image(self, image: Tensor) -> Tensor:
        """(B,3,224,224) CLIP-normalised image -> (B,512) float32 visual projection, not L2-normalised.

        The image is cast to the tower's dtype; the result always comes back as float32 (a no-op for the
        shipped float32 model), so a half-precision tower (:func:`half_precision_image_tower`) is a drop-in."""
        return self.visual(image.to(self.dtype)).float()


def half_precision_image_tower(model: ClipViT, dtype: torch.dtype = torch.float16) -> ClipViT:
    """Cast the image tower's matrices, embeddings and projection to ``dtype`` in place (fast numerics on a
    GPU); its LayerNorms keep float32 weights and compute in float32, as CLIP's own fp16 mode does. The text
    tower is never run and stays as it is. Returns ``model``."""
    for module in model.visual.modules():
        if isinstance(module, nn.LayerNorm):
            continue
        for parameter in module.parameters(recurse=False):
            parameter.data = parameter.data.to(dtype)
    return model
