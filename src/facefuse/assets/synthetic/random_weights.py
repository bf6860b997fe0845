"""Random stand-in weights with exact official shapes and dtypes, scaled so deep networks stay finite.

Rules by key name: convolutions at He scale (std sqrt(2 / fan_in)); linear weights at std 1/sqrt(fan_in);
BatchNorm running_var in [0.8, 1.2], running_mean and bias small, weight near 1 (or near
``residual_bn_scale`` for the last BN of a residual branch, so 49 residual additions do not blow up);
PReLU slopes near 0.25; ``num_batches_tracked`` a plausible count.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

ExpectedState = Mapping[str, tuple[tuple[int, ...], torch.dtype]]


def expected_state_of(build: Callable[[], nn.Module]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Key -> (shape, dtype) of a module built on the meta device (no memory, no RNG drawn)."""
    with torch.device("meta"):
        module = build()
    return {k: (tuple(v.shape), v.dtype) for k, v in module.state_dict().items()}


def _normal(shape: tuple[int, ...], std: float, generator: torch.Generator, mean: float = 0.0) -> torch.Tensor:
    return torch.randn(shape, generator=generator) * std + mean


def random_tensor(key: str, shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator, *,
                  residual_bn_suffixes: tuple[str, ...] = (), residual_bn_scale: float = 0.2,
                  is_batchnorm: bool = False) -> torch.Tensor:
    name = key.rsplit(".", 1)[-1]
    if name == "num_batches_tracked":
        return torch.randint(1000, 100000, (), generator=generator, dtype=torch.int64).to(dtype)
    if not dtype.is_floating_point:
        raise ValueError(f"{key}: no random rule for dtype {dtype}")
    if is_batchnorm:
        if name == "running_var":
            value = torch.rand(shape, generator=generator) * 0.4 + 0.8
        elif name == "running_mean":
            value = _normal(shape, 0.05, generator)
        elif name == "weight":
            centre = residual_bn_scale if any(key.endswith(s) for s in residual_bn_suffixes) else 1.0
            value = _normal(shape, 0.1 * centre, generator, mean=centre)
        else:  # bias
            value = _normal(shape, 0.05, generator)
    elif name == "weight" and key.rsplit(".", 2)[-2] == "prelu":
        value = _normal(shape, 0.05, generator, mean=0.25)
    elif name == "weight" and len(shape) == 4:
        fan_in = shape[1] * shape[2] * shape[3]
        value = _normal(shape, (2.0 / fan_in) ** 0.5, generator)
    elif name == "weight" and len(shape) >= 2:
        fan_in = 1
        for s in shape[1:]:
            fan_in *= s
        value = _normal(shape, fan_in**-0.5, generator)
    elif name == "bias":
        value = _normal(shape, 0.02, generator)
    else:
        value = _normal(shape, 0.02, generator)
    return value.to(dtype).contiguous()


def random_state(expected: ExpectedState, generator: torch.Generator, *, residual_bn_suffixes: tuple[str, ...] = (),
                 residual_bn_scale: float = 0.2) -> dict[str, torch.Tensor]:
    """A state dict with exactly ``expected``'s keys, shapes and dtypes (in its order)."""
    bn_prefixes = {k.rsplit(".", 1)[0] for k in expected if k.endswith(".running_var")}
    return {
        key: random_tensor(key, shape, dtype, generator, residual_bn_suffixes=residual_bn_suffixes,
                           residual_bn_scale=residual_bn_scale, is_batchnorm=key.rsplit(".", 1)[0] in bn_prefixes)
        for key, (shape, dtype) in expected.items()
    }
