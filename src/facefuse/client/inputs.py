"""Turn the command line's inputs (files, folders, globs, videos) into images to stream."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facefuse.errors import InvalidInputError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v"}


@dataclass(frozen=True)
class InputItem:
    """One image to process: a file, or one frame of a video (``frame`` >= 0)."""

    image_id: str
    path: Path
    frame: int = -1

    @property
    def key(self) -> str:
        """A folder name unique per image: the id with path separators made safe."""
        return self.image_id.replace(os.sep, "__").replace("/", "__").replace("#", "_").lstrip(".")


def _image_id(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path.resolve()).lstrip(os.sep)


def collect_inputs(arguments: list[str], *, every_n_frames: int = 10) -> list[InputItem]:
    """Files, folders (recursive), globs and videos, in a stable order; unknown paths fail loudly."""
    items: list[InputItem] = []
    for argument in arguments:
        if any(ch in argument for ch in "*?[") and not Path(argument).exists():
            matches = sorted(Path(p) for p in glob.glob(argument, recursive=True))
            if not matches:
                raise InvalidInputError(f"{argument}: the pattern matches no file")
            paths = [p for p in matches if p.is_file()]
        elif Path(argument).is_dir():
            paths = sorted(p for p in Path(argument).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES)
        elif Path(argument).is_file():
            paths = [Path(argument)]
        else:
            raise InvalidInputError(f"{argument}: no such file, folder or pattern")
        for path in paths:
            if path.suffix.lower() in VIDEO_SUFFIXES:
                items.extend(_video_items(path, every_n_frames))
            else:
                items.append(InputItem(_image_id(path), path))
    seen: set[str] = set()
    unique = []
    for item in items:
        if item.image_id not in seen:
            seen.add(item.image_id)
            unique.append(item)
    return unique


def _video_items(path: Path, every_n: int) -> list[InputItem]:
    import cv2

    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise InvalidInputError(f"{path}: not a readable video")
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    capture.release()
    base = _image_id(path)
    return [InputItem(f"{base}#{frame:06d}", path, frame) for frame in range(0, max(total, 0), max(every_n, 1))]


def read_bytes(item: InputItem) -> bytes:
    """The encoded image to send: the file itself, or the video frame encoded as PNG."""
    if item.frame < 0:
        return item.path.read_bytes()
    import cv2

    capture = cv2.VideoCapture(str(item.path))
    try:
        capture.set(cv2.CAP_PROP_POS_FRAMES, item.frame)
        ok, frame = capture.read()
    finally:
        capture.release()
    if not ok:
        raise InvalidInputError(f"{item.image_id}: frame could not be read")
    ok, encoded = cv2.imencode(".png", frame)
    if not ok:
        raise InvalidInputError(f"{item.image_id}: frame could not be encoded")
    return encoded.tobytes()


def read_rgb(item: InputItem) -> np.ndarray:
    """The decoded RGB image, for overlays and vertex colours on the client side."""
    from facefuse.io.images import decode_image

    return decode_image(read_bytes(item))
