"""Turn the command line's inputs (files, folders, globs, videos) into images to stream.

Each input gets its own output folder name from its own path (``names.folder_name``), never from
anything a server says. A name the system cannot use (too long, undecodable, unreadable video) does
not stop the run: the item carries a ``problem`` and gets its own status line.
"""

from __future__ import annotations

import glob
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from facefuse.client.names import display, folder_name
from facefuse.errors import InvalidInputError
from facefuse.io.video import FrameReader, video_info

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v"}


@dataclass(frozen=True)
class InputItem:
    """One image to process: a file, or one frame of a video (``frame`` >= 0).

    ``image_id`` is the path relative to the working folder as Python sees it (undecodable bytes as
    surrogates); ``problem`` says why the item cannot be read at all (it is then not sent).
    """

    image_id: str
    path: Path
    frame: int = -1
    problem: str = ""
    key: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", folder_name(self.image_id))

    @property
    def name(self) -> str:
        """The id in a printable, JSON-safe form (what results.jsonl and messages show)."""
        return display(self.image_id)


def _image_id(path: Path) -> str:
    try:
        resolved = path.resolve()
    except OSError:  # a name the system refuses (e.g. too long) still gets an id of its own
        resolved = path.absolute()
    try:
        return str(resolved.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(resolved).lstrip("/")


def _unusable(path: Path, exc: OSError) -> InputItem:
    return InputItem(_image_id(path), path, problem=f"{display(str(path))}: cannot be read ({exc.strerror or exc})")


def collect_inputs(arguments: list[str], *, every_n_frames: int = 10) -> list[InputItem]:
    """Files, folders (recursive), globs and videos, in a stable order; paths that do not exist fail loudly.

    Names the system refuses (too long, unreadable) become items with a ``problem`` instead.
    """
    items: list[InputItem] = []
    for argument in arguments:
        path = Path(argument)
        try:
            exists, is_dir, is_file = path.exists(), path.is_dir(), path.is_file()
        except OSError as exc:
            items.append(_unusable(path, exc))
            continue
        if any(ch in argument for ch in "*?[") and not exists:
            matches = sorted(Path(p) for p in glob.glob(argument, recursive=True))
            if not matches:
                raise InvalidInputError(f"{display(argument)}: the pattern matches no file")
            paths = matches
        elif is_dir:
            paths = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES)
        elif is_file:
            paths = [path]
        else:
            raise InvalidInputError(f"{display(argument)}: no such file, folder or pattern")
        for found in paths:
            try:
                if not found.is_file():
                    continue
            except OSError as exc:
                items.append(_unusable(found, exc))
                continue
            if found.suffix.lower() in VIDEO_SUFFIXES:
                items.extend(_video_items(found, every_n_frames))
            else:
                items.append(InputItem(_image_id(found), found))
    unique: dict[str, InputItem] = {}
    for item in items:
        other = unique.setdefault(item.key, item)
        if other.image_id != item.image_id:  # a 64-bit hash collision: refuse rather than overwrite
            raise InvalidInputError(f"{item.name} and {other.name} map to one output folder {item.key}; rename one")
    return list(unique.values())


def _video_items(path: Path, every_n: int) -> list[InputItem]:
    base = _image_id(path)
    try:
        total = video_info(path).frames
    except InvalidInputError as exc:
        return [InputItem(base, path, problem=f"{display(str(path))}: not a readable video ({exc})")]
    return [InputItem(f"{base}#{frame:06d}", path, frame) for frame in range(0, max(total, 0), max(every_n, 1))]


_READERS: dict[Path, FrameReader] = {}
_READERS_LOCK = threading.Lock()
MAX_OPEN_VIDEOS = 4


def frame_reader(path: Path) -> FrameReader:
    """The shared reader of one video (frames are asked for in order by the request thread, then again by
    the result writer: its few cached frames answer the second ask)."""
    key = path.resolve()
    with _READERS_LOCK:
        reader = _READERS.get(key)
        if reader is None:
            while len(_READERS) >= MAX_OPEN_VIDEOS:
                _READERS.pop(next(iter(_READERS))).close()
            reader = _READERS[key] = FrameReader(key, keep=16)
        return reader


def _frame_rgb(item: InputItem) -> np.ndarray:
    if item.problem:
        raise InvalidInputError(item.problem)
    return frame_reader(item.path).frame(item.frame)


def read_bytes(item: InputItem) -> bytes:
    """The encoded image to send: the file itself, or the video frame encoded as PNG."""
    if item.problem:
        raise InvalidInputError(item.problem)
    if item.frame < 0:
        return item.path.read_bytes()
    import cv2

    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(_frame_rgb(item)[..., ::-1]))
    if not ok:
        raise InvalidInputError(f"{item.name}: frame could not be encoded")
    return encoded.tobytes()


def read_rgb(item: InputItem) -> np.ndarray:
    """The decoded RGB image, for overlays and vertex colours on the client side."""
    from facefuse.io.images import decode_image

    if item.frame >= 0:
        return _frame_rgb(item)
    return decode_image(read_bytes(item))
