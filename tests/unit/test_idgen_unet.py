"""IdGen Unet: key layout, forward against an independent numpy computation of the documented formulas
(architecture reference §5.3), batch-1 behaviour, RNG-faithful construction, default projections."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.special import erf
from torch import nn

from facefuse.assets.synthetic.ofer_idgen import STRAY_QKV_SUFFIX, idgen_net_state
from facefuse.models.idgen import ATTENTION_BLOCK_NAMES, IdGenUnet, SinusoidalTimeEmbedding, draw_default_projections


@pytest.fixture(scope="module")
def unet() -> IdGenUnet:
    """A Unet with synthetic-checkpoint weights (strictly loaded) and seeded projections."""
    state = idgen_net_state(torch.Generator().manual_seed(3))
    state = {k: v for k, v in state.items() if not k.endswith(STRAY_QKV_SUFFIX)}
    with torch.device("meta"):
        net = IdGenUnet()
    net = net.to_empty(device="cpu")
    net.load_state_dict(state, strict=True)
    net.set_projections(draw_default_projections(torch.Generator().manual_seed(11)))
    return net.eval()


def test_state_dict_keys_match_official_before_forward(official_keys) -> None:
    with torch.device("meta"):
        net = IdGenUnet()
    mine = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in net.state_dict().items()}
    official = {k: (s, d) for k, s, d in official_keys("idgen_net_before_forward")}
    assert mine == official
    assert sum(p.numel() for p in net.parameters()) == 6_246_954


# --- independent numpy reference (float64) ---------------------------------------------------------
def _np(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().double().numpy() for k, v in state.items()}


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _groupnorm_1(x, w, b):
    mean = x.mean(axis=1, keepdims=True)
    var = x.var(axis=1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-5) * w + b


def _conv1x1(x, w, b=None):
    y = x @ w[:, :, 0].T
    return y if b is None else y + b


def _resnet(p, prefix, x, emb):
    film = _silu(emb) @ p[f"{prefix}.mlp.1.weight"].T + p[f"{prefix}.mlp.1.bias"]
    c = film.shape[1] // 2
    scale, shift = film[:, :c], film[:, c:]
    h = _groupnorm_1(_conv1x1(x, p[f"{prefix}.block1.proj.weight"], p[f"{prefix}.block1.proj.bias"]),
                     p[f"{prefix}.block1.norm.weight"], p[f"{prefix}.block1.norm.bias"])
    h = _silu(h * (scale + 1) + shift)
    h = _silu(_groupnorm_1(_conv1x1(h, p[f"{prefix}.block2.proj.weight"], p[f"{prefix}.block2.proj.bias"]),
                           p[f"{prefix}.block2.norm.weight"], p[f"{prefix}.block2.norm.bias"]))
    res = (
        _conv1x1(x, p[f"{prefix}.res_conv.weight"], p[f"{prefix}.res_conv.bias"])
        if f"{prefix}.res_conv.weight" in p
        else x
    )
    return h + res


def _attention_residual(p, proj, prefix, u):
    """Residual(PreNorm(Attention)): u + Attn(RMSNorm(u)), attention over the 16 projections."""
    c = u.shape[1]
    n = (
        u
        / np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-12)
        * p[f"{prefix}.fn.norm.g"][0, :, 0]
        * math.sqrt(c)
    )
    qkv = np.einsum("pkc,bc->bpk", proj, n)  # (B, 16, 384)
    b = u.shape[0]
    q = qkv[:, :, 0:128].reshape(b, 16, 4, 32)
    k = qkv[:, :, 128:256].reshape(b, 16, 4, 32)
    v = qkv[:, :, 256:384].reshape(b, 16, 4, 32)
    s = np.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(32)
    a = np.exp(s - s.max(axis=-1, keepdims=True))
    a = a / a.sum(axis=-1, keepdims=True)
    o = np.einsum("bhij,bjhd->bhdi", a, v).reshape(b, 128, 16)  # channel h*32 + d
    y = (
        np.einsum("oc,bcn->bon", p[f"{prefix}.fn.fn.to_out.weight"][:, :, 0], o)
        + p[f"{prefix}.fn.fn.to_out.bias"][None, :, None]
    )
    z = y @ p[f"{prefix}.fn.fn.to_out_linear.weight"][0] + p[f"{prefix}.fn.fn.to_out_linear.bias"][0]
    return z + u


def _time_embedding(t):
    k = np.arange(256)
    angles = t[:, None].astype(np.float64) * np.exp(-k * math.log(10000) / 255)[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def reference_unet(state, projections, x, t, c):
    p = _np(state)
    proj = {k: v.double().numpy() for k, v in projections.items()}
    lin = lambda h, name: h @ p[f"{name}.weight"].T + p[f"{name}.bias"]  # noqa: E731
    x = _conv1x1(x, p["init_conv.weight"], p["init_conv.bias"])
    r = x.copy()
    temb = _time_embedding(t)
    temb = lin(temb, "time_mlp.1")
    temb = lin(0.5 * temb * (1 + erf(temb / math.sqrt(2))), "time_mlp.3")
    emb = np.concatenate([temb, c], axis=1)
    stack = []
    for level in ("downs.0", "downs.1"):
        x = _resnet(p, f"{level}.0", x, emb)
        stack.append(x)
        x = _resnet(p, f"{level}.1", x, emb)
        x = _attention_residual(p, proj[f"{level}.2"], f"{level}.2", x)
        stack.append(x)
        x = lin(_silu(lin(x, f"{level}.3.0")), f"{level}.3.2")
    x = _resnet(p, "mid_block1", x, emb)
    x = _attention_residual(p, proj["mid_attn"], "mid_attn", x)
    x = _resnet(p, "mid_block2", x, emb)
    for level in ("ups.0", "ups.1"):
        x = lin(_silu(lin(x, f"{level}.0.0")), f"{level}.0.2")
        x = _resnet(p, f"{level}.1", np.concatenate([x, stack.pop()], axis=1), emb)
        x = _resnet(p, f"{level}.2", np.concatenate([x, stack.pop()], axis=1), emb)
        x = _attention_residual(p, proj[f"{level}.3"], f"{level}.3", x)
    x = np.concatenate([x, r], axis=1)
    x = _resnet(p, "finals.0.0", x, emb)
    x = _attention_residual(p, proj["finals.0.1"], "finals.0.1", x)
    return _conv1x1(x, p["finals.0.2.weight"], p["finals.0.2.bias"])


def test_forward_matches_documented_formulas(unet: IdGenUnet) -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 300, generator=g)
    t = torch.tensor([999, 3, -1])
    c = F.normalize(torch.randn(3, 512, generator=g), dim=1)
    with torch.no_grad():
        mine = unet(x, t, c).double().numpy()
    expected = reference_unet(
        unet.state_dict(), unet.get_projections(), x.double().numpy(), t.numpy(), c.double().numpy()
    )
    assert mine.shape == (3, 300)
    scale = np.abs(expected).max()
    assert scale > 0.1
    np.testing.assert_allclose(mine, expected, rtol=0, atol=2e-5 * scale)


def test_batch_one_equals_row_of_batch(unet: IdGenUnet) -> None:
    g = torch.Generator().manual_seed(6)
    x = torch.randn(4, 300, generator=g)
    t = torch.tensor([999, 500, 3, -1])
    c = F.normalize(torch.randn(4, 512, generator=g), dim=1)
    with torch.no_grad():
        batch = unet(x, t, c)
        for i in range(4):
            single = unet(x[i : i + 1], t[i : i + 1], c[i : i + 1])
            assert single.shape == (1, 300)
            torch.testing.assert_close(single[0], batch[i], rtol=1e-5, atol=1e-5)


def test_time_embedding_official_order() -> None:
    """ω = exp(int64 arange · (−γ)) in float32, then int64 t · ω in float32 (sin block first)."""
    t = torch.tensor([-1, 0, 3, 999])
    gamma = math.log(10000) / 255
    omega = np.exp((np.arange(256).astype(np.float32) * np.float32(-gamma)).astype(np.float32))
    angles = (t.numpy()[:, None].astype(np.float32) * omega[None, :]).astype(np.float32)
    expected32 = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
    ideal = _time_embedding(t.numpy())
    got = SinusoidalTimeEmbedding(512)(t)
    assert got.dtype == torch.float32 and got.shape == (4, 512)
    # small |t|: float32 emulation of the documented order, to float32 rounding
    np.testing.assert_allclose(got.numpy()[:3], expected32[:3], rtol=0, atol=2e-6)
    # t = 999: the float32 angle (up to ~1000 rad) carries ~1e-4 absolute rounding, as upstream
    np.testing.assert_allclose(got.numpy(), ideal, rtol=0, atol=3e-4)
    assert np.abs(got.numpy()[3] - ideal[3]).max() > 0  # float32 arithmetic, not float64


def test_fused_projections_equal_per_projection_convolutions(unet: IdGenUnet) -> None:
    """The 16 convs computed in one call give the official per-conv values (bit-exact on this CPU)."""
    attention = unet.get_submodule("downs.0.2").fn.fn
    u = torch.randn(5, 300, 1, generator=torch.Generator().manual_seed(8))
    per_conv = torch.stack([F.conv1d(u, attention.projections[i].unsqueeze(-1)) for i in range(16)], dim=1)
    fused = F.conv1d(u, attention.projections.reshape(-1, 300, 1)).reshape(5, 16, 384, 1)
    torch.testing.assert_close(fused, per_conv, rtol=0, atol=1e-6)


def test_construction_consumes_rng_like_official_unet() -> None:
    """Independent shadow of the official construction order (§9): the 16 bias-free q/k/v convs of each
    Attention come before its to_out / to_out_linear; ResnetBlock = mlp Linear, block1/block2 convs, res_conv."""

    def resnet(d_in: int, d_out: int) -> None:
        nn.Linear(1024, 2 * d_out), nn.Conv1d(d_in, d_out, 1), nn.Conv1d(d_out, d_out, 1)
        if d_in != d_out:
            nn.Conv1d(d_in, d_out, 1)

    captured: list[torch.Tensor] = []

    def attention(d: int) -> None:
        convs = [nn.Conv1d(d, 384, 1, bias=False) for _ in range(16)]
        captured.append(torch.stack([c.weight.detach()[:, :, 0] for c in convs]))
        nn.Conv1d(128, d, 1), nn.Linear(16, 1)

    torch.manual_seed(1234)
    nn.Conv1d(300, 300, 1), nn.Linear(512, 512), nn.Linear(512, 512)
    for d_in, d_out in ((300, 50), (50, 10)):
        resnet(d_in, d_in), resnet(d_in, d_in), attention(d_in)
        nn.Linear(d_in, d_in), nn.Linear(d_in, d_out)
    resnet(10, 10), attention(10), resnet(10, 10)
    for d_in, d_out in ((10, 50), (50, 300)):
        nn.Linear(d_in, d_in), nn.Linear(d_in, d_out)
        resnet(2 * d_out, d_out), resnet(2 * d_out, d_out), attention(d_out)
    resnet(600, 300), attention(300), nn.Conv1d(300, 300, 1)
    shadow_state = torch.random.get_rng_state()

    torch.manual_seed(1234)
    net = IdGenUnet()
    assert torch.equal(torch.random.get_rng_state(), shadow_state)
    mine = net.get_projections()
    for name, expected in zip(ATTENTION_BLOCK_NAMES, captured, strict=True):
        assert torch.equal(mine[name], expected), name


def test_default_projections_distribution_and_determinism() -> None:
    a = draw_default_projections(torch.Generator().manual_seed(0))
    b = draw_default_projections(torch.Generator().manual_seed(0))
    c = draw_default_projections(torch.Generator().manual_seed(1))
    for name in ATTENTION_BLOCK_NAMES:
        assert torch.equal(a[name], b[name])
        assert not torch.equal(a[name], c[name])
    # Same stream as PyTorch's default Conv1d init: kaiming-uniform a=sqrt(5) -> U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    g = torch.Generator().manual_seed(0)
    gain = math.sqrt(2.0 / (1 + 5))
    bound = math.sqrt(3.0) * gain / math.sqrt(300)
    first = torch.empty(384, 300, 1).uniform_(-bound, bound, generator=g)
    assert torch.equal(a["downs.0.2"][0], first[:, :, 0])
    assert float(a["downs.0.2"].abs().max()) <= 1 / math.sqrt(300) + 1e-7
