"""Random stand-ins for OFER IdRank's files, in exactly the official formats.

* ``write_idrank_checkpoint``: ``model_idrank.tar`` with sections ``net`` (33 keys), ``arcface``
  (925) and ``farl`` (302), official names, shapes and dtypes, plus the trainer extras ``epoch``,
  ``global_step`` and ``batch_size``.
* ``write_farl_weights``: a FaRL ``.pth``: ``{"state_dict": ...}`` holding the whole CLIP model under
  CLIP's names plus FaRL's masked-image-modelling extras under ``visual.`` (``mask_token``,
  ``lm_transformer.*``, ``ln_lm.*``, ``lm_head.*``). The extras' true sizes are not known here (one
  MIM block and an 8192-token head are written); loaders must ignore them anyway.
* ``write_front_indices``: 1785 strictly increasing unique int64 vertex indices valid for the
  synthetic FLAME of that size; at ``"full"`` they span exactly [16, 3928] like the real file.

Network shapes are fixed by the official files, so ``size`` changes only the front indices (which
must fit the synthetic FLAME mesh, whose sizes ``facefuse.assets.synthetic.flame.FLAME_SIZES`` owns).
Weights follow the shared rules of ``random_weights`` (ArcFace exactly as MICA's synthetic writer
makes it), with LayerNorm/GroupNorm gains moved near 1, so every output is finite and scores vary
between candidates. All randomness comes from the given generator; writes are atomic.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from facefuse.assets.idrank_checkpoint import FARL_STATE_KEY, expected_idrank_sections
from facefuse.assets.synthetic.flame import FLAME_SIZES
from facefuse.assets.synthetic.mica import arcface_state
from facefuse.assets.synthetic.random_weights import random_state
from facefuse.io.atomic import atomic_open, write_npy_atomic
from facefuse.models.idrank import FRONT_VERTEX_COUNT

SIZES = ("small", "full")
REAL_FRONT_RANGE = (16, 3928)
"""min and max of the real ``frontindices.npy``."""
_MIM_VOCAB = 8192

Expected = Mapping[str, tuple[tuple[int, ...], torch.dtype]]


def _check_size(size: str) -> None:
    if size not in SIZES:
        raise ValueError(f"unknown synthetic size {size!r}; expected one of {SIZES}")


NORM_GAIN_SUFFIXES = (
    "ln_1.weight",
    "ln_2.weight",
    "ln_pre.weight",
    "ln_post.weight",
    "ln_final.weight",
    "ln_lm.weight",
    "gn.weight",
)
"""LayerNorm / GroupNorm gains: the shared rules treat them as small vectors; here they sit near 1."""


def _random_state_unit_norm_gains(expected: Expected, generator: torch.Generator) -> dict[str, torch.Tensor]:
    state = random_state(expected, generator)
    for key in state:
        if key.endswith(NORM_GAIN_SUFFIXES):
            state[key] = state[key] + 1.0
    return state


def synthetic_clip_state(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A random whole-CLIP ViT-B/16 state dict (the ``farl`` section), official 302 keys."""
    return _random_state_unit_norm_gains(expected_idrank_sections()["farl"], generator)


def synthetic_idrank_sections(generator: torch.Generator) -> dict[str, dict[str, torch.Tensor]]:
    """The three state-dict sections of a synthetic ``model_idrank.tar``, in memory."""
    return {
        "net": _random_state_unit_norm_gains(expected_idrank_sections()["net"], generator),
        "arcface": arcface_state(generator),
        "farl": synthetic_clip_state(generator),
    }


def write_idrank_checkpoint(path: Path, size: str, generator: torch.Generator) -> None:
    _check_size(size)
    checkpoint: dict[str, object] = dict(synthetic_idrank_sections(generator))
    checkpoint.update(epoch=0, global_step=0, batch_size=8)
    with atomic_open(path, "wb") as handle:
        torch.save(checkpoint, handle)


def _farl_mim_extras(width: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    f32 = torch.float32
    block = {
        "attn.in_proj_weight": ((3 * width, width), f32), "attn.in_proj_bias": ((3 * width,), f32),
        "attn.out_proj.weight": ((width, width), f32), "attn.out_proj.bias": ((width,), f32),
        "ln_1.weight": ((width,), f32), "ln_1.bias": ((width,), f32),
        "mlp.c_fc.weight": ((4 * width, width), f32), "mlp.c_fc.bias": ((4 * width,), f32),
        "mlp.c_proj.weight": ((width, 4 * width), f32), "mlp.c_proj.bias": ((width,), f32),
        "ln_2.weight": ((width,), f32), "ln_2.bias": ((width,), f32),
    }
    extras: dict[str, tuple[tuple[int, ...], torch.dtype]] = {"visual.mask_token": ((width,), f32)}
    extras.update({f"visual.lm_transformer.resblocks.0.{k}": v for k, v in block.items()})
    extras.update({"visual.ln_lm.weight": ((width,), f32), "visual.ln_lm.bias": ((width,), f32),
                   "visual.lm_head.weight": ((_MIM_VOCAB, width), f32), "visual.lm_head.bias": ((_MIM_VOCAB,), f32)})
    return extras


def write_farl_weights(path: Path, size: str, generator: torch.Generator) -> None:
    _check_size(size)
    state = synthetic_clip_state(generator)
    width = state["visual.class_embedding"].shape[0]
    state.update(_random_state_unit_norm_gains(_farl_mim_extras(width), generator))
    with atomic_open(path, "wb") as handle:
        torch.save({FARL_STATE_KEY: state}, handle)


def _mesh_vertex_count(size: str) -> int:
    """Vertices of the synthetic FLAME mesh of this size (the FLAME writer's table owns the numbers)."""
    return FLAME_SIZES[size].num_vertices


def synthetic_front_indices(size: str, generator: torch.Generator) -> np.ndarray:
    """1785 sorted unique int64 indices; at "full" inside [16, 3928] with both ends used."""
    _check_size(size)
    num_vertices = _mesh_vertex_count(size)
    if size == "full":
        low, high = REAL_FRONT_RANGE
    else:
        low, high = 0, num_vertices - 1
    span = high - low + 1
    if span < FRONT_VERTEX_COUNT or high >= num_vertices:
        raise ValueError(f"synthetic FLAME size {size!r} has {num_vertices} vertices; IdRank needs "
                         f"{FRONT_VERTEX_COUNT} front vertices")
    inner = torch.randperm(span - 2, generator=generator)[: FRONT_VERTEX_COUNT - 2] + low + 1
    indices = torch.cat([torch.tensor([low, high]), inner]).sort().values
    return indices.numpy().astype(np.int64)


def write_front_indices(path: Path, size: str, generator: torch.Generator) -> None:
    write_npy_atomic(path, synthetic_front_indices(size, generator))
