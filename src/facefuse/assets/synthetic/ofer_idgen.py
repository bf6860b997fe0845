"""A random stand-in for OFER's ``model_idgen_flame20.tar`` in exactly the official format.

Sections, names, shapes and dtypes are the official ones: ``arcface`` (925 keys, made exactly as the
MICA writer makes them), ``net`` (174 + the 6 stray ``*.fn.fn.qkv.weight`` keys a training checkpoint
carries), ``var_sched`` (17 buffers holding the real linear schedule) and ``diffusion`` (``net.`` +
``var_sched.``, 197 keys, the very tensors of ``net``/``var_sched``, as in a real save). Weights follow
the shared ``random_weights`` rules with GroupNorm and RMSNorm gains moved near 1, so sampling with
them stays finite. ``size`` changes nothing: the official shapes are fixed.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from facefuse.assets.synthetic.mica import arcface_state
from facefuse.assets.synthetic.random_weights import expected_state_of, random_state
from facefuse.io.atomic import atomic_open
from facefuse.models.diffusion import VarianceSchedule
from facefuse.models.idgen import ATTENTION_BLOCK_DIMS, ATTENTION_HIDDEN, IdGenUnet

IDGEN_FILENAME = "model_idgen_flame20.tar"
SIZES = ("small", "full")
STRAY_QKV_SUFFIX = ".fn.fn.qkv.weight"


def idgen_net_state(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random ``net`` section: the 174 Unet keys plus the 6 stray q/k/v keys (384, dim, 1)."""
    expected = expected_state_of(IdGenUnet)
    expected.update(
        {
            f"{name}{STRAY_QKV_SUFFIX}": ((3 * ATTENTION_HIDDEN, dim, 1), torch.float32)
            for name, dim in ATTENTION_BLOCK_DIMS.items()
        }
    )
    state = random_state(expected, generator)
    for key, value in state.items():
        if key.endswith(".norm.weight") or key.endswith(".norm.g"):  # GroupNorm / RMSNorm gains near 1
            state[key] = value + 1.0
    return state


def idgen_state(generator: torch.Generator) -> dict[str, dict[str, torch.Tensor]]:
    arcface = arcface_state(generator)
    net = idgen_net_state(generator)
    var_sched = {key: value.clone() for key, value in VarianceSchedule().state_dict().items()}
    diffusion = {**{f"net.{k}": v for k, v in net.items()}, **{f"var_sched.{k}": v for k, v in var_sched.items()}}
    return {"arcface": arcface, "net": net, "var_sched": var_sched, "diffusion": diffusion}


def write_idgen_checkpoint(path: str | os.PathLike[str], size: str, generator: torch.Generator) -> None:
    """Write a random ``model_idgen_flame20.tar`` at ``path``, atomically."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    checkpoint = idgen_state(generator)
    with atomic_open(Path(path), "wb") as handle:
        torch.save(checkpoint, handle)
