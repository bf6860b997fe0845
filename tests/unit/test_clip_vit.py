"""CLIP ViT-B/16 (FaRL) and its preprocessing, checked against independent computations."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from facefuse.assets.synthetic.ofer_idrank import synthetic_clip_state
from facefuse.errors import InvalidInputError
from facefuse.face.farl_preprocess import CLIP_MEAN, CLIP_STD, farl_preprocess
from facefuse.models.clip_vit import ClipConfig, ClipViT, Float32LayerNorm

KEYS_DIR = Path(__file__).resolve().parents[1] / "data" / "official_keys"


def _official_rows(name: str) -> list[tuple[str, str, str]]:
    return [tuple(line.split("\t")) for line in (KEYS_DIR / name).read_text().splitlines() if line.strip()]


def _rows(module: nn.Module) -> list[tuple[str, str, str]]:
    return [(k, str(tuple(v.shape)), str(v.dtype).removeprefix("torch.")) for k, v in module.state_dict().items()]


@pytest.fixture(scope="module")
def clip_model() -> ClipViT:
    """ViT-B/16 with synthetic weights in the official format."""
    with torch.device("meta"):
        model = ClipViT()
    state = synthetic_clip_state(torch.Generator().manual_seed(11))
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def test_state_dict_is_the_official_302_keys_in_order() -> None:
    with torch.device("meta"):
        model = ClipViT()
    assert _rows(model) == _official_rows("idrank_farl.tsv")


# ------------------------------------------------------------------------------------------------
# RNG replay: construction draws from the default RNG exactly like CLIP.__init__ + initialize_parameters.

TINY = ClipConfig(embed_dim=24, image_resolution=32, vision_layers=2, vision_width=128, vision_patch_size=16,
                  context_length=7, vocab_size=50, text_width=32, text_heads=2, text_layers=2)


def _linear_default(out_f: int, in_f: int, bias: bool = True) -> list[torch.Tensor]:
    w = torch.empty(out_f, in_f)
    nn.init.kaiming_uniform_(w, a=math.sqrt(5))
    if not bias:
        return [w]
    bound = 1 / math.sqrt(in_f)
    return [w, torch.empty(out_f).uniform_(-bound, bound)]


def _block_draws(width: int) -> dict[str, torch.Tensor]:
    out_w, _ = _linear_default(width, width)          # MHA builds out_proj first ...
    in_w = torch.empty(3 * width, width)
    nn.init.xavier_uniform_(in_w)                       # ... then xavier on the packed in_proj
    fc_w, fc_b = _linear_default(4 * width, width)
    pr_w, pr_b = _linear_default(width, 4 * width)
    return {"attn.in_proj_weight": in_w, "attn.in_proj_bias": torch.zeros(3 * width),
            "attn.out_proj.weight": out_w, "attn.out_proj.bias": torch.zeros(width),
            "mlp.c_fc.weight": fc_w, "mlp.c_fc.bias": fc_b, "mlp.c_proj.weight": pr_w, "mlp.c_proj.bias": pr_b}


def test_construction_replays_official_rng_order() -> None:
    c = TINY
    torch.manual_seed(1234)
    expected: dict[str, torch.Tensor] = {}
    conv = torch.empty(c.vision_width, 3, c.vision_patch_size, c.vision_patch_size)
    nn.init.kaiming_uniform_(conv, a=math.sqrt(5))
    expected["visual.conv1.weight"] = conv
    scale = c.vision_width ** -0.5
    expected["visual.class_embedding"] = scale * torch.randn(c.vision_width)
    expected["visual.positional_embedding"] = scale * torch.randn(c.grid_size ** 2 + 1, c.vision_width)
    for i in range(c.vision_layers):
        for k, v in _block_draws(c.vision_width).items():
            expected[f"visual.transformer.resblocks.{i}.{k}"] = v
    expected["visual.proj"] = scale * torch.randn(c.vision_width, c.embed_dim)
    text_blocks = [_block_draws(c.text_width) for _ in range(c.text_layers)]
    token = torch.empty(c.vocab_size, c.text_width).normal_()
    # initialize_parameters
    token.normal_(std=0.02)
    expected["token_embedding.weight"] = token
    expected["positional_embedding"] = torch.empty(c.context_length, c.text_width).normal_(std=0.01)
    proj_std = c.text_width ** -0.5 * (2 * c.text_layers) ** -0.5
    for i, block in enumerate(text_blocks):
        block["attn.in_proj_weight"] = torch.empty(3 * c.text_width, c.text_width).normal_(std=c.text_width ** -0.5)
        block["attn.out_proj.weight"] = torch.empty(c.text_width, c.text_width).normal_(std=proj_std)
        block["mlp.c_fc.weight"] = torch.empty(4 * c.text_width, c.text_width).normal_(std=(2 * c.text_width) ** -0.5)
        block["mlp.c_proj.weight"] = torch.empty(c.text_width, 4 * c.text_width).normal_(std=proj_std)
        expected.update({f"transformer.resblocks.{i}.{k}": v for k, v in block.items()})
    expected["text_projection"] = torch.empty(c.text_width, c.embed_dim).normal_(std=c.text_width ** -0.5)
    expected["logit_scale"] = torch.tensor(math.log(1 / 0.07))
    state_after_replay = torch.get_rng_state()

    torch.manual_seed(1234)
    model = ClipViT(TINY)
    assert torch.equal(torch.get_rng_state(), state_after_replay)
    state = model.state_dict()
    for key, value in expected.items():
        assert torch.equal(state[key], value), key
    # everything not drawn is a LayerNorm at its default
    for key in set(state) - set(expected):
        assert ".ln_" in key or key.startswith(("ln_final", "visual.ln_")), key


# ------------------------------------------------------------------------------------------------
# Image tower against plain tensor ops in float64.

def _layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * w + b


def _reference_encode_image(
    state: dict[str, torch.Tensor], image: torch.Tensor, heads: int = 12, patch: int = 16
) -> torch.Tensor:
    s = {k: v.double() for k, v in state.items() if k.startswith("visual.")}
    x = image.double()
    b, _, h, w = x.shape
    gh, gw = h // patch, w // patch
    # patches in row-major grid order, each flattened (channel, row, col) like the conv weight
    patches = x.reshape(b, 3, gh, patch, gw, patch).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, 3 * patch * patch)
    conv_w = s["visual.conv1.weight"].reshape(s["visual.conv1.weight"].shape[0], -1)
    tokens = patches @ conv_w.T
    cls = s["visual.class_embedding"].expand(b, 1, -1)
    x = torch.cat([cls, tokens], dim=1) + s["visual.positional_embedding"]
    x = _layer_norm(x, s["visual.ln_pre.weight"], s["visual.ln_pre.bias"])
    width = x.shape[-1]
    hd = width // heads
    for i in range(12):
        p = f"visual.transformer.resblocks.{i}."
        hdn = _layer_norm(x, s[p + "ln_1.weight"], s[p + "ln_1.bias"])
        qkv = hdn @ s[p + "attn.in_proj_weight"].T + s[p + "attn.in_proj_bias"]
        q, k, v = (t.reshape(b, -1, heads, hd).transpose(1, 2) for t in qkv.split(width, dim=-1))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)
        o = (att @ v).transpose(1, 2).reshape(b, -1, width)
        x = x + o @ s[p + "attn.out_proj.weight"].T + s[p + "attn.out_proj.bias"]
        hdn = _layer_norm(x, s[p + "ln_2.weight"], s[p + "ln_2.bias"])
        f = hdn @ s[p + "mlp.c_fc.weight"].T + s[p + "mlp.c_fc.bias"]
        f = f * torch.sigmoid(1.702 * f)
        x = x + f @ s[p + "mlp.c_proj.weight"].T + s[p + "mlp.c_proj.bias"]
    cls_out = _layer_norm(x[:, 0], s["visual.ln_post.weight"], s["visual.ln_post.bias"])
    return cls_out @ s["visual.proj"]


def test_encode_image_matches_independent_computation(clip_model: ClipViT) -> None:
    image = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = clip_model.encode_image(image)
    ref = _reference_encode_image(clip_model.state_dict(), image)
    assert got.shape == (1, 512) and got.dtype == torch.float32
    assert torch.isfinite(got).all()
    assert float(ref.abs().max()) > 0.1  # not degenerate
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    assert abs(float(got.norm()) - 1.0) > 1e-3  # raw projection, not L2-normalised


def test_layer_norm_computes_in_float32() -> None:
    ln = Float32LayerNorm(64, eps=1e-5)
    with torch.no_grad():
        ln.weight.copy_(torch.linspace(0.5, 1.5, 64))
        ln.bias.copy_(torch.linspace(-0.1, 0.1, 64))
    x = (torch.randn(3, 64, generator=torch.Generator().manual_seed(2)) * 50 + 1000).to(torch.bfloat16)
    got = ln(x)
    assert got.dtype == torch.bfloat16
    ref = _layer_norm(x.double(), ln.weight.double(), ln.bias.double()).to(torch.bfloat16)
    assert torch.equal(got, ref)


# ------------------------------------------------------------------------------------------------
# Preprocessing (§1.5): shorter side -> 224 bicubic, centre crop, /255, CLIP mean/std.

def _normalised(crop_hwc: np.ndarray) -> np.ndarray:
    x = crop_hwc.astype(np.float64).transpose(2, 0, 1) / 255.0
    return (x - np.array(CLIP_MEAN).reshape(3, 1, 1)) / np.array(CLIP_STD).reshape(3, 1, 1)


def test_preprocess_224_crop_is_formula_only() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(224, 224, 3), dtype=np.uint8)
    image[0, 0] = (255, 0, 128)
    out = farl_preprocess(image)
    assert out.shape == (3, 224, 224) and out.dtype == np.float32
    np.testing.assert_allclose(out, _normalised(image), rtol=0, atol=2e-6)
    expected_pixel = [
        (255 / 255 - CLIP_MEAN[0]) / CLIP_STD[0],
        (0 - CLIP_MEAN[1]) / CLIP_STD[1],
        (128 / 255 - CLIP_MEAN[2]) / CLIP_STD[2],
    ]
    np.testing.assert_allclose(out[:, 0, 0], expected_pixel, atol=2e-6)


def test_preprocess_resizes_shorter_side_and_centre_crops() -> None:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=(300, 400, 3), dtype=np.uint8)  # H=300, W=400
    out = farl_preprocess(image)
    new_w = int(224 * 400 / 300)  # 298: shorter side to 224, longer truncated
    resized = np.asarray(Image.fromarray(image).resize((new_w, 224), Image.Resampling.BICUBIC))
    left = round((new_w - 224) / 2)  # 37
    np.testing.assert_allclose(out, _normalised(resized[:, left:left + 224]), rtol=0, atol=2e-6)


def test_preprocess_crop_offset_uses_python_rounding() -> None:
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, size=(224, 225, 3), dtype=np.uint8)  # no resize; (225-224)/2 = 0.5 rounds to 0
    out = farl_preprocess(image)
    np.testing.assert_allclose(out, _normalised(image[:, 0:224]), rtol=0, atol=2e-6)


@pytest.mark.parametrize(
    "bad",
    [np.zeros((224, 224), np.uint8), np.zeros((224, 224, 3), np.float32), np.zeros((224, 224, 4), np.uint8), "img"],
)
def test_preprocess_rejects_bad_input(bad: object) -> None:
    with pytest.raises(InvalidInputError):
        farl_preprocess(bad)  # type: ignore[arg-type]
