"""OFER IdRank: scores candidate FLAME shapes against an image's identity context.

Three pieces, all with the official key names so ``model_idrank.tar`` loads strictly:

* ``farl``: CLIP ViT-B/16 with FaRL weights (:class:`~facefuse.models.clip_vit.ClipViT`);
* ``arcface``: IResNet-100 (:class:`~facefuse.models.arcface.IResNet100`);
* ``net``: :class:`RankMLPNet`, five context-modulated MLP layers 10710 -> 4096 -> 1024 -> 256 -> 64 -> 1.

Features (``rank_features``): candidate meshes in metres are scaled to millimetres, restricted to
the 1785 front-face vertices, and each candidate n becomes x_n = [mu ; R_n] flattened vertex-major
(xyz interleaved), where mu is the mean front mesh over *all provided candidates* and
R_n = P_n - mu. The context is c = [FaRL(image) (512) ; normalize(ArcFace(blob)) (512)], FaRL first,
shared by every candidate.

Order independence: every layer works row by row (GroupNorm normalises within a row) and mu is a
symmetric function of the pool, so permuting the candidates permutes the scores (up to float
rounding in the mean). The pool size N is free: a MICA shape can join the IdGen samples. Adding or
removing a candidate changes mu and therefore every candidate's features and score; scores are
comparable only within one pool. With N = 1 the official network skips GroupNorm (it is applied
only when there is more than one row) and R is zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facefuse.errors import InvalidInputError
from facefuse.models.arcface import ARCFACE_INPUT_SIZE, IResNet100
from facefuse.models.clip_vit import CLIP_EMBED_DIM, CLIP_IMAGE_SIZE, ClipViT
from facefuse.models.flame import METRES_TO_MM

FRONT_VERTEX_COUNT = 1785
FEATURE_DIM = 2 * FRONT_VERTEX_COUNT * 3  # 10710 = [mu ; R] x 1785 vertices x xyz
CONTEXT_DIM = 2 * CLIP_EMBED_DIM          # 1024 = FaRL 512 + ArcFace 512
RANK_WIDTHS = (FEATURE_DIM, 4096, 1024, 256, 64, 1)
GROUP_NORM_GROUPS = 8


class ScaleShiftRankLayer(nn.Module):
    """y = GN(SELU(mlp(x))) * sigmoid(scale(c)) + shift(c); the last layer has no SELU and no GN.

    Equivalent to OFER's ``ScaleShiftGNMLPLayerRank``: SELU despite the official attribute name
    ``silu``; ``shift`` has no bias; GroupNorm(8) only when more than one row is given (as the
    official forward does). The context is a Linear input, so it modulates per output channel.
    """

    def __init__(
        self, dim_in: int, dim_out: int, dim_ctx: int, *, is_last: bool, groups: int = GROUP_NORM_GROUPS
    ) -> None:
        super().__init__()
        self.is_last = is_last
        # Construction order mlp, scale, shift matches the official RNG consumption.
        self.mlp = nn.Linear(dim_in, dim_out)
        self.scale = nn.Linear(dim_ctx, dim_out)
        self.shift = nn.Linear(dim_ctx, dim_out, bias=False)
        self.activation = nn.SELU()
        self.gn = None if is_last else nn.GroupNorm(groups, dim_out)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        return self.modulate(self.mlp(x), context)

    def modulate(self, y: Tensor, context: Tensor) -> Tensor:
        """Everything after ``mlp``. ``context`` is one row per row of ``y``, or a single row for all of them."""
        if not self.is_last:
            y = self.activation(y)
            if self.gn is not None and y.shape[0] > 1:
                y = self.gn(y)
        return y * torch.sigmoid(self.scale(context)) + self.shift(context)


class RankMLPNet(nn.Module):
    """OFER's ``RankMLPNet`` at test time: (N,10710) features + (1,1024) context -> (N,) raw scores.

    The official forward also returns a softmax over the N scores; its argmax equals the raw argmax,
    so only raw scores are returned here.
    """

    def __init__(self, widths: tuple[int, ...] = RANK_WIDTHS, context_dim: int = CONTEXT_DIM) -> None:
        super().__init__()
        last = len(widths) - 2
        self.ranklayers = nn.ModuleList(
            ScaleShiftRankLayer(widths[i], widths[i + 1], context_dim, is_last=i == last)
            for i in range(len(widths) - 1)
        )

    def forward(self, features: Tensor, context: Tensor) -> Tensor:
        context = context.repeat(features.shape[0], 1)  # tiled per candidate, as OFER does
        x = features
        for layer in self.ranklayers:
            x = layer(x, context)
        return x.reshape(-1)

    def forward_pool(self, mean: Tensor, residuals: Tensor, context: Tensor) -> Tensor:
        """The scores of ``forward`` on rows [mean ; residual_n], up to float rounding, at about half the work.

        (1,H) mean + (N,H) residuals + (1,1024) context -> (N,) raw scores. Every row shares the mean half of
        the features and the whole context, so the first layer's product with the mean half, and every
        layer's scale and shift, are computed once for the pool instead of once per candidate (the first
        layer, 10710 -> 4096, is most of the network's cost). The weights are used as loaded (views of the
        first layer's matrix), so the official keys and the shipped ``forward`` are untouched."""
        first: ScaleShiftRankLayer = self.ranklayers[0]  # type: ignore[assignment]
        half = first.mlp.in_features // 2
        if mean.shape != (1, half) or residuals.ndim != 2 or residuals.shape[1] != half or context.shape[0] != 1:
            raise InvalidInputError(f"forward_pool: expected a (1,{half}) mean, (N,{half}) residuals and a (1,C) "
                                    f"context, got {tuple(mean.shape)}, {tuple(residuals.shape)}, "
                                    f"{tuple(context.shape)}")
        weight = first.mlp.weight
        y = F.linear(residuals, weight[:, half:]) + F.linear(mean, weight[:, :half], first.mlp.bias)
        x = first.modulate(y, context)
        for layer in list(self.ranklayers)[1:]:
            x = layer(x, context)
        return x.reshape(-1)


