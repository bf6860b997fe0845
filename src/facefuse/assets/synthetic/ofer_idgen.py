"""A random stand-in for OFER's ``model_idgen_flame20.tar`` in exactly the official format.

Sections, names, shapes and dtypes are the official ones: ``arcface`` (925 keys), ``net`` (174 + the 6
stray ``*.fn.fn.qkv.weight`` keys a training checkpoint carries), ``var_sched`` (17 buffers holding the
real linear schedule) and ``diffusion`` (``net.`` + ``var_sched.``, 197 keys, the same tensors as
``net``/``var_sched``, as in a real save). Weights are random but scaled like a trained network's
(unit-variance activations, BatchNorm statistics near identity), so sampling stays finite.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from facefuse.models.diffusion import VarianceSchedule
from facefuse.models.idgen import ATTENTION_BLOCK_DIMS, ATTENTION_HIDDEN, IdGenUnet

IDGEN_FILENAME = "model_idgen_flame20.tar"
SIZES = ("small", "full")


def _random_like(key: str, reference: Tensor, generator: torch.Generator) -> Tensor:
    """A plausible value for one state-dict entry, chosen by its role (read from the key name)."""
    shape = tuple(reference.shape)
    if reference.dtype == torch.int64:  # BatchNorm num_batches_tracked
        return torch.tensor(1000, dtype=torch.int64)
    leaf = key.rsplit(".", 1)[-1]
    noise = torch.randn(shape, generator=generator)
    if leaf == "running_var":
        return 1.0 + 0.1 * noise.abs()
    if leaf == "running_mean":
        return 0.05 * noise
    if leaf == "g" or (leaf == "weight" and len(shape) == 1):  # norm gains, PReLU slopes
        return (0.25 if "prelu" in key else 1.0) + 0.05 * noise
    if leaf == "bias":
        return 0.02 * noise
    fan_in = 1
    for size in shape[1:]:
        fan_in *= size
    return noise / max(fan_in, 1) ** 0.5


def _arcface_state(generator: torch.Generator) -> dict[str, Tensor]:
    from facefuse.models.arcface import IResNet100

    with torch.device("meta"):
        reference = IResNet100().state_dict()
    return {key: _random_like(key, value, generator).to(value.dtype) for key, value in reference.items()}


def _net_state(generator: torch.Generator) -> dict[str, Tensor]:
    with torch.device("meta"):
        reference = IdGenUnet().state_dict()
    state = {key: _random_like(key, value, generator) for key, value in reference.items()}
    # A training checkpoint saved after a forward pass also holds each block's last q/k/v conv.
    for name, dim in ATTENTION_BLOCK_DIMS.items():
        state[f"{name}.fn.fn.qkv.weight"] = _random_like("qkv.weight", torch.empty(3 * ATTENTION_HIDDEN, dim, 1), generator)
    return state


def write_idgen_checkpoint(path: str | os.PathLike[str], size: str, generator: torch.Generator) -> None:
    """Write a random ``model_idgen_flame20.tar`` at ``path`` (atomically). ``size`` is accepted for
    symmetry with the other writers; the official shapes are fixed, so it changes nothing here."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    path = Path(path)
    net = _net_state(generator)
    var_sched = {key: value.clone() for key, value in VarianceSchedule().state_dict().items()}
    checkpoint = {
        "arcface": _arcface_state(generator),
        "net": net,
        "var_sched": var_sched,
        "diffusion": {**{f"net.{k}": v for k, v in net.items()}, **{f"var_sched.{k}": v for k, v in var_sched.items()}},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
