"""OFER IdGen's noise-prediction Unet over 300 FLAME 2020 shape coefficients.

The module tree mirrors the official one attribute for attribute, so the checkpoint's ``net`` section
(174 keys) loads with strict matching. The network treats a shape vector as a 1-D signal of length 1
with 300 channels; every "convolution" is a 1x1 convolution and every attention block attends over
16 independent q/k/v projections of the same vector instead of over positions.

Those 16 projections per attention block were never registered, trained or saved by the official
code: they are whatever PyTorch's default Conv1d init drew when the official model was built. Here
they live in a non-persistent buffer (``ProjectionAttention.projections``, shape (16, 384, dim)) that
loaders fill explicitly (see ``facefuse.assets.idgen_checkpoint``). Construction draws them from the
default RNG at the point where the official constructor draws its convs, so building an
``IdGenUnet`` consumes the RNG exactly as the official ``Unet`` does (the reproduce-official replay
relies on this).

Where the official code relies on ``squeeze()`` (which breaks batch size 1) this module reshapes with
the batch size made explicit, so a batch of one gives the same numbers as the matching row of a batch.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facefuse.models.diffusion import DDIMSampler, EpsModel, OfficialSampler, SamplingTables, VarianceSchedule

SHAPE_DIM = 300
CONTEXT_DIM = 512
TIME_DIM = 512
LEVEL_DIMS = (300, 50, 10)
NUM_PROJECTIONS = 16
ATTENTION_HEADS = 4
ATTENTION_DIM_HEAD = 32
ATTENTION_HIDDEN = ATTENTION_HEADS * ATTENTION_DIM_HEAD  # 128
SINUSOID_THETA = 10000

ATTENTION_BLOCK_NAMES: tuple[str, ...] = ("downs.0.2", "downs.1.2", "mid_attn", "ups.0.3", "ups.1.3", "finals.0.1")
"""The 6 attention blocks, in the order the official constructor builds them (and draws their q/k/v)."""


class PointwiseConv1d(nn.Conv1d):
    """The official 1x1 ``Conv1d`` (same parameters, keys, shapes and init RNG draws) that can run as a
    matrix product.

    PyTorch sends a 1x1 ``conv1d`` on a length-1 signal down its generic (slow) convolution path on the
    CPU; the same weights through ``F.linear`` give the same dot products in a different summation order
    (float rounding only, ~1e-6 relative). ``as_matmul`` is off by default, so the shipped numerics stay
    bit for bit; the fast numerics mode turns it on (:meth:`IdGenUnet.use_matmul`).
    """

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, 1, bias=bias)
        self.as_matmul = False

    def forward(self, x: Tensor) -> Tensor:
        if not self.as_matmul:
            return super().forward(x)
        weight = self.weight[..., 0]
        if x.shape[-1] == 1:
            return F.linear(x[..., 0], weight, self.bias)[..., None]
        return F.linear(x.transpose(1, 2), weight, self.bias).transpose(1, 2)


class SinusoidalTimeEmbedding(nn.Module):
    """sin/cos embedding of an integer timestep (may be -1), computed in the official order for bit-exactness."""

    def __init__(self, dim: int = TIME_DIM, theta: float = SINUSOID_THETA) -> None:
        super().__init__()
        self.dim = dim
        self.theta = theta

    def forward(self, t: Tensor) -> Tensor:
        half = self.dim // 2
        step = math.log(self.theta) / (half - 1)  # python float64
        # int64 arange times a python float gives float32; exp in float32; int64 t times float32 -> float32.
        frequencies = torch.exp(torch.arange(half, device=t.device) * -step)
        angles = t[:, None] * frequencies[None, :]
        return torch.cat((angles.sin(), angles.cos()), dim=-1)


class Block(nn.Module):
    """1x1 conv, GroupNorm(1, C), optional FiLM (x*(scale+1)+shift), SiLU."""

    def __init__(self, dim: int, dim_out: int) -> None:
        super().__init__()
        self.proj = PointwiseConv1d(dim, dim_out)
        self.norm = nn.GroupNorm(1, dim_out)
        self.act = nn.SiLU()

    def forward(self, x: Tensor, scale_shift: tuple[Tensor, Tensor] | None = None) -> Tensor:
        x = self.norm(self.proj(x))
        if scale_shift is not None:
            scale, shift = scale_shift
            x = x * (scale + 1) + shift
        return self.act(x)


class ResnetBlock(nn.Module):
    """Two Blocks with a FiLM from [time embedding ; identity context], plus a 1x1 residual projection."""

    def __init__(self, dim: int, dim_out: int, embedding_dim: int = TIME_DIM + CONTEXT_DIM) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(embedding_dim, dim_out * 2))
        self.block1 = Block(dim, dim_out)
        self.block2 = Block(dim_out, dim_out)
        self.res_conv: nn.Module = PointwiseConv1d(dim, dim_out) if dim != dim_out else nn.Identity()

    def forward(self, x: Tensor, embedding: Tensor | None = None, *, film: Tensor | None = None) -> Tensor:
        """``film``: this block's (B, 2*dim_out) ``mlp(embedding)``, computed beforehand (IdGenUnet.films)."""
        if film is None:
            if embedding is None:
                raise ValueError("ResnetBlock: give the embedding or its film")
            film = self.mlp(embedding)
        film = film.reshape(film.shape[0], film.shape[1], 1)
        scale, shift = film.chunk(2, dim=1)
        h = self.block1(x, (scale, shift))
        h = self.block2(h)
        return h + self.res_conv(x)


