"""Images in: untrusted bytes -> one (H, W, 3) uint8 RGB array, or a clear error.

Rules (the gateway applies them to every upload):
* Formats: JPEG (and MPO, what many phones write), PNG, WebP, BMP, TIFF. Anything else, empty or
  random bytes -> ``InvalidInputError``.
* Size limits are checked before any pixel is decoded: the byte count first, then the width x height
  read from the header against ``max_pixels`` -> ``LimitExceededError``. A decompression bomb (a tiny
  file whose header claims a huge canvas) therefore never allocates its canvas. Pillow's own bomb
  guard (``Image.MAX_IMAGE_PIXELS``) is left as it is; if it trips first it maps to the same error.
* Truncated files are errors: the whole image is decoded (``load()``) and Pillow's "image file is
  truncated" becomes ``InvalidInputError``. ``ImageFile.LOAD_TRUNCATED_IMAGES`` is never set (a
  half-grey face would silently poison identity features downstream); if another library has set it
  process-wide, decoding refuses to run rather than accept partial images.
* EXIF orientation is applied, so the array is upright as a viewer shows it.
* Colour: grayscale is replicated to 3 channels; palette images are expanded; CMYK is converted by
  Pillow; 16-bit images are scaled to 8 bits by rounding ``v * 255 / 65535`` (Pillow alone keeps only
  the high byte of 16-bit colour PNG/TIFF, so those are decoded with OpenCV at full depth first).
* Transparency (RGBA, LA, PA, palette with a transparent index) is composited over **white**
  (``rgb * a + 255 * (1 - a)``): transparent margins of a cut-out portrait become a neutral
  background instead of the arbitrary colour hidden under alpha = 0.
* Float (mode "F") images: values in [0, 1] are scaled by 255, otherwise clipped to [0, 255].
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from facefuse.errors import InvalidInputError, LimitExceededError

DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF")  # JPEG also opens MPO (multi-picture) files

_EXIF_ORIENTATION = 0x0112


def decode_image(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    source: str = "image",
) -> np.ndarray:
    """Decode encoded image bytes into an upright (H, W, 3) uint8 RGB array (see module rules)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidInputError(f"{source}: expected encoded image bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) == 0:
        raise InvalidInputError(f"{source}: empty input (0 bytes)")
    if len(data) > max_bytes:
        raise LimitExceededError(f"{source}: {len(data)} bytes is over the limit of {max_bytes} bytes")
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise InvalidInputError(
            f"{source}: PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set in this process, so truncated images "
            "cannot be detected; unset it"
        )
    try:
        with warnings.catch_warnings():
            # Our own header check below is the limit that applies; Pillow's warning is noise here.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=list(ACCEPTED_FORMATS))
    except Image.DecompressionBombError as exc:
        raise LimitExceededError(f"{source}: refused as a decompression bomb ({exc})") from None
    except UnidentifiedImageError:
        raise InvalidInputError(
            f"{source}: not a readable image ({len(data)} bytes; accepted formats: {', '.join(ACCEPTED_FORMATS)})"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidInputError(f"{source}: corrupt image header ({exc})") from None

    with image:
        width, height = image.size
        if width <= 0 or height <= 0:
            raise InvalidInputError(f"{source}: image has an empty canvas ({width}x{height})")
        if width * height > max_pixels:
            raise LimitExceededError(
                f"{source}: {width}x{height} = {width * height} pixels is over the limit of {max_pixels} pixels"
            )
        try:
            if _is_sixteen_bit_colour(image):
                rgb = _decode_sixteen_bit_colour(data, image, source)
            else:
                image.load()
                rgb = _to_rgb_uint8(ImageOps.exif_transpose(image))
        except (InvalidInputError, LimitExceededError):
            raise
        except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
            message = str(exc) or type(exc).__name__
            if "truncated" in message:
                raise InvalidInputError(f"{source}: image file is truncated ({message})") from None
            raise InvalidInputError(f"{source}: corrupt image data ({message})") from None
    return np.ascontiguousarray(rgb)


def read_image_file(
    path: str | os.PathLike[str],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> np.ndarray:
    """Read and decode an image file with the same rules and limits as uploaded bytes."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise InvalidInputError(f"{path}: cannot read image file ({exc.strerror or exc})") from None
    if size > max_bytes:
        raise LimitExceededError(f"{path}: {size} bytes is over the limit of {max_bytes} bytes")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidInputError(f"{path}: cannot read image file ({exc.strerror or exc})") from None
    return decode_image(data, max_pixels=max_pixels, max_bytes=max_bytes, source=str(path))


def iter_video_frames(
    path: str | os.PathLike[str],
    every_n: int = 1,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(frame_index, rgb_uint8_frame)`` for every ``every_n``-th frame of a video (OpenCV)."""
    import cv2

    if every_n < 1:
        raise InvalidInputError(f"every_n must be >= 1, got {every_n}")
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"{path}: video file not found")
    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            raise InvalidInputError(f"{path}: OpenCV cannot open this file as a video")
        width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
        height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
        if width * height > max_pixels:
            raise LimitExceededError(f"{path}: frames of {width}x{height} are over the limit of {max_pixels} pixels")
        index = 0
        while True:
            if index % every_n == 0:
                ok, frame = capture.read()
                if not ok:
                    break
                if frame.ndim == 2:
                    frame = np.repeat(frame[:, :, None], 3, axis=2)
                yield index, np.ascontiguousarray(frame[:, :, 2::-1])
            elif not capture.grab():  # skip without decoding
                break
            index += 1
    finally:
        capture.release()


def _rawmode(image: Image.Image) -> str:
    tile = getattr(image, "tile", None) or []
    if not tile:
        return ""
    args = tile[0][3] if len(tile[0]) > 3 else ""
    if isinstance(args, tuple):
        args = args[0] if args else ""
    return args if isinstance(args, str) else ""


def _is_sixteen_bit_colour(image: Image.Image) -> bool:
    return image.mode in ("RGB", "RGBA") and ";16" in _rawmode(image) and image.format in ("PNG", "TIFF")


def _decode_sixteen_bit_colour(data: bytes, image: Image.Image, source: str) -> np.ndarray:
    """Pillow keeps only the high byte of 16-bit colour samples; OpenCV decodes all 16 bits."""
    import cv2

    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if decoded is None or decoded.dtype != np.uint16 or decoded.ndim != 3 or decoded.shape[2] not in (3, 4):
        raise InvalidInputError(f"{source}: corrupt or truncated 16-bit image data")
    order = [2, 1, 0, 3][: decoded.shape[2]]
    values = decoded[:, :, order].astype(np.float64) / 65535.0
    if values.shape[2] == 4:
        alpha = values[:, :, 3:4]
        values = values[:, :, :3] * alpha + (1.0 - alpha)
    rgb = np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8)
    return apply_exif_orientation(rgb, _orientation(image))


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # a broken EXIF block must not make a valid image unreadable
        return 1


def apply_exif_orientation(array: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation tag (1-8) to an HxWxC array, as ``ImageOps.exif_transpose`` does."""
    ops = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: np.swapaxes(a, 0, 1),
        6: lambda a: np.rot90(a, -1),
        7: lambda a: np.swapaxes(a[::-1, ::-1], 0, 1),
        8: lambda a: np.rot90(a, 1),
    }
    op = ops.get(orientation)
    return np.ascontiguousarray(op(array)) if op else array


def _composite_over_white(rgba: np.ndarray) -> np.ndarray:
    rgb = rgba[:, :, :3].astype(np.float32)
    alpha = rgba[:, :, 3:4].astype(np.float32) / 255.0
    return np.clip(np.rint(rgb * alpha + 255.0 * (1.0 - alpha)), 0, 255).astype(np.uint8)


def _to_rgb_uint8(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode == "RGB":
        return np.asarray(image, dtype=np.uint8)
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(image).astype(np.float64)
        # "I" from a 16-bit source holds 0..65535; 8-bit-range data in "I" stays as it is.
        if mode != "I" or values.max(initial=0) > 255:
            values = values * (255.0 / 65535.0)
        gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        finite = values[np.isfinite(values)]
        if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
            values = values * 255.0
        gray = np.clip(np.rint(np.nan_to_num(values)), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in image.info)
    if has_alpha:
        return _composite_over_white(np.asarray(image.convert("RGBA"), dtype=np.uint8))
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def require_rgb_uint8(image_rgb: np.ndarray, what: str, *, min_side: int = 8) -> np.ndarray:
    """The (H, W, 3) uint8 RGB array every detector takes, or an InvalidInputError naming ``what``."""
    image = np.asarray(image_rgb)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise InvalidInputError(f"{what}: expected an (H, W, 3) uint8 RGB image, got {image.shape} {image.dtype}")
    if min(image.shape[:2]) < min_side:
        raise InvalidInputError(f"{what}: image of {image.shape[1]}x{image.shape[0]} pixels is too small")
    return image
