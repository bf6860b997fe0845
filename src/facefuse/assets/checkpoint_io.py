"""Reading official checkpoints and matching them to facefuse's modules, strictly.

Files are read with torch's ``weights_only`` unpickler, which builds tensors and plain containers and
refuses every other global. Training code also saves numpy arrays and scalars beside the weights
(MICA's validator state, OFER's IdRank trainer); for those, exactly numpy's array, scalar and dtype
reconstruction functions are allowed (under both their numpy 1.x and 2.x module names), nothing else.
These only rebuild data from bytes: an object array's items still pass through the same unpickler.

The official loaders use ``strict=False`` in places, which hides renamed or missing weights. Here every
section is compared key by key (names, shapes, dtypes) before ``load_state_dict(strict=True)``, and the
error names the file, the section and the first offending keys.
"""

from __future__ import annotations

import os
import pickle
import re
import threading
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from facefuse.errors import AssetError, CheckpointError

TRUST_ENV = "FACEFUSE_TRUST_CHECKPOINTS"
"""Set to 1 to unpickle checkpoints fully (runs any code the file holds); documented in docs/model-store.md."""
_MAX_LISTED = 5


def _numpy_reconstruction_globals() -> list[Callable[..., Any] | tuple[Callable[..., Any], str]]:
    """numpy's array / scalar / dtype rebuilders under every module name a pickle may record them by."""
    from numpy._core import multiarray  # numpy >= 2 (constraints.txt); 1.x files name numpy.core.multiarray

    found: list[Callable[..., Any] | tuple[Callable[..., Any], str]] = [
        (np.ndarray, "numpy.ndarray"), (np.dtype, "numpy.dtype")]
    # A dtype is rebuilt as np.dtype(...) and then given its state, which torch allows only for listed types.
    found += [(cls, f"numpy.dtypes.{name}") for name, cls in vars(np.dtypes).items()
              if isinstance(cls, type) and issubclass(cls, np.dtype)]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        found += [(multiarray._reconstruct, f"{module}._reconstruct"), (multiarray.scalar, f"{module}.scalar")]
    return found


NUMPY_SAFE_GLOBALS = tuple(entry[1] for entry in _numpy_reconstruction_globals() if isinstance(entry, tuple))
"""The only globals beyond torch's own that :func:`load_checkpoint` lets a file name."""
_SAFE_GLOBALS_LOCK = threading.Lock()  # torch's allowlist is process-wide; add and remove it atomically


def trust_checkpoints() -> bool:
    return os.environ.get(TRUST_ENV, "") not in ("", "0", "false", "no")


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a ``torch.save`` file onto the CPU: tensors, plain containers and numpy data, nothing else.

    Any storage location (``cuda:0`` included) is mapped to the CPU; both the zip and the legacy
    (``_use_new_zipfile_serialization=False``) formats are read.
    """
    path = Path(path)
    if not path.is_file():
        raise AssetError(f"{path}: file not found")
    try:
        if trust_checkpoints():
            obj = torch.load(path, map_location="cpu", weights_only=False)
        else:
            with _SAFE_GLOBALS_LOCK, torch.serialization.safe_globals(_numpy_reconstruction_globals()):
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused: it holds Python objects other than tensors, plain containers and numpy "
            f"arrays ({_refused_globals(path, exc)}), and unpickling those can run arbitrary code. "
            "Re-save the checkpoint's state dicts (tensors only) from the program that wrote it."
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, IndexError, KeyError, TypeError,
            AttributeError) as exc:  # what torch raises on a truncated or foreign file varies by format
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


def _refused_globals(path: Path, exc: BaseException) -> str:
    """The globals the file names that are not allowed (zip format), else torch's first reason."""
    try:
        names = [n for n in torch.serialization.get_unsafe_globals_in_checkpoint(path) if n not in NUMPY_SAFE_GLOBALS]
    except Exception:  # legacy format or unreadable: torch's own message names the first global
        names = []
    if names:
        return "globals " + _listed(sorted(names))
    text = str(exc)
    named = re.search(r"GLOBAL (\S+)", text)
    if named:
        return "global " + named.group(1)
    reason = text.split("WeightsUnpickler error:", 1)[1].strip() if "WeightsUnpickler error:" in text else ""
    # torch's own text goes on to suggest weights_only=False; only its reason is kept.
    return _first_line(ValueError(reason)) if reason else "not a plain tensor archive"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