class RMSNorm(nn.Module):
    """x / max(||x||, 1e-12) over channels, times a learned gain and sqrt(C)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.g = nn.Parameter(torch.ones(1, dim, 1))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=1) * self.g * (x.shape[1] ** 0.5)


class PreNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn
        self.norm = RMSNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(self.norm(x))


class Residual(nn.Module):
    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x) + x


class ProjectionAttention(nn.Module):
    """Softmax attention whose "sequence" is 16 q/k/v projections of one vector (OFER's ``Attention``).

    ``projections`` (16, 384, dim) holds the 16 bias-free 1x1 q/k/v weights; it is deliberately not part
    of the state dict (the official checkpoints never contained them). Construction draws them with
    PyTorch's default Conv1d init from the default RNG *before* ``to_out`` and ``to_out_linear``, exactly
    where the official constructor draws its unregistered convs, so building the whole Unet consumes the
    RNG as the official one does. Loaders always replace them explicitly (:meth:`set_projections`).
    """

    projections: Tensor  # a non-persistent buffer

    def __init__(self, dim: int, num_projections: int = NUM_PROJECTIONS) -> None:
        super().__init__()
        self.dim = dim
        self.num_projections = num_projections
        self.scale = ATTENTION_DIM_HEAD ** -0.5
        projections = init_projections(num_projections, dim, generator=None)
        self.to_out = PointwiseConv1d(ATTENTION_HIDDEN, dim)
        self.as_matmul = False
        self.to_out_linear = nn.Linear(num_projections, 1)
        self.register_buffer("projections", projections, persistent=False)

    def set_projections(self, weights: Tensor) -> None:
        expected = (self.num_projections, 3 * ATTENTION_HIDDEN, self.dim)
        if weights.dim() == 4 and weights.shape[-1] == 1:
            weights = weights[..., 0]
        if tuple(weights.shape) != expected:
            raise ValueError(f"q/k/v projections: shape {tuple(weights.shape)}, expected {expected}")
        if not bool(torch.isfinite(weights).all()):
            raise ValueError("q/k/v projections: non-finite values")
        with torch.no_grad():
            self.projections.copy_(weights.to(device=self.projections.device, dtype=self.projections.dtype))

    def forward(self, u: Tensor) -> Tensor:
        batch = u.shape[0]
        # All 16 bias-free 1x1 convolutions in one call; each output channel is the same dot product the
        # official per-projection Conv1d computes (checked bit-exact against the loop in the tests).
        if self.as_matmul:  # fast numerics: the same products as one matrix product
            qkv = F.linear(u.reshape(batch, self.dim), self.projections.reshape(-1, self.dim))
        else:
            qkv = F.conv1d(u, self.projections.reshape(-1, self.dim, 1))  # (B, 16*384, 1)
        qkv = qkv.reshape(batch, self.num_projections, 3, ATTENTION_HEADS, ATTENTION_DIM_HEAD)
        q, k, v = (qkv[:, :, part].permute(0, 2, 3, 1).contiguous() for part in range(3))  # (B, heads, dim_head, 16)
        q = q * self.scale
        similarity = torch.einsum("b h d i, b h d j -> b h i j", q, k)
        attention = similarity.softmax(dim=-1)
        out = torch.einsum("b h i j, b h d j -> b h i d", attention, v)  # (B, heads, 16, dim_head)
        out = out.permute(0, 1, 3, 2).reshape(batch, ATTENTION_HIDDEN, self.num_projections)  # channel = h*32+d
        out = self.to_out(out)  # (B, dim, 16)
        return self.to_out_linear(out)  # (B, dim, 1)


def attention_block(dim: int) -> Residual:
    return Residual(PreNorm(dim, ProjectionAttention(dim)))


def dense_resampler(dim: int, dim_out: int) -> nn.Sequential:
    """OFER's Downsample/Upsample: Linear, SiLU, Linear on the (B, C) vector."""
    return nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim_out))


