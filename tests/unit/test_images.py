"""decode_image on every input case the gateway must handle; files are made here, in memory."""

from __future__ import annotations

import io
import struct
import tracemalloc
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from facefuse.errors import InvalidInputError, LimitExceededError
from facefuse.io import images
from facefuse.io.images import (
    apply_exif_orientation,
    decode_image,
    iter_video_frames,
    read_image_file,
)


def _smooth_rgb(h: int = 48, w: int = 64) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) * 255 // (w + h - 2)], axis=2).astype(np.uint8)


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("fmt", "kwargs", "tolerance"),
    [("PNG", {}, 0), ("BMP", {}, 0), ("TIFF", {}, 0), ("WEBP", {"lossless": True}, 0),
     ("JPEG", {"quality": 95}, 6.0), ("WEBP", {"quality": 95}, 6.0)],
)
def test_formats_round_trip(fmt, kwargs, tolerance):
    rgb = _smooth_rgb()
    out = decode_image(_encode(Image.fromarray(rgb), fmt, **kwargs))
    assert out.shape == rgb.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - rgb).mean() <= tolerance


def test_grayscale_is_replicated():
    gray = _smooth_rgb()[:, :, 0]
    out = decode_image(_encode(Image.fromarray(gray, "L"), "PNG"))
    assert out.shape == (*gray.shape, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], gray)