def rank_pool(vertices_m: Tensor, front_indices: Tensor) -> tuple[Tensor, Tensor]:
    """(N,V,3) candidate meshes in metres -> mu (1,5355) and R (N,5355) float32, vertex-major (xyz interleaved).

    Order as in OFER: scale to mm, select the front vertices, mean over candidates, residuals.
    """
    front_mm = (vertices_m.float() * METRES_TO_MM)[:, front_indices, :]  # (N, F, 3)
    mean = front_mm.mean(dim=0, keepdim=True)                            # (1, F, 3)
    residual = front_mm - mean
    return mean.reshape(1, -1), residual.reshape(front_mm.shape[0], -1)


def rank_features(vertices_m: Tensor, front_indices: Tensor) -> Tensor:
    """(N,V,3) candidate meshes in metres -> (N,10710) float32 features [mu ; R_n], the official network's input."""
    mean, residual = rank_pool(vertices_m, front_indices)
    return torch.cat([mean.expand_as(residual), residual], dim=1)


class IdRank(nn.Module):
    """The IdRank model: context encoders (FaRL CLIP + ArcFace), the score net, the front vertices.

    Construction consumes the default torch RNG in the official order (CLIP, ArcFace, RankMLPNet),
    which OFER's reproduce-official replay relies on.
    """

    front_indices: Tensor

    def __init__(self, front_indices: Tensor) -> None:
        super().__init__()
        self.farl = ClipViT()
        self.arcface = IResNet100()
        self.net = RankMLPNet()
        front_indices = torch.as_tensor(front_indices, dtype=torch.int64)
        if front_indices.shape != (FRONT_VERTEX_COUNT,):
            raise InvalidInputError(f"front indices: expected shape ({FRONT_VERTEX_COUNT},), got "
                                    f"{tuple(front_indices.shape)}")
        self.register_buffer("front_indices", front_indices.clone(), persistent=False)
        self.load_report: dict[str, str] = {}  # filled by the loader (e.g. what the optional FaRL file gave)
        self.pool_scoring = False  # fast numerics: RankMLPNet.forward_pool instead of the shipped forward

    @torch.inference_mode()
    def context(self, arcface_blob: Tensor, farl_image: Tensor, *, reproduce_official: bool = False) -> Tensor:
        """(B,3,112,112) ArcFace blob + (B,3,224,224) FaRL image -> (B,1024) context [FaRL ; ArcFace].

        ArcFace's final ``features`` BatchNorm: OFER's test code skips it at batch 1 (its Arcface
        applies it only for batch > 1) and IdRank runs at batch 1, so ``reproduce_official=True``
        skips it there. facefuse's default applies it: IdRank was trained at batch 8, i.e. *with*
        that BatchNorm, so applying it feeds the network the embedding distribution it learned
        from; the official skip is a batch-size artefact, not a design choice.
        """
        _check_image(arcface_blob, ARCFACE_INPUT_SIZE, "arcface_blob")
        _check_image(farl_image, CLIP_IMAGE_SIZE, "farl_image")
        if arcface_blob.shape[0] != farl_image.shape[0]:
            raise InvalidInputError(
                f"arcface_blob and farl_image batch sizes differ: {arcface_blob.shape[0]} vs {farl_image.shape[0]}"
            )
        apply_features = arcface_blob.shape[0] > 1 if reproduce_official else True
        identity = F.normalize(self.arcface(arcface_blob.float(), apply_features=apply_features), dim=1)
        appearance = self.farl.encode_image(farl_image.float())
        return torch.cat([appearance, identity], dim=1)

    @torch.inference_mode()
    def score(self, candidate_vertices: Tensor, context: Tensor) -> Tensor:
        """(N,V,3) candidate meshes in metres + (1,1024) context -> (N,) raw scores (higher is better).

        mu is taken over exactly the candidates given, so scores depend on the whole pool (see the
        module docstring); their order does not.
        """
        if candidate_vertices.ndim != 3 or candidate_vertices.shape[0] < 1 or candidate_vertices.shape[2] != 3:
            raise InvalidInputError("candidate_vertices: expected shape (N>=1, V, 3), got "
                                    f"{tuple(candidate_vertices.shape)}")
        needed = int(self.front_indices.max()) + 1
        if candidate_vertices.shape[1] < needed:
            raise InvalidInputError(
                f"candidate_vertices: {candidate_vertices.shape[1]} vertices per mesh, but the front-face "
                f"indices need at least {needed} (a FLAME 2020 mesh has 5023)"
            )
        if context.shape != (1, CONTEXT_DIM):
            raise InvalidInputError(f"context: expected shape (1, {CONTEXT_DIM}), got {tuple(context.shape)}")
        if not bool(torch.isfinite(candidate_vertices).all()):
            raise InvalidInputError("candidate_vertices: contains NaN or infinite values")
        if self.pool_scoring:
            mean, residuals = rank_pool(candidate_vertices, self.front_indices)
            return self.net.forward_pool(mean, residuals, context.float())
        features = rank_features(candidate_vertices, self.front_indices)
        return self.net(features, context.float())


def _check_image(x: Tensor, size: int, name: str) -> None:
    if x.ndim != 4 or x.shape[1:] != (3, size, size) or x.shape[0] < 1:
        raise InvalidInputError(f"{name}: expected shape (B, 3, {size}, {size}), got {tuple(x.shape)}")