class IdGenUnet(nn.Module):
    """eps-prediction network: (x (B,300), t (B,) int64, context (B,512)) -> eps (B,300)."""

    def __init__(self) -> None:
        super().__init__()
        shape_dim = LEVEL_DIMS[0]
        in_out = list(itertools.pairwise(LEVEL_DIMS))
        self.init_conv = PointwiseConv1d(SHAPE_DIM, shape_dim)
        self.time_mlp = nn.Sequential(
            SinusoidalTimeEmbedding(TIME_DIM), nn.Linear(TIME_DIM, TIME_DIM), nn.GELU(), nn.Linear(TIME_DIM, TIME_DIM)
        )
        self.downs = nn.ModuleList(
            nn.ModuleList(
                [ResnetBlock(d_in, d_in), ResnetBlock(d_in, d_in), attention_block(d_in), dense_resampler(d_in, d_out)]
            )
            for d_in, d_out in in_out
        )
        mid = LEVEL_DIMS[-1]
        self.mid_block1 = ResnetBlock(mid, mid)
        self.mid_attn = attention_block(mid)
        self.mid_block2 = ResnetBlock(mid, mid)
        self.ups = nn.ModuleList(
            nn.ModuleList(
                [
                    dense_resampler(d_in, d_out),
                    ResnetBlock(2 * d_out, d_out),
                    ResnetBlock(2 * d_out, d_out),
                    attention_block(d_out),
                ]
            )
            for d_out, d_in in reversed(in_out)
        )
        self.finals = nn.ModuleList(
            [
                nn.ModuleList(
                    [
                        ResnetBlock(2 * shape_dim, shape_dim),
                        attention_block(shape_dim),
                        PointwiseConv1d(shape_dim, SHAPE_DIM),
                    ]
                )
            ]
        )

    def use_matmul(self, enabled: bool = True) -> IdGenUnet:
        """Compute every 1x1 convolution (and the q/k/v projections) as a matrix product (fast numerics)
        or as the official convolution (``enabled=False``: bit for bit the shipped layers)."""
        for module in self.modules():
            if isinstance(module, (PointwiseConv1d, ProjectionAttention)):
                module.as_matmul = enabled
        return self

    # --- the unregistered q/k/v projections ---------------------------------------------------------
    def attention_blocks(self) -> list[tuple[str, ProjectionAttention]]:
        """(name, attention) for the 6 attention blocks, in official construction order."""
        blocks = []
        for name in ATTENTION_BLOCK_NAMES:
            block = self.get_submodule(f"{name}.fn.fn")
            if not isinstance(block, ProjectionAttention):
                raise TypeError(f"{name}.fn.fn is a {type(block).__name__}, not ProjectionAttention")
            blocks.append((name, block))
        return blocks

    def set_projections(self, projections: Mapping[str, Tensor]) -> None:
        names = set(ATTENTION_BLOCK_NAMES)
        if set(projections) != names:
            raise ValueError(f"q/k/v projections: expected blocks {sorted(names)}, got {sorted(projections)}")
        for name, attention in self.attention_blocks():
            attention.set_projections(projections[name])

    def get_projections(self) -> dict[str, Tensor]:
        return {name: attention.projections.detach().clone() for name, attention in self.attention_blocks()}

    def resnet_blocks(self) -> list[ResnetBlock]:
        """The 11 ResnetBlocks in the order ``forward`` runs them (the order of :meth:`films`)."""
        blocks = [block for level in self.downs for block in list(level.children())[:2]]
        blocks += [self.mid_block1, self.mid_block2]
        blocks += [block for level in self.ups for block in list(level.children())[1:3]]
        blocks += [next(iter(level.children())) for level in self.finals]
        return blocks  # type: ignore[return-value]

    def films(self, t: Tensor, context: Tensor) -> list[Tensor]:
        """(R,) timesteps + (R, 512) contexts -> every ResnetBlock's FiLM rows (R, 2*dim_out), in forward order.

        The FiLMs depend on (t, context) only, and a face's N samples share both at every step, so a sampler
        can compute them on one row per face instead of one per sample (``IdGen.eps_model``): they hold
        56 % of the Unet's weights."""
        embedding = torch.cat([self.time_mlp(t), context], dim=1)
        return [block.mlp(embedding) for block in self.resnet_blocks()]

    # --- forward ------------------------------------------------------------------------------------
    def forward(self, x: Tensor, t: Tensor, context: Tensor, *, films: list[Tensor] | None = None) -> Tensor:
        """``films``: :meth:`films` of (t, context), (B, 2*dim_out) each, computed beforehand (or None)."""
        batch = x.shape[0]
        x = self.init_conv(x.reshape(batch, -1, 1))
        residual = x.clone()
        if films is None:
            embedding: Tensor | None = torch.cat([self.time_mlp(t), context], dim=1)
            film_of: Iterator[Tensor | None] = itertools.repeat(None)
        else:
            embedding = None
            film_of = iter(films)

        def resnet(block: nn.Module, h: Tensor) -> Tensor:
            return block(h, embedding, film=next(film_of))

        skips: list[Tensor] = []
        # Each level is a ModuleList; children() unpacks it in registration order with a Module type.
        for level in self.downs:
            block1, block2, attention, downsample = level.children()
            x = resnet(block1, x)
            skips.append(x)
            x = attention(resnet(block2, x))
            skips.append(x)
            x = downsample(x.reshape(batch, -1)).reshape(batch, -1, 1)
        x = resnet(self.mid_block1, x)
        x = self.mid_attn(x)
        x = resnet(self.mid_block2, x)
        for level in self.ups:
            upsample, block1, block2, attention = level.children()
            x = upsample(x.reshape(batch, -1)).reshape(batch, -1, 1)
            x = resnet(block1, torch.cat((x, skips.pop()), dim=1))
            x = resnet(block2, torch.cat((x, skips.pop()), dim=1))
            x = attention(x)
        x = torch.cat((x, residual), dim=1)
        for level in self.finals:
            block, attention, out_conv = level.children()
            x = out_conv(attention(resnet(block, x)))
        return x.reshape(batch, -1)


