"""Names the client shows and folder names it writes, made from the client's own strings only.

File names are bytes on POSIX; Python hands undecodable bytes over as lone surrogates, which a
terminal, a JSON reader or a protobuf string would choke on. ``display`` makes any name printable
and JSON-safe; ``folder_name`` turns any name into one path component that is short, readable,
safe (no separator, no leading dot, ASCII only) and unique per name (a hash of the exact bytes).
"""

from __future__ import annotations

import hashlib
import os
import re

READABLE_CHARS = 60  # the readable part of a folder name; the whole name stays under 80 bytes
DIGEST_HEX = 16  # 64 bits of sha256: 1e6 inputs collide with probability ~3e-8, and collisions are still refused

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def raw_bytes(name: str) -> bytes:
    """The exact bytes a name stands for (undecodable bytes included)."""
    return os.fsencode(name)


def display(name: str) -> str:
    """A printable, JSON-safe form of a name: undecodable bytes become ``\\xNN``."""
    return raw_bytes(name).decode("utf-8", "backslashreplace")


def folder_name(name: str) -> str:
    """One safe path component unique per ``name``: a readable tail plus a hash of the exact bytes."""
    readable = _UNSAFE.sub("_", display(name)).strip("._-")[-READABLE_CHARS:].lstrip("._-") or "input"
    digest = hashlib.sha256(raw_bytes(name)).hexdigest()[:DIGEST_HEX]
    return f"{readable}-{digest}"
