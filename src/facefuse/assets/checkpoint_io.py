"""Reading official checkpoints and matching them to facefuse's modules, strictly.

The official loaders use ``strict=False`` in places, which hides renamed or missing weights. Here every
section is compared key by key (names, shapes, dtypes) before ``load_state_dict(strict=True)``, and the
error names the file, the section and the first offending keys.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from facefuse.errors import AssetError, CheckpointError

TRUST_ENV = "FACEFUSE_TRUST_CHECKPOINTS"
_MAX_LISTED = 5


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a ``torch.save`` file onto the CPU with tensor-only unpickling unless the user trusts it."""
    path = Path(path)
    if not path.is_file():
        raise AssetError(f"{path}: file not found")
    trust = os.environ.get(TRUST_ENV, "") not in ("", "0", "false", "no")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: holds Python objects beyond tensors and plain containers ({_first_line(exc)}). "
            f"If you trust where the file came from, set {TRUST_ENV}=1 to load it with full unpickling."
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {_first_line(exc)}"
        ) from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict of sections, found {type(obj).__name__}")
    return dict(obj)


def require_sections(checkpoint: Mapping[str, Any], sections: Iterable[str], source: str) -> None:
    """Fail naming every missing section, and what the file holds instead."""
    missing = [s for s in sections if s not in checkpoint]
    if missing:
        raise CheckpointError(
            f"{source}: missing section(s) {', '.join(repr(m) for m in missing)}; "
            f"the file has {sorted(map(str, checkpoint))}"
        )


def expected_state(module: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Key -> (shape, dtype) the module's ``load_state_dict`` will expect."""
    return {k: (tuple(v.shape), v.dtype) for k, v in module.state_dict().items()}


def check_state_dict(
    expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    state: Mapping[str, Any],
    source: str,
    *,
    ignore_unexpected: Iterable[str] = (),
) -> None:
    """Compare a state dict with the expected keys, shapes and dtypes; raise naming what differs."""
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{source}: expected a state dict, found {type(state).__name__}")
    ignored = set(ignore_unexpected)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected and k not in ignored]
    problems: list[str] = []
    if missing:
        problems.append(f"missing key(s) {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected key(s) {_listed(unexpected)}")
    wrong: list[str] = []
    for key, (shape, dtype) in expected.items():
        value = state.get(key)
        if value is None:
            continue
        if not isinstance(value, torch.Tensor):
            wrong.append(f"{key}: expected a tensor, found {type(value).__name__}")
        elif tuple(value.shape) != shape:
            wrong.append(f"{key}: shape {tuple(value.shape)}, expected {shape}")
        elif value.dtype != dtype:
            wrong.append(f"{key}: dtype {value.dtype}, expected {dtype}")
    if wrong:
        problems.append(
            "; ".join(wrong[:_MAX_LISTED])
            + (f" (+{len(wrong) - _MAX_LISTED} more)" if len(wrong) > _MAX_LISTED else "")
        )
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))


def load_strict(
    module: nn.Module, state: Mapping[str, Any], source: str, *, ignore_unexpected: Iterable[str] = ()
) -> None:
    """Check then load a section into ``module`` with ``strict=True``."""
    ignored = set(ignore_unexpected)
    check_state_dict(expected_state(module), state, source, ignore_unexpected=ignored)
    module.load_state_dict({k: v for k, v in state.items() if k not in ignored}, strict=True)


def _listed(keys: list[str]) -> str:
    shown = ", ".join(repr(k) for k in keys[:_MAX_LISTED])
    return shown + (f" (+{len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