def init_projections(num_projections: int, dim: int, generator: torch.Generator | None) -> Tensor:
    """(num_projections, 384, dim) weights drawn one Conv1d(dim, 384, 1, bias=False) after another with
    PyTorch's default init (kaiming-uniform a=sqrt(5): U(-1/sqrt(dim), 1/sqrt(dim))); ``generator=None``
    draws from the default RNG, as module construction does."""
    weights = torch.empty(num_projections, 3 * ATTENTION_HIDDEN, dim, 1)
    for i in range(num_projections):
        nn.init.kaiming_uniform_(weights[i], a=math.sqrt(5), generator=generator)
    return weights[..., 0].contiguous()


def draw_default_projections(generator: torch.Generator) -> dict[str, Tensor]:
    """The 6 blocks' projections drawn from ``generator`` in official construction order."""
    return {
        name: init_projections(NUM_PROJECTIONS, dim, generator)
        for name, dim in zip(ATTENTION_BLOCK_NAMES, _attention_dims(), strict=True)
    }


def _attention_dims() -> tuple[int, ...]:
    mid, levels = LEVEL_DIMS[-1], LEVEL_DIMS[:-1]
    return (*levels, mid, *reversed(levels), LEVEL_DIMS[0])


ATTENTION_BLOCK_DIMS: dict[str, int] = dict(zip(ATTENTION_BLOCK_NAMES, _attention_dims(), strict=True))
"""Channel count of each attention block (300, 50, 10, 50, 300, 300)."""


