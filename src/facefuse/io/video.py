"""Video files in and out, through imageio's ffmpeg plugin (imageio-ffmpeg ships its own ffmpeg binary).

Frames are RGB uint8 (H, W, 3). Reading is sequential (decoding is); ``FrameReader`` seeks forward by
decoding and backward by reopening, and keeps the last few frames, so the client's request thread and
its result writer can both ask for the frame they need. Writing is H.264 in an .mp4 (yuv420p, which
every player shows), written to a temporary name and renamed when complete.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from facefuse.errors import InvalidInputError

# imageio-ffmpeg starts ffmpeg with preexec_fn=os.setpgrp (to keep Ctrl-C from reaching it); a preexec_fn
# makes Python fork the whole process, which crashes intermittently in a process running gRPC threads (the
# client reads frames on gRPC's request thread). Without it, subprocess uses vfork/posix_spawn, which is
# safe; the cost is that Ctrl-C also reaches ffmpeg, which the client is stopping anyway.
os.environ.setdefault("IMAGEIO_FFMPEG_NO_PREVENT_SIGINT", "1")

MAX_FRAME_PIXELS = 8192 * 8192
"""Largest frame read or written (a 64-megapixel frame is 192 MB decoded)."""


@dataclass(frozen=True)
class VideoInfo:
    fps: float
    frames: int
    width: int
    height: int


def _reader(path: Path) -> Any:
    import imageio.v2 as imageio

    try:
        return imageio.get_reader(str(path), format="FFMPEG")
    except (OSError, RuntimeError, ValueError, IndexError) as exc:
        raise InvalidInputError(f"{path}: not a readable video ({exc})") from None


def video_info(path: str | Path) -> VideoInfo:
    """Frame rate, exact frame count (the stream is counted, not estimated from its duration) and size."""
    reader = _reader(Path(path))
    try:
        meta = reader.get_meta_data()
        width, height = (int(v) for v in meta.get("size", (0, 0)))
        try:
            frames = int(reader.count_frames())
        except (OSError, RuntimeError, ValueError) as exc:
            raise InvalidInputError(f"{path}: its frames cannot be counted ({exc})") from None
        fps = float(meta.get("fps") or 0.0)
    finally:
        reader.close()
    if width * height <= 0 or width * height > MAX_FRAME_PIXELS:
        raise InvalidInputError(f"{path}: frame size {width}x{height} is outside 1..{MAX_FRAME_PIXELS} pixels")
    if not np.isfinite(fps) or fps <= 0:
        fps = 25.0  # a stream without a rate: the common default, only used for timing the smoothing
    return VideoInfo(fps, frames, width, height)


class FrameReader:
    """Random access to one video's frames, efficient when the requests mostly go forward."""

    def __init__(self, path: str | Path, keep: int = 8) -> None:
        self.path = Path(path)
        self.keep = keep
        self._lock = threading.Lock()
        self._reader: Any = None
        self._position = -1  # index of the last frame decoded by the open reader
        self._recent: OrderedDict[int, np.ndarray] = OrderedDict()

    def frame(self, index: int) -> np.ndarray:
        """Frame ``index`` (0-based) as RGB uint8; InvalidInputError past the end or on a broken stream."""
        with self._lock:
            if index in self._recent:
                self._recent.move_to_end(index)
                return self._recent[index]
            if self._reader is None or index <= self._position:
                self._close()
                self._reader = _reader(self.path)
                self._position = -1
            try:
                while self._position < index:
                    data = self._reader.get_next_data()
                    self._position += 1
            except (IndexError, StopIteration, OSError, RuntimeError) as exc:
                self._close()
                raise InvalidInputError(f"{self.path}: frame {index} could not be read ({exc})") from None
            rgb = np.ascontiguousarray(np.asarray(data)[..., :3], dtype=np.uint8)
            self._recent[index] = rgb
            while len(self._recent) > self.keep:
                self._recent.popitem(last=False)
            return rgb

    def _close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def close(self) -> None:
        with self._lock:
            self._close()
            self._recent.clear()


def _even(frame: np.ndarray) -> np.ndarray:
    """Pad to even width and height by repeating the last row/column (yuv420p needs even sizes)."""
    h, w = frame.shape[:2]
    return np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge") if h % 2 or w % 2 else frame


def write_video(path: str | Path, frames: Iterable[np.ndarray], fps: float) -> Path:
    """Write RGB frames (all the same size) as an H.264 .mp4; the file appears only once complete."""
    import imageio.v2 as imageio

    target = Path(path)
    if not (np.isfinite(fps) and 0 < fps <= 1000):
        raise InvalidInputError(f"video: fps must be in (0, 1000], got {fps}")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.stem}.partial{target.suffix or '.mp4'}")
    shape = None
    writer = imageio.get_writer(str(partial), format="FFMPEG", fps=float(fps), codec="libx264",
                                pixelformat="yuv420p", macro_block_size=1, ffmpeg_log_level="error")
    try:
        for frame in frames:
            rgb = np.asarray(frame)
            if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8 or rgb.shape[0] * rgb.shape[1] > \
                    MAX_FRAME_PIXELS:
                raise InvalidInputError(f"video: frames must be RGB uint8 up to {MAX_FRAME_PIXELS} pixels, "
                                        f"got {rgb.shape} {rgb.dtype}")
            if shape is None:
                shape = rgb.shape
            elif rgb.shape != shape:
                raise InvalidInputError(f"video: frame size changed from {shape} to {rgb.shape}")
            writer.append_data(_even(rgb))
        writer.close()
        if shape is None:
            raise InvalidInputError("video: no frames to write")
        os.replace(partial, target)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    return target
