"""Images in: untrusted bytes -> one (H, W, 3) uint8 RGB array, or a clear error.

Rules (the gateway applies them to every upload):
* Formats: JPEG (and MPO, what many phones write), PNG, WebP, BMP, TIFF. Anything else, empty or
  random bytes -> ``InvalidInputError``.
* Size limits are checked before any pixel is decoded: the byte count first, then the width x height
  read from the header against ``max_pixels``, then the memory decoding will take against
  ``max_decode_bytes`` (the decode budget) -> ``LimitExceededError``. A decompression bomb (a tiny
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

Memory (what ``decode_cost_bytes`` charges against the budget, per pixel, beyond the encoded bytes):
the decoder's canvas (Pillow: 1 B for L/P, 2 B for 16-bit gray, 4 B for every other mode) + the 3 B
output, or two Pillow canvases while an EXIF rotation runs if that is more (the orientation is not
known before decoding: a PNG may store it last). 16-bit colour goes through OpenCV, whose decoder
peaks at two 16-bit canvases (12 B/px RGB, 16 B/px RGBA, measured); the output and a rotation's
copy come after it has let go of one.
Conversion (16 -> 8 bit scaling, alpha over white) runs in integer arithmetic on strips of 2^18
pixels, so its temporaries are bounded (16 MiB charged) whatever the canvas; rounding is exact, so the output
equals the float formulas above. Decoders that hold more add it: progressive JPEG keeps every DCT
coefficient (2 B per sample of each component), WebP decodes into a full 4 B/px buffer first, TIFF
may hold a whole uncompressed strip. Mode "F" (float TIFF) is converted on the whole canvas (its
scaling depends on the global range): 44 B/px. Charged for an 8-bit RGB PNG or baseline JPEG:
8 B/px; for a 16-bit RGBA PNG: 16 B/px. Measured peaks (benchmarks/results/decode_memory.md, 12 M px):
16-bit RGBA PNG 16.4 B/px (112.5 B/px with the float64 copies this replaced), 16-bit RGB 12.4 (78.4),
8-bit RGBA PNG 7.9 (60.3), RGB JPEG 7.5 (14.3).
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
DEFAULT_MAX_DECODE_BYTES = 512 * 1024 * 1024
"""Fits any 8-bit photo or a 16-bit RGB PNG at the default pixel limit (40 M px); refuses a 16-bit
RGBA one over 33 M px."""
_STRIP_PIXELS = 1 << 18
_STRIP_BYTES_PER_PIXEL = 64  # the most any conversion's temporaries take per pixel of a strip
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF")  # JPEG also opens MPO (multi-picture) files

_EXIF_ORIENTATION = 0x0112


def decode_image(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES,
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
        cost = decode_cost_bytes(image)
        if cost > max_decode_bytes:
            raise LimitExceededError(
                f"{source}: decoding this {width}x{height} {image.format} ({image.mode}) would take about "
                f"{cost / 2**20:.0f} MiB, over the decode budget of {max_decode_bytes / 2**20:.0f} MiB"
            )
        try:
            if _is_sixteen_bit_colour(image):
                rgb = _decode_sixteen_bit_colour(data, image, source)
            else:
                ImageOps.exif_transpose(image, in_place=True)  # loads; a rotation replaces the canvas
                rgb = _pillow_to_rgb(image)
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
    max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES,
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
    return decode_image(data, max_pixels=max_pixels, max_bytes=max_bytes, max_decode_bytes=max_decode_bytes,
                        source=str(path))


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

    orientation = _orientation(image)  # for a PNG this decodes Pillow's 8-bit canvas: read, then free it
    image.close()
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if decoded is None or decoded.dtype != np.uint16 or decoded.ndim != 3 or decoded.shape[2] not in (3, 4):
        raise InvalidInputError(f"{source}: corrupt or truncated 16-bit image data")
    height, width = decoded.shape[:2]
    rgb = np.empty((height, width, 3), np.uint8)
    rows = max(1, _STRIP_PIXELS // width)
    for top in range(0, height, rows):
        rgb[top:top + rows] = _sixteen_bit_bgr_to_rgb8(decoded[top:top + rows])
    del decoded
    return apply_exif_orientation(rgb, orientation)


_SQUARED_MAX16 = 65535 * 65535


def _sixteen_bit_bgr_to_rgb8(bgr: np.ndarray) -> np.ndarray:
    """BGR(A) uint16 -> RGB uint8, alpha over white: ``rint(255 * (c * a + 1 - a))`` with c, a in [0, 1],
    computed exactly in integers (the float formula never lands on a tie, so both round alike)."""
    if bgr.shape[2] == 3:
        colour = bgr[:, :, 2::-1].astype(np.uint32)
        colour += 128
        colour //= 257
        return colour.astype(np.uint8)
    colour = bgr[:, :, 2::-1].astype(np.uint64)  # in place from here: one uint64 copy of the strip
    alpha = bgr[:, :, 3:4].astype(np.uint64)
    colour *= alpha
    np.subtract(65535, alpha, out=alpha)
    alpha *= 65535
    colour += alpha  # 65535² * (c * a + 1 - a)
    colour *= 510
    colour += _SQUARED_MAX16
    colour //= 2 * _SQUARED_MAX16
    return colour.astype(np.uint8)


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
    """``rint(rgb * a / 255 + 255 * (1 - a / 255))`` exactly, in uint16 (the largest sum is 65152)."""
    rgb = rgba[:, :, :3].astype(np.uint16)
    alpha = rgba[:, :, 3:4].astype(np.uint16)
    return ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)


_PILLOW_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}  # others: 4


def decode_cost_bytes(image: Image.Image) -> int:
    """Peak bytes decoding ``image`` (opened, not loaded) allocates beyond its encoded bytes (module docstring)."""
    width, height = image.size
    # The EXIF orientation is not read here: a PNG's may sit after the pixels, and reading it decodes them.
    if _is_sixteen_bit_colour(image):
        canvas = 8 if image.mode == "RGBA" else 6
        per_pixel: float = 2 * canvas  # OpenCV's PNG decoder holds two 16-bit canvases at its peak (measured)
    else:
        canvas = _PILLOW_BYTES_PER_PIXEL.get(image.mode, 4)
        per_pixel = max(2 * canvas, canvas + 3)  # a rotation briefly holds two canvases, before the output exists
        if image.mode == "F":
            per_pixel = 40 + canvas
        if image.format in ("JPEG", "MPO") and "progressive" in image.info:
            layers = getattr(image, "layer", None) or [("", 1, 1, 0)] * len(image.getbands())
            h_max = max(layer[1] for layer in layers) or 1
            v_max = max(layer[2] for layer in layers) or 1
            per_pixel += sum(2 * layer[1] * layer[2] / (h_max * v_max) for layer in layers)
        elif image.format == "WEBP":
            per_pixel += 4
        elif image.format == "TIFF":
            per_pixel += canvas
    return int(width * height * per_pixel) + _STRIP_PIXELS * _STRIP_BYTES_PER_PIXEL  # + the strip temporaries


def _pillow_to_rgb(image: Image.Image) -> np.ndarray:
    """A loaded Pillow image -> RGB uint8, converted strip by strip into the one output array."""
    if image.mode == "F":  # its scaling depends on the whole image's range
        return _to_rgb_uint8(image)
    width, height = image.size
    sixteen_bit_range = image.mode != "I" or image.getextrema()[1] > 255  # type: ignore[operator]
    rgb = np.empty((height, width, 3), np.uint8)
    rows = max(1, _STRIP_PIXELS // width)
    for top in range(0, height, rows):
        bottom = min(top + rows, height)
        strip = image if rows >= height else image.crop((0, top, width, bottom))
        rgb[top:bottom] = _to_rgb_uint8(strip, sixteen_bit_range)
    return rgb


def _to_rgb_uint8(image: Image.Image, sixteen_bit_range: bool = True) -> np.ndarray:
    mode = image.mode
    if mode == "RGB":
        return np.asarray(image, dtype=np.uint8)
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(image)
        # "I" from a 16-bit source holds 0..65535; 8-bit-range data in "I" stays as it is. rint(v * 255 / 65535)
        # is (v + 128) // 257 exactly (65535 = 255 * 257; no value lies on a tie).
        if mode != "I" or sixteen_bit_range:
            gray = ((np.clip(values, 0, 65535).astype(np.uint32) + 128) // 257).astype(np.uint8)
        else:
            gray = np.clip(values, 0, 255).astype(np.uint8)
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


_EXIF_IFD = 0x8769
_EXIF_FOCAL_35MM = 0xA405  # FocalLengthIn35mmFilm
MAX_FOCAL_35MM = 2000.0
"""Beyond this a 35 mm-equivalent focal is not a photo lens (or the tag is broken): treated as absent."""


def exif_focal_35mm(data: bytes) -> float | None:
    """The lens's 35 mm-equivalent focal length from the photo's EXIF (FocalLengthIn35mmFilm), or None.

    Only the header is read (no pixels decoded); a missing, zero or broken tag is None, never an error.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            value = image.getexif().get_ifd(_EXIF_IFD).get(_EXIF_FOCAL_35MM)
        focal = float(value) if value is not None else 0.0
    except Exception:  # a broken EXIF block must not make a valid image unusable
        return None
    return focal if 0.0 < focal <= MAX_FOCAL_35MM else None