class SharedFilmEps:
    """The Unet as an eps model that computes its FiLMs once per face and step (fast numerics).

    A face's N samples share the context and, at each step, the timestep, so every ResnetBlock's FiLM
    (56 % of the Unet's weights) is the same for all N. The sampler announces its timesteps
    (``prepare_steps``), and the FiLMs of all of them are computed in one batch over the distinct
    contexts (one row per face and step), then spread to the samples at each step. Same function as
    the plain eps model; the float rounding of the FiLM products differs (tests/unit/test_fast_networks.py)."""

    def __init__(self, net: IdGenUnet, context: Tensor) -> None:
        self.net = net
        self.device = context.device
        self.context = context
        self.rows, self.row_of_sample = torch.unique(context, dim=0, return_inverse=True)
        self._films: dict[int, list[Tensor]] = {}

    def prepare_steps(self, timesteps: Sequence[int]) -> None:
        steps = sorted(set(int(t) for t in timesteps))
        if not steps:
            return
        count = self.rows.shape[0]
        t = torch.tensor(steps, dtype=torch.long, device=self.device).repeat_interleave(count)
        films = self.net.films(t, self.rows.repeat(len(steps), 1))
        for index, step in enumerate(steps):
            self._films[step] = [film[index * count:(index + 1) * count] for film in films]

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        t = t.to(self.device)
        if t.ndim != 1 or not bool((t == t[0]).all()):  # not one step for all: nothing to share
            return self.net(x.to(self.device), t, self.context).to(x.device)
        step = int(t[0])
        films = self._films.pop(step, None)
        if films is None:  # a step that was not announced: its FiLMs alone
            films = self.net.films(t[:1].expand(self.rows.shape[0]), self.rows)
        spread = [film[self.row_of_sample] for film in films]
        return self.net(x.to(self.device), t, self.context, films=spread).to(x.device)


class IdGen(nn.Module):
    """OFER IdGen: ArcFace identity context -> N sampled FLAME shapes (300 coefficients each).

    Holds the ArcFace encoder, the Unet (``net``) and the schedule (``var_sched``) under the official
    attribute names. Sampling is delegated to a sampler object (see ``facefuse.models.diffusion``).
    """

    def __init__(self, arcface: nn.Module, net: IdGenUnet, var_sched: VarianceSchedule) -> None:
        super().__init__()
        self.arcface = arcface
        self.net = net
        self.var_sched = var_sched
        self.load_report: dict[str, object] = {}
        self.shared_films = False  # fast numerics: FiLMs once per face and step (eps_model), not per sample

    def context(self, blob: Tensor, *, apply_features: bool = True) -> Tensor:
        """L2-normalised ArcFace embedding (B, 512). OFER's IdGen always runs ArcFace on a batch of 10
        or 100 copies, so its ``features`` BatchNorm is applied; facefuse does the same at any batch size."""
        return F.normalize(self.arcface(blob, apply_features=apply_features), dim=1)

    def eps_model(self, context: Tensor) -> EpsModel:
        """The network bound to a (B, 512) context, as the samplers call it: (x, t) -> eps.

        Samplers keep their state and noise on the CPU (so a seeded CPU generator reproduces a run on any
        device); inputs go to the network's device and the prediction comes back.
        """
        device = self.net.init_conv.weight.device
        context = context.to(device)
        if not self.shared_films:
            def predict(x: Tensor, t: Tensor) -> Tensor:
                return self.net(x.to(device), t.to(device), context).to(x.device)

            return predict
        # Fast numerics: the FiLMs on one row per face, for every step at once, spread to the samples.
        return SharedFilmEps(self.net, context)

    @torch.inference_mode()
    def sample(
        self,
        context: Tensor,
        num_samples: int,
        sampler: OfficialSampler | DDIMSampler | None = None,
        generator: torch.Generator | None = None,
        **sampler_options,
    ) -> Tensor:
        """(N, 300) float64 shapes for one identity (context (1, 512), repeated) or per-sample contexts (N, 512).

        ``sampler`` defaults to facefuse's DDIM; pass ``OfficialSampler()`` to reproduce OFER's loop.
        ``sampler_options`` are the sampler's keyword hooks (initial_noise, x0_start, t0, guide_target,
        guide_strength, callback, ...).
        """
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if context.dim() != 2 or context.shape[1] != CONTEXT_DIM or context.shape[0] not in (1, num_samples):
            raise ValueError(f"context: shape {tuple(context.shape)}, expected (1 or {num_samples}, {CONTEXT_DIM})")
        context = context.to(torch.float32).expand(num_samples, CONTEXT_DIM).contiguous()
        sampler = DDIMSampler() if sampler is None else sampler
        tables = SamplingTables.of(self.var_sched)
        return sampler.sample(self.eps_model(context), tables, num_samples, generator=generator, **sampler_options)
