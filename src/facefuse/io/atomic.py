"""Atomic file writes: a reader sees the old file or the complete new one, never half of it.

Each helper writes a temporary file in the destination's own folder (so the final rename stays on
one file system), flushes and fsyncs it, then ``os.replace``-s it over the destination and fsyncs
the folder. A crash or a concurrent writer therefore never leaves a truncated file under the final
name; two writers racing on one name end with one of their complete files.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np

PathLike = str | os.PathLike[str]


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms / file systems cannot open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_open(
    path: PathLike, mode: str = "wb", *, encoding: str | None = None, permissions: int = 0o644
) -> Iterator[IO[Any]]:
    """Open a temporary sibling of ``path`` for writing; on success it replaces ``path``.

    On an exception the temporary file is removed and ``path`` is left untouched. The file gets
    ``permissions`` (temporary files start private; results are meant to be shared, e.g. mounted
    read-only into a container running as another user).
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open supports modes 'wb' and 'w', not {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, mode, encoding=encoding if mode == "w" else None) as handle:
            os.fchmod(handle.fileno(), permissions) if hasattr(os, "fchmod") else os.chmod(tmp, permissions)
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_bytes_atomic(path: PathLike, data: bytes) -> Path:
    with atomic_open(path, "wb") as handle:
        handle.write(data)
    return Path(path)


def write_text_atomic(path: PathLike, text: str, encoding: str = "utf-8") -> Path:
    with atomic_open(path, "w", encoding=encoding) as handle:
        handle.write(text)
    return Path(path)


def write_json_atomic(path: PathLike, obj: Any, *, indent: int | None = 2, sort_keys: bool = True) -> Path:
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, allow_nan=False)
    return write_text_atomic(path, text + "\n")


def write_npy_atomic(path: PathLike, array: np.ndarray) -> Path:
    """Write one array as ``.npy`` (never pickled objects)."""
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array), allow_pickle=False)
    return write_bytes_atomic(path, buffer.getvalue())


def write_npz_atomic(path: PathLike, arrays: Mapping[str, np.ndarray], *, compressed: bool = False) -> Path:
    """Write named arrays as ``.npz``; ``compressed`` uses zip deflate."""
    buffer = io.BytesIO()
    saver: Callable[..., None] = np.savez_compressed if compressed else np.savez
    saver(buffer, **{str(k): np.asarray(v) for k, v in arrays.items()})
    return write_bytes_atomic(path, buffer.getvalue())


def copy_file_atomic(source: PathLike, destination: PathLike, chunk: int = 1 << 20) -> Path:
    """Copy ``source`` to ``destination`` atomically (streamed, so large files need no memory)."""
    with open(source, "rb") as src, atomic_open(destination, "wb") as dst:
        while block := src.read(chunk):
            dst.write(block)
    return Path(destination)