def test_rgba_is_composited_over_white():
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (20, 30, 4), dtype=np.uint8)
    out = decode_image(_encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    a = rgba[:, :, 3:4] / 255.0
    expected = np.rint(rgba[:, :, :3] * a + 255 * (1 - a))
    assert np.abs(out.astype(float) - expected).max() <= 1.0  # float32 vs float64 rounding at .5


def test_palette_with_transparency():
    pal = Image.new("P", (4, 2))
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.putdata([0, 1, 0, 1, 1, 0, 1, 0])
    out = decode_image(_encode(pal, "PNG", transparency=1))
    expected = np.array([[255, 0, 0], [255, 255, 255]], np.uint8)[np.array([0, 1, 0, 1, 1, 0, 1, 0]).reshape(2, 4)]
    np.testing.assert_array_equal(out, expected)


def test_sixteen_bit_grayscale_png_scaled_by_rounding():
    values = np.linspace(0, 65535, 40 * 30).reshape(30, 40).astype(np.uint16)
    out = decode_image(_encode(Image.fromarray(values), "PNG"))
    expected = np.floor(values.astype(np.float64) * 255.0 / 65535.0 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(out[:, :, 0], expected)
    np.testing.assert_array_equal(out[:, :, 2], expected)


def test_sixteen_bit_colour_png_keeps_full_depth():
    rng = np.random.default_rng(1)
    rgb16 = rng.integers(0, 65536, (12, 10, 3), dtype=np.uint16)
    ok, encoded = cv2.imencode(".png", rgb16[:, :, ::-1])  # OpenCV writes BGR
    assert ok
    out = decode_image(encoded.tobytes())
    expected = np.floor(rgb16.astype(np.float64) * 255.0 / 65535.0 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(out, expected)


def test_cmyk_jpeg_becomes_rgb():
    # Flat CMYK patches whose RGB is unambiguous: cyan, magenta, yellow, black, white.
    cmyk = np.zeros((16, 80, 4), np.uint8)
    patches = [((255, 0, 0, 0), (0, 255, 255)), ((0, 255, 0, 0), (255, 0, 255)), ((0, 0, 255, 0), (255, 255, 0)),
               ((0, 0, 0, 255), (0, 0, 0)), ((0, 0, 0, 0), (255, 255, 255))]
    for i, (value, _) in enumerate(patches):
        cmyk[:, i * 16:(i + 1) * 16] = value
    out = decode_image(_encode(Image.fromarray(cmyk, "CMYK"), "JPEG", quality=100))
    assert out.shape == (16, 80, 3)
    for i, (_, rgb) in enumerate(patches):
        patch = out[4:12, i * 16 + 4:i * 16 + 12].reshape(-1, 3).astype(int)
        assert np.abs(patch - np.array(rgb)).max() <= 12, (i, patch.mean(0))


def test_exif_orientation_is_applied():
    # 40 wide x 20 high: left half red, right half blue. Orientation 6 = "rotate 90 clockwise to view".
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = (255, 0, 0)
    stored[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    out = decode_image(_encode(Image.fromarray(stored), "JPEG", quality=95, exif=exif.tobytes()))
    assert out.shape == (40, 20, 3)  # now 20 wide, 40 high
    top, bottom = out[2:18].reshape(-1, 3).mean(0), out[22:38].reshape(-1, 3).mean(0)
    assert top[0] > 200 and top[2] < 60  # the left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


@pytest.mark.parametrize("orientation", range(1, 9))
def test_numpy_orientation_matches_pillow(orientation):
    rgb = np.random.default_rng(orientation).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    image = Image.fromarray(rgb)
    exif = image.getexif()
    exif[0x0112] = orientation
    reopened = Image.open(io.BytesIO(_encode(image, "PNG", exif=exif.tobytes())))
    np.testing.assert_array_equal(
        apply_exif_orientation(rgb, orientation), np.asarray(ImageOps.exif_transpose(reopened))
    )


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("side", [8_000, 100_000])  # 64 MP: our limit; 10 GP: Pillow's guard trips first
def test_decompression_bomb_refused_before_decoding(side):
    data = _png_header_only(side, side)
    tracemalloc.start()
    try:
        with pytest.raises(LimitExceededError) as info:
            decode_image(data, max_pixels=40_000_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000, f"allocated {peak} bytes for a refused header"
    assert "pixels" in str(info.value) or "bomb" in str(info.value)


def test_pixel_limit_is_configurable():
    data = _encode(Image.fromarray(_smooth_rgb()), "PNG")
    with pytest.raises(LimitExceededError, match="48 = 3072 pixels"):
        decode_image(data, max_pixels=3000)
    assert decode_image(data, max_pixels=3072).shape == (48, 64, 3)


def test_byte_limit():
    data = _encode(Image.fromarray(_smooth_rgb()), "PNG")
    with pytest.raises(LimitExceededError, match="bytes"):
        decode_image(data, max_bytes=len(data) - 1)


def test_truncated_jpeg_refused():
    rng = np.random.default_rng(0)
    data = _encode(Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)), "JPEG", quality=90)
    with pytest.raises(InvalidInputError, match="truncated"):
        decode_image(data[: len(data) // 2])


def test_truncated_png_refused():
    rng = np.random.default_rng(0)
    data = _encode(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "PNG")
    with pytest.raises(InvalidInputError):
        decode_image(data[: len(data) * 2 // 3])


@pytest.mark.parametrize(
    "data", [b"", np.random.default_rng(3).bytes(5000), b"GIF89a" + b"\x00" * 64, b"<html>hi</html>"]
)
def test_non_images_refused(data):
    with pytest.raises(InvalidInputError):
        decode_image(data)


def test_not_bytes_refused():
    with pytest.raises(InvalidInputError, match="bytes"):
        decode_image("a string")  # type: ignore[arg-type]


def test_read_image_file(tmp_path):
    rgb = _smooth_rgb()
    path = tmp_path / "x.png"
    Image.fromarray(rgb).save(path)
    np.testing.assert_array_equal(read_image_file(path), rgb)
    with pytest.raises(InvalidInputError, match=r"missing\.png"):
        read_image_file(tmp_path / "missing.png")


def test_video_frames_every_n(tmp_path):
    path = tmp_path / "clip.avi"
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255), (128, 128, 128)]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (32, 24))
    assert writer.isOpened()
    for rgb in colours:
        writer.write(np.full((24, 32, 3), rgb[::-1], np.uint8))
    writer.release()
    frames = list(iter_video_frames(path, every_n=3))
    assert [i for i, _ in frames] == [0, 3, 6]
    for index, frame in frames:
        assert frame.shape == (24, 32, 3) and frame.dtype == np.uint8
        assert np.abs(frame.reshape(-1, 3).mean(0) - np.array(colours[index])).max() < 12
    with pytest.raises(InvalidInputError):
        list(iter_video_frames(tmp_path / "none.avi"))


def _sixteen_bit_png(rgba16: np.ndarray) -> bytes:
    order = [2, 1, 0, 3][: rgba16.shape[2]]
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(rgba16[:, :, order]), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    assert ok
    return encoded.tobytes()


def test_sixteen_bit_bomb_under_the_pixel_limit_is_refused_by_the_decode_budget():
    # 3000 x 3000 16-bit RGBA: 9 M pixels (under the 40 M pixel limit) in a file of a few tens of KB.
    bomb = _sixteen_bit_png(np.full((3000, 3000, 4), 40000, np.uint16))
    assert len(bomb) < 400_000
    with Image.open(io.BytesIO(bomb)) as image:
        cost = images.decode_cost_bytes(image)
    assert cost >= 3000 * 3000 * 11  # OpenCV's 8 B/px canvas + the 3 B/px output
    with pytest.raises(LimitExceededError, match="over the decode budget of 64 MiB"):
        decode_image(bomb, max_decode_bytes=64 << 20)
    assert decode_image(bomb, max_decode_bytes=cost).shape == (3000, 3000, 3)


def test_decode_budget_is_charged_by_mode_not_pixels():
    rgb = _encode(Image.fromarray(_smooth_rgb(400, 500)), "PNG")
    gray = _encode(Image.fromarray(_smooth_rgb(400, 500)[:, :, 0]), "PNG")
    costs = {}
    for name, data in (("rgb", rgb), ("gray", gray)):
        with Image.open(io.BytesIO(data)) as image:
            costs[name] = images.decode_cost_bytes(image) - images._STRIP_PIXELS * images._STRIP_BYTES_PER_PIXEL
    assert costs == {"rgb": 400 * 500 * 8, "gray": 400 * 500 * 4}
    budget = 400 * 500 * 6 + images._STRIP_PIXELS * images._STRIP_BYTES_PER_PIXEL
    assert decode_image(gray, max_decode_bytes=budget).shape == (400, 500, 3)
    with pytest.raises(LimitExceededError, match="decode budget"):
        decode_image(rgb, max_decode_bytes=budget)


def test_sixteen_bit_rgba_matches_the_float_formula_exactly():
    rng = np.random.default_rng(5)
    rgba16 = rng.integers(0, 65536, (40, 50, 4), dtype=np.uint16)
    rgba16[0, :6, 3] = [0, 1, 2, 32767, 65534, 65535]
    out = decode_image(_sixteen_bit_png(rgba16))
    values = rgba16[:, :, :3] / 65535.0
    alpha = rgba16[:, :, 3:4] / 65535.0
    expected = np.clip(np.rint((values * alpha + (1.0 - alpha)) * 255.0), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(out, expected)


def test_rgba_over_white_is_exact_for_every_colour_and_alpha():
    colour, alpha = np.meshgrid(np.arange(256), np.arange(256))
    rgba = np.stack([colour, colour, colour, alpha], -1).astype(np.uint8)
    out = decode_image(_encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    a = alpha[:, :, None] / 255.0
    expected = np.rint(colour[:, :, None] * a + 255.0 * (1.0 - a)).astype(np.uint8)
    np.testing.assert_array_equal(out, np.broadcast_to(expected, out.shape))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "I;16", "L", "16-bit RGBA"])
def test_strip_conversion_equals_whole_canvas(mode, monkeypatch):
    rng = np.random.default_rng(2)
    if mode == "16-bit RGBA":
        data = _sixteen_bit_png(rng.integers(0, 65536, (37, 29, 4), dtype=np.uint16))
    elif mode == "I;16":
        data = _encode(Image.fromarray(rng.integers(0, 65536, (37, 29), dtype=np.uint16)), "PNG")
    else:
        data = _encode(Image.fromarray(rng.integers(0, 256, (37, 29, 4), dtype=np.uint8), "RGBA").convert(mode), "PNG")
    whole = decode_image(data)
    monkeypatch.setattr(images, "_STRIP_PIXELS", 100)  # 3 rows a strip, the last one short
    np.testing.assert_array_equal(decode_image(data), whole)
